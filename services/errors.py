"""The domain's error vocabulary. Engines and services raise these (or subclasses named for their
own cases); they carry a message for the caller and the request field at fault, never a status
code: the HTTP edge (deployments/http_app.py) maps each kind to a status and an OpenAI error type
in one table."""
from __future__ import annotations


class ServiceError(Exception):
    def __init__(self, message: str, *, param: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param


class InvalidRequest(ServiceError, ValueError):
    """The caller sent something that cannot be served as sent."""


class NotAuthenticated(ServiceError):
    """No credential, or one that names nobody."""


class NotPermitted(ServiceError):
    """A known caller asking for something its role may not do."""


class NotFound(ServiceError, LookupError):
    """No such thing, or one the caller may not see (the two are not told apart)."""


class Conflict(ServiceError):
    """The request contradicts the current state."""


class LimitExceeded(ServiceError):
    """Over a tenant's limit; worth trying again after `retry_after_s`."""

    def __init__(self, message: str, retry_after_s: float):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class TimedOut(ServiceError):
    """No answer within the request's time budget."""


class Unavailable(ServiceError):
    """A part the request needs is down or lost; retrying later may succeed."""
