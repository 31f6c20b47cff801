"""Registry and placement errors; each message names the adapter, version or server at fault.
Each is also one of the domain's error kinds (services/errors.py), which decides its HTTP answer."""

from services.errors import Conflict, InvalidRequest, NotFound, NotPermitted, ServiceError, Unavailable


class RegistryError(ServiceError):
    """Base of every registry and placement error."""


class RegistryUnavailable(RegistryError, Unavailable):
    """Redis cannot be reached or refuses writes; the failed call changed nothing."""


class AdapterNotFound(RegistryError, NotFound):
    """No such adapter, or no such version of it."""


class VersionConflict(RegistryError, Conflict):
    """The request contradicts the adapter's current state (or lost a race too many times)."""


class InvalidAdapter(RegistryError, InvalidRequest):
    """Refused input: adapter files, name, card, embeddings or option."""


class AccessDenied(RegistryError, NotPermitted):
    """A tenant acting on an adapter another tenant owns."""


class QualityGateRefused(VersionConflict):
    """Promote or canary of a version whose quality gate failed (without force); names the scores."""
