"""Tenants, hashed API keys, limits shared through a real Redis server."""
from __future__ import annotations

import redis
import pytest

from services.errors import LimitExceeded
from services.tenancy.limits import TenantLimiter
from services.tenancy.tenants import TenantError, TenantLimits, TenantStore, UnknownTenant, hash_key


@pytest.fixture
def store(redis_client):
    return TenantStore(redis_client)


def test_keys_are_stored_hashed_and_authenticate(store, redis_client):
    key = store.add("acme")
    assert store.authenticate(key).name == "acme"
    read = {"string": redis_client.get, "set": redis_client.smembers}
    dump = " ".join(str(read[redis_client.type(k)](k)) for k in redis_client.keys("*"))
    assert key not in dump and hash_key(key) in " ".join(redis_client.keys("*"))
    assert store.authenticate(key + "x") is None
    assert store.authenticate("not-a-key") is None


def test_revoke_rejects_at_once_and_names_are_checked(store):
    k1 = store.add("acme")
    k2 = store.issue_key("acme")
    assert store.revoke("acme") == 2
    assert store.authenticate(k1) is None and store.authenticate(k2) is None
    with pytest.raises(UnknownTenant, match="does not exist"):
        store.revoke("acme")
    with pytest.raises(TenantError, match="must be"):
        store.add("../evil")
    store.add("beta")
    with pytest.raises(TenantError, match="exists already"):
        store.add("beta")
    assert [t.name for t in store.list()] == ["beta"]


def test_rate_limit_is_shared_across_limiter_instances(store, redis_server):
    store.add("acme", TenantLimits(requests_per_second=0.5, burst=3, max_concurrent=100))
    tenant = store.get("acme")
    # two ingress replicas = two processes' worth of clients and limiters
    replicas = [TenantLimiter(redis.Redis.from_url(redis_server.url)) for _ in range(2)]
    admitted = 0
    with pytest.raises(LimitExceeded) as exc:
        for i in range(10):
            replicas[i % 2].admit(tenant, f"r{i}", 16)
            admitted += 1
    assert admitted == 3
    assert exc.value.retry_after_s >= 1
    assert replicas[0].usage("acme")["rejected"] == 1


def test_concurrency_leases_and_max_tokens(store, redis_client):
    store.add("acme", TenantLimits(max_concurrent=2, burst=100, max_tokens=32))
    tenant = store.get("acme")
    limiter = TenantLimiter(redis_client)
    a, b = limiter.admit(tenant, "a", 8), limiter.admit(tenant, "b", 8)
    with pytest.raises(LimitExceeded, match="concurrent"):
        limiter.admit(tenant, "c", 8)
    limiter.release(a)
    limiter.admit(tenant, "c", 8)
    limiter.release(b)
    with pytest.raises(ValueError, match="at most 32"):
        limiter.admit(tenant, "d", 33)


def test_expired_leases_free_their_slot(store, redis_client):
    store.add("acme", TenantLimits(max_concurrent=1, burst=100))
    tenant = store.get("acme")
    limiter = TenantLimiter(redis_client, lease_s=0.0)  # a crashed replica's lease: already expired
    limiter.admit(tenant, "crashed", 8)
    limiter.admit(tenant, "next", 8)


def test_usage_counters(store, redis_client):
    limiter = TenantLimiter(redis_client)
    limiter.count("acme", requests=1, prompt_tokens=10, completion_tokens=5)
    limiter.count("acme", requests=1, completion_tokens=2)
    assert limiter.usage("acme") == {"requests": 2, "prompt_tokens": 10, "completion_tokens": 7}
