"""Errors that become HTTP responses: each carries its status code and a message for the caller."""
from __future__ import annotations


class ServingError(Exception):
    status = 400
    type = "invalid_request_error"

    def __init__(self, message: str, *, param: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param


class BadRequest(ServingError):
    status = 400


class Unauthorized(ServingError):
    status = 401
    type = "authentication_error"


class Forbidden(ServingError):
    status = 403
    type = "permission_error"


class NotFound(ServingError):
    status = 404
    type = "not_found_error"


class Conflict(ServingError):
    status = 409
    type = "conflict_error"


class TooManyRequests(ServingError):
    status = 429
    type = "rate_limit_error"

    def __init__(self, message: str, retry_after_s: float):
        super().__init__(message)
        self.retry_after_s = retry_after_s  # goes into the Retry-After header


class Timeout(ServingError):
    status = 504
    type = "timeout_error"


class Unavailable(ServingError):
    status = 503
    type = "service_unavailable"
