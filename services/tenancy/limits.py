"""Per-tenant admission limits and usage counters, enforced in Redis.

Every ingress replica asks Redis, so a tenant's limits hold across replicas, not per
process. Both checks are single Lua scripts (atomic, one round trip each)."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import redis

from services.errors import InvalidRequest, LimitExceeded
from services.tenancy.tenants import Tenant

# Token bucket: KEYS[1] bucket hash; ARGV rate, burst, now. Returns {allowed, retry_after_ms}.
_BUCKET = """
local rate, burst, now = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local state = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens, ts = tonumber(state[1]) or burst, tonumber(state[2]) or now
tokens = math.min(burst, tokens + (now - ts) * rate)
local allowed, wait_ms = 0, math.ceil((1 - tokens) / rate * 1000)
if tokens >= 1 then tokens, allowed, wait_ms = tokens - 1, 1, 0 end
redis.call('HSET', KEYS[1], 'tokens', tokens, 'ts', now)
redis.call('PEXPIRE', KEYS[1], math.ceil(burst / rate * 1000) + 1000)
return {allowed, wait_ms}
"""

# Concurrency leases: KEYS[1] zset of request id -> lease expiry; ARGV max, now, id, lease_s.
_LEASE = """
local max, now = tonumber(ARGV[1]), tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= max then return 0 end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[4]), ARGV[3])
redis.call('EXPIRE', KEYS[1], math.ceil(tonumber(ARGV[4])) + 1)
return 1
"""


@dataclass
class Lease:
    key: str
    request_id: str


class TenantLimiter:
    def __init__(self, client: redis.Redis, *, lease_s: float = 300.0, prefix: str = "lr:"):
        self.r = client
        self.p = prefix
        self.lease_s = lease_s  # a crashed ingress's leases expire after this
        self._bucket = client.register_script(_BUCKET)
        self._lease = client.register_script(_LEASE)

    def admit(self, tenant: Tenant, request_id: str, max_tokens: int) -> Lease:
        """Check every limit; raises LimitExceeded (InvalidRequest for max_tokens) else returns a lease."""
        lim = tenant.limits
        if max_tokens > lim.max_tokens:
            raise InvalidRequest(f"max_tokens may be at most {lim.max_tokens} for this tenant", param="max_tokens")
        now = time.time()
        allowed, wait_ms = self._bucket(keys=[f"{self.p}rate:{tenant.name}"],
                                        args=[lim.requests_per_second, lim.burst, now])
        if not allowed:
            self.count(tenant.name, rejected=1)
            raise LimitExceeded(f"rate limit of {lim.requests_per_second:g} requests/s exceeded",
                                retry_after_s=max(1, math.ceil(wait_ms / 1000)))
        key = f"{self.p}inflight:{tenant.name}"
        if not self._lease(keys=[key], args=[lim.max_concurrent, now, request_id, self.lease_s]):
            self.count(tenant.name, rejected=1)
            raise LimitExceeded(f"at most {lim.max_concurrent} concurrent requests", retry_after_s=1)
        return Lease(key, request_id)

    def release(self, lease: Lease) -> None:
        self.r.zrem(lease.key, lease.request_id)

    def count(self, tenant: str, **counters: int) -> None:
        """Add to the tenant's usage counters (requests, prompt_tokens, completion_tokens, rejected)."""
        pipe = self.r.pipeline(transaction=False)
        for field, n in counters.items():
            pipe.hincrby(f"{self.p}usage:{tenant}", field, n)
        pipe.execute()

    def usage(self, tenant: str) -> dict[str, int]:
        raw = self.r.hgetall(f"{self.p}usage:{tenant}")
        return {(k.decode() if isinstance(k, bytes) else k): int(v) for k, v in raw.items()}
