"""The ingress's door: who is calling (API key -> tenant) and may they start a request now.

Redis down: keys seen in the last minutes still authenticate (from memory) and limits are
not enforced, so serving goes on; while Redis is up every request asks it, so a revoked
key is rejected at once."""
from __future__ import annotations

import hashlib
import logging
import time

from services.errors import NotAuthenticated, ServiceError
from services.tenancy.limits import Lease, TenantLimiter
from services.tenancy.tenants import Tenant, TenantStore

log = logging.getLogger(__name__)


def bearer_token(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


class TenantGate:
    def __init__(self, store: TenantStore, limiter: TenantLimiter, *, enabled: bool = True,
                 outage_grace_s: float = 300.0):
        self.store = store
        self.limiter = limiter
        self.enabled = enabled
        self.outage_grace_s = outage_grace_s
        self._seen: dict[str, tuple[Tenant, float]] = {}  # sha256(key) -> tenant, when last confirmed

    def authenticate(self, authorization: str | None) -> Tenant | None:
        """The calling tenant; None when auth is off (shared adapters only). Raises NotAuthenticated."""
        if not self.enabled:
            return None
        key = bearer_token(authorization)
        if key is None:
            raise NotAuthenticated("missing API key: send 'Authorization: Bearer <key>'")
        digest = hashlib.sha256(key.encode()).hexdigest()
        try:
            tenant = self.store.authenticate(key)
        except Exception as err:  # Redis unreachable: fall back to recently confirmed keys
            seen = self._seen.get(digest)
            if seen and time.monotonic() - seen[1] < self.outage_grace_s:
                log.warning("tenant store unreachable, using a recently confirmed key: %s", type(err).__name__)
                return seen[0]
            raise NotAuthenticated("cannot verify the API key right now; retry shortly") from err
        if tenant is None:
            self._seen.pop(digest, None)
            raise NotAuthenticated("invalid API key")
        self._seen[digest] = (tenant, time.monotonic())
        return tenant

    def admit(self, tenant: Tenant | None, request_id: str, max_tokens: int) -> Lease | None:
        if tenant is None:
            return None
        try:
            return self.limiter.admit(tenant, request_id, max_tokens)
        except ServiceError:  # over a limit (429) or max_tokens (400): the caller's answer
            raise
        except Exception as err:
            log.warning("limits not enforced, Redis unreachable: %s", type(err).__name__)
            return None

    def finish(self, tenant: Tenant | None, lease: Lease | None, **usage: int) -> None:
        """Release the concurrency slot and count usage; never fails the request."""
        if tenant is None:
            return
        try:
            if lease is not None:
                self.limiter.release(lease)
            self.limiter.count(tenant.name, **usage)
        except Exception as err:
            log.warning("usage not recorded, Redis unreachable: %s", type(err).__name__)
