"""The service's one error tree; `service.app` maps it to OpenAI-shaped responses in one place.

    HotswapError                      500 server_error (unexpected failures end here too)
    ├── InvalidRequestError           400 invalid_request_error
    ├── AuthenticationError           401 authentication_error
    ├── PermissionDeniedError         403 permission_error
    ├── NotFoundError                 404 invalid_request_error (code model_not_found)
    ├── RequestTooLargeError          413 invalid_request_error
    ├── OverloadedError               429 rate_limit_error
    ├── ServiceUnavailableError       503 service_unavailable
    ├── RequestTimeoutError           504 timeout (the per-request limit)
    └── EngineError                   500 server_error (a model step failed)

Every error renders as ``{"error": {"message", "type", "param", "code"}}`` (OpenAI's shape), so
openai-python raises its matching exception class (BadRequestError, NotFoundError, ...). A 500's
message is for the log: the client gets "internal error" and the request id to quote.
"""

from __future__ import annotations


class HotswapError(Exception):
    status_code = 500
    error_type = "server_error"
    default_code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code if code is not None else self.default_code

    @property
    def internal(self) -> bool:
        """A server fault whose message (an exception's text) must not reach the client."""
        return self.status_code == 500

    def to_body(self, request_id: str | None = None) -> dict:
        message = self.message
        if self.internal:
            quote = f" (request id {request_id})" if request_id else ""
            message = f"internal error{quote}; the server log has the details"
        return {
            "error": {
                "message": message,
                "type": self.error_type,
                "param": self.param,
                "code": self.code,
            }
        }


class InvalidRequestError(HotswapError):
    status_code = 400
    error_type = "invalid_request_error"


class AuthenticationError(HotswapError):
    status_code = 401
    error_type = "authentication_error"
    default_code = "invalid_api_key"


class PermissionDeniedError(HotswapError):
    status_code = 403
    error_type = "permission_error"


class NotFoundError(HotswapError):
    status_code = 404
    error_type = "invalid_request_error"
    default_code = "model_not_found"


class RequestTooLargeError(HotswapError):
    status_code = 413
    error_type = "invalid_request_error"


class OverloadedError(HotswapError):
    status_code = 429
    error_type = "rate_limit_error"


class ServiceUnavailableError(HotswapError):
    status_code = 503
    error_type = "service_unavailable"


class RequestTimeoutError(HotswapError):
    status_code = 504
    error_type = "timeout"
    default_code = "request_timeout"


class EngineError(HotswapError):
    status_code = 500
    error_type = "server_error"
