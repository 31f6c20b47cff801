"""Registry and placement errors; each message names the adapter, version or server at fault."""


class RegistryError(Exception):
    """Base of every registry and placement error."""


class RegistryUnavailable(RegistryError):
    """Redis cannot be reached or refuses writes; the failed call changed nothing."""


class AdapterNotFound(RegistryError, LookupError):
    """No such adapter, or no such version of it."""


class VersionConflict(RegistryError):
    """The request contradicts the adapter's current state (or lost a race too many times)."""


class InvalidAdapter(RegistryError, ValueError):
    """Refused input: adapter files, name, card, embeddings or option."""


class AccessDenied(RegistryError):
    """A tenant acting on an adapter another tenant owns."""
