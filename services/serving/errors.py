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


class NotFound(ServingError):
    status = 404
    type = "not_found_error"


class Timeout(ServingError):
    status = 504
    type = "timeout_error"


class Unavailable(ServingError):
    status = 503
    type = "service_unavailable"
