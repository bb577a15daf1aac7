"""The service's one error tree. Every layer raises these; none of them knows HTTP.

    HotswapError                    a failure the service names (anything else is a bug)
    ├── InvalidRequestError         a request field is wrong (`param` names it)
    │   ├── InputFieldError         an adapter's input: unknown, not a string, or missing
    │   └── ContentPolicyError      a guardrail refused the request
    ├── AuthenticationError         no API key, or a wrong one
    ├── PermissionDeniedError       the key may not do this
    ├── NotFoundError               no such model, adapter or route
    │   └── AdapterUnavailable      the adapter is known but cannot be served (why: the message)
    ├── RequestTooLargeError        the body is over the limit
    ├── RequestTimeoutError         the request outlived its time limit
    ├── ServiceUnavailableError     the service is starting or draining
    ├── QueueFull                   engine: its queue is at the bound
    ├── RateLimited                 a tenant is over its requests or tokens per minute
    ├── EngineStopped               engine: not running (stopping, stopped, or failed)
    ├── StepFailed                  engine: a model step failed
    └── GuardrailError              a guardrail hook raised

`service.serving.errors` maps each class to its HTTP status and OpenAI error type in one
table. `param` is the request field the failure is about, where one is (`input.product`,
`messages`); `code` a machine-readable reason (`queue_full`), where the class says too little.
"""

from __future__ import annotations


class HotswapError(Exception):
    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code

    def about(self, param: str) -> HotswapError:
        """The same failure, about the request field `param` (the caller knows the field)."""
        self.param = param
        return self


class InvalidRequestError(HotswapError):
    pass


class InputFieldError(InvalidRequestError):
    pass


class ContentPolicyError(InvalidRequestError):
    pass


class AuthenticationError(HotswapError):
    pass


class PermissionDeniedError(HotswapError):
    pass


class NotFoundError(HotswapError):
    pass


class AdapterUnavailable(NotFoundError):
    pass


class RequestTooLargeError(HotswapError):
    pass


class RequestTimeoutError(HotswapError):
    pass


class ServiceUnavailableError(HotswapError):
    pass


class QueueFull(HotswapError):
    pass


class RateLimited(HotswapError):
    def __init__(self, message: str, *, retry_after: float, code: str = "rate_limit_exceeded"):
        super().__init__(message, code=code)
        self.retry_after = retry_after  # seconds until the tenant may send again


class EngineStopped(HotswapError):
    pass


class StepFailed(HotswapError):
    pass


class GuardrailError(HotswapError):
    pass
