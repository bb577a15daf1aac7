"""The one table from the service's errors (`service.errors`) to HTTP.

Every error renders as ``{"error": {"message", "type", "param", "code"}}`` (OpenAI's shape), so
openai-python raises its matching exception class (BadRequestError, NotFoundError, ...). A 500's
message is for the log: the client gets "internal error" and the request id to quote.
"""

from __future__ import annotations

from dataclasses import dataclass

from service import errors


@dataclass(frozen=True)
class HttpError:
    status: int
    type: str
    code: str | None = None  # the default `code` when the error names none

    @property
    def internal(self) -> bool:
        """A server fault whose message (an exception's text) must not reach the client."""
        return self.status == 500


HTTP_ERRORS: dict[type[errors.HotswapError], HttpError] = {
    errors.HotswapError: HttpError(500, "server_error"),
    errors.InvalidRequestError: HttpError(400, "invalid_request_error"),
    errors.ContentPolicyError: HttpError(400, "invalid_request_error", "content_policy_violation"),
    errors.AuthenticationError: HttpError(401, "authentication_error", "invalid_api_key"),
    errors.PermissionDeniedError: HttpError(403, "permission_error"),
    errors.NotFoundError: HttpError(404, "invalid_request_error", "model_not_found"),
    errors.RequestTooLargeError: HttpError(413, "invalid_request_error", "request_too_large"),
    errors.QueueFull: HttpError(429, "rate_limit_error", "queue_full"),
    errors.RateLimited: HttpError(429, "rate_limit_error", "rate_limit_exceeded"),
    errors.ServiceUnavailableError: HttpError(503, "service_unavailable"),
    errors.EngineStopped: HttpError(503, "service_unavailable"),
    errors.RequestTimeoutError: HttpError(504, "timeout", "request_timeout"),
    errors.StepFailed: HttpError(500, "server_error"),
    errors.GuardrailError: HttpError(500, "server_error", "guardrail_error"),
}


class HTTPStatusError(errors.HotswapError):
    """A status the HTTP layer itself answers (Starlette's 405, ...), passed through."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


def http_error(exc: errors.HotswapError) -> HttpError:
    if isinstance(exc, HTTPStatusError):
        return HttpError(exc.status, "invalid_request_error")
    for cls in type(exc).__mro__:
        if cls in HTTP_ERRORS:
            return HTTP_ERRORS[cls]
    raise TypeError(f"{type(exc).__name__} is not a HotswapError")


def error_code(exc: errors.HotswapError) -> str | None:
    return exc.code if exc.code is not None else http_error(exc).code


def to_body(exc: errors.HotswapError, request_id: str | None = None) -> dict:
    http = http_error(exc)
    message = exc.message
    if http.internal:
        quote = f" (request id {request_id})" if request_id else ""
        message = f"internal error{quote}; the server log has the details"
    return {"error": {"message": message, "type": http.type, "param": exc.param, "code": error_code(exc)}}
