"""Tenants and their API keys, in Redis.

Keys are random 32-byte tokens shown once at creation; Redis stores only their SHA-256,
so a leaked database does not leak usable keys. Revocation deletes the hash: the next
request with that key is rejected (no cache to wait out)."""
from __future__ import annotations

import hashlib
import re
import secrets
import time

import redis
from pydantic import Field

from services.errors import InvalidRequest, NotFound
from services.schemas import Strict

KEY_PREFIX = "lr-"
TENANT_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")


class TenantError(InvalidRequest):
    """Bad tenant input (a name that is not valid or is taken); the message says which."""


class UnknownTenant(NotFound):
    """No tenant of that name."""


class TenantLimits(Strict):
    requests_per_second: float = Field(20.0, gt=0, description="sustained request rate")
    burst: int = Field(40, ge=1, description="requests allowed at once above the rate")
    max_concurrent: int = Field(16, ge=1, description="requests in flight at once")
    max_tokens: int = Field(512, ge=1, description="largest max_tokens per request")


class Tenant(Strict):
    name: str
    created_at: float
    limits: TenantLimits = Field(default_factory=TenantLimits)


def hash_key(api_key: str) -> str:
    return hashlib.sha256(api_key.encode()).hexdigest()


class TenantStore:
    def __init__(self, client: redis.Redis, prefix: str = "lr:"):
        self.r = client
        self.p = prefix

    def _tenant_key(self, name: str) -> str:
        return f"{self.p}tenant:{name}"

    def _apikey_key(self, digest: str) -> str:
        return f"{self.p}apikey:{digest}"

    def add(self, name: str, limits: TenantLimits | None = None) -> str:
        """Create a tenant; returns its API key (the only time it is visible)."""
        if not TENANT_NAME.match(name):
            raise TenantError(f"tenant name '{name}' must be 1-63 of a-z, 0-9, '-', '_' and start alphanumeric")
        tenant = Tenant(name=name, created_at=time.time(), limits=limits or TenantLimits())
        if not self.r.set(self._tenant_key(name), tenant.model_dump_json(), nx=True):
            raise TenantError(f"tenant '{name}' exists already")
        return self.issue_key(name)

    def issue_key(self, name: str) -> str:
        """A further key for an existing tenant (key rotation)."""
        self.get(name)
        api_key = KEY_PREFIX + secrets.token_urlsafe(32)
        digest = hash_key(api_key)
        pipe = self.r.pipeline(transaction=True)
        pipe.set(self._apikey_key(digest), name)
        pipe.sadd(f"{self.p}tenant-keys:{name}", digest)
        pipe.execute()
        return api_key

    def get(self, name: str) -> Tenant:
        raw = self.r.get(self._tenant_key(name))
        if raw is None:
            raise UnknownTenant(f"tenant '{name}' does not exist")
        return Tenant.model_validate_json(raw)

    def list(self) -> list[Tenant]:
        names = sorted(k.decode().rsplit(":", 1)[1] if isinstance(k, bytes) else k.rsplit(":", 1)[1]
                       for k in self.r.scan_iter(match=f"{self.p}tenant:*"))
        return [self.get(n) for n in names]

    def authenticate(self, api_key: str) -> Tenant | None:
        """The tenant owning this key, or None (unknown or revoked key)."""
        if not api_key.startswith(KEY_PREFIX) or len(api_key) > 128:
            return None
        name = self.r.get(self._apikey_key(hash_key(api_key)))
        if name is None:
            return None
        return self.get(name.decode() if isinstance(name, bytes) else name)

    def revoke(self, name: str) -> int:
        """Delete the tenant and all its keys at once; returns how many keys died."""
        self.get(name)
        keys_set = f"{self.p}tenant-keys:{name}"
        digests = [d.decode() if isinstance(d, bytes) else d for d in self.r.smembers(keys_set)]
        pipe = self.r.pipeline(transaction=True)
        for d in digests:
            pipe.delete(self._apikey_key(d))
        pipe.delete(keys_set, self._tenant_key(name))
        pipe.execute()
        return len(digests)
