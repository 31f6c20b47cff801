"""The serving side's view of the adapter registry: an in-memory snapshot.

Requests are answered from the snapshot, never from Redis directly, so serving of known
adapters goes on while Redis is briefly away; the snapshot is refreshed when the registry's
generation counter moves.
"""
from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Iterable

from services.errors import NotFound

log = logging.getLogger(__name__)


class AdapterUnavailable(NotFound):
    """Missing, retired, or private to another tenant: callers cannot tell which."""

    def __init__(self, ref: str):
        super().__init__(f"adapter '{ref}' does not exist or is not available to you", param="model")
        self.ref = ref


def split_ref(ref: str) -> tuple[str, str | None]:
    """'name' or 'name@version' -> (name, version or None)."""
    name, _, version = ref.partition("@")
    return name, version or None


def canary_bucket(request_id: str, name: str) -> int:
    """0..99, the same for the same request and adapter (deterministic canary split)."""
    digest = hashlib.sha256(f"{request_id}\0{name}".encode()).digest()
    return int.from_bytes(digest[:4], "big") % 100


@dataclass
class Catalog:
    """Records by name (duck-typed registry AdapterRecord: name, active_version, versions,
    owner_tenant, visibility, canary, base_model, domain)."""

    records: dict[str, Any] = field(default_factory=dict)
    generation: int = -1

    @classmethod
    def of(cls, records: Iterable[Any], generation: int = -1) -> "Catalog":
        return cls({r.name: r for r in records}, generation)

    def is_visible(self, name: str, tenant: str | None) -> bool:
        rec = self.records.get(name)
        if rec is None or rec.active_version is None:
            return False
        return rec.visibility == "shared" or (tenant is not None and rec.owner_tenant == tenant)

    def knows(self, ref: str) -> bool:
        """Whether the snapshot holds this name (and version, if given) at all, whoever may use it."""
        name, version = split_ref(ref)
        rec = self.records.get(name)
        return rec is not None and rec.active_version is not None and (version is None or version in rec.versions)

    def visible(self, tenant: str | None) -> list[Any]:
        return [r for name, r in sorted(self.records.items()) if self.is_visible(name, tenant)]

    def resolve(self, ref: str, *, tenant: str | None, request_id: str) -> tuple[str, str]:
        """(name, version) to serve: the named version, else canary or active by request id."""
        name, version = split_ref(ref)
        if not self.is_visible(name, tenant):
            raise AdapterUnavailable(ref)
        rec = self.records[name]
        if version is not None:
            if version not in rec.versions:
                raise AdapterUnavailable(ref)
            return name, version
        canary = rec.canary
        if canary is not None and canary_bucket(request_id, name) < canary.percent:
            return name, canary.version
        return name, rec.active_version


class CatalogCache:
    """A Catalog kept in step with a registry; keeps the last good snapshot if Redis fails."""

    def __init__(self, registry, min_interval_s: float = 0.5, miss_interval_s: float = 0.05):
        self.registry = registry
        self.min_interval_s = min_interval_s
        self.miss_interval_s = miss_interval_s
        self.catalog = Catalog()
        self._checked_at = float("-inf")  # the first get() reads

    def get(self, force: bool = False, wanted: Iterable[str] = ()) -> Catalog:
        """The snapshot, re-checked every min_interval_s, or sooner (at most every miss_interval_s)
        when it lacks an adapter in `wanted`: an adapter answered 200 at registration is then served
        by the next request, not refused for up to min_interval_s (read your writes)."""
        now = time.monotonic()
        missing = any(not self.catalog.knows(ref) for ref in wanted)
        interval = self.miss_interval_s if missing else self.min_interval_s
        if not force and now - self._checked_at < interval:
            return self.catalog
        self._checked_at = now
        try:
            generation = self.registry.generation()
            if generation != self.catalog.generation:
                self.catalog = Catalog.of(self.registry.snapshot(), generation)
        except Exception as err:  # RegistryUnavailable and connection errors alike
            log.warning("registry unreachable, serving from the last snapshot: %s", err)
        return self.catalog
