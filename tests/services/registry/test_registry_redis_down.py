"""Redis stopped mid-test (a real redis-server): clear errors, nothing half-applied."""
from __future__ import annotations

import pytest
import redis
from registry_fixtures import BASE_MODEL, card, embeddings, redis_state, tiny_config, tree_state

from cluster.redis_server import RedisServer
from services.registry.registry import AdapterRegistry, RegistryUnavailable
from services.registry.store import AdapterStore


@pytest.fixture
def own_server():
    """A server this test may stop (the module's shared one must stay up)."""
    server = RedisServer().start()
    yield server
    server.stop()


def registry_on(server: RedisServer, store: AdapterStore) -> AdapterRegistry:
    client = redis.Redis.from_url(server.url, socket_timeout=1, socket_connect_timeout=1)
    return AdapterRegistry(client, store, base_config=tiny_config(), base_model=BASE_MODEL)


def test_every_call_fails_clearly_and_the_store_is_untouched(own_server, tmp_path, adapter_dir):
    store = AdapterStore(tmp_path / "store")
    registry = registry_on(own_server, store)
    registry.add_version("a", adapter_dir(0), card("a"), embeddings())
    registry.add_version("a", adapter_dir(1), card("a"), embeddings(), activate=False)
    files = tree_state(store.root)
    own_server.stop()

    unavailable = r"Redis at 127\.0\.0\.1:\d+ is unavailable"
    with pytest.raises(RegistryUnavailable, match=f"cannot add a version of adapter 'a': {unavailable}"):
        registry.add_version("a", adapter_dir(2), card("a"), embeddings())
    with pytest.raises(RegistryUnavailable, match=f"cannot add a version of adapter 'b': {unavailable}"):
        registry.add_version("b", adapter_dir(2), card("b"), embeddings())
    for action, call in [("activate", lambda: registry.activate("a", "v2")),
                         ("rollback", lambda: registry.rollback("a")),
                         ("set_canary", lambda: registry.set_canary("a", "v2", 5)),
                         ("retire", lambda: registry.retire("a")),
                         ("read adapter", lambda: registry.get("a")),
                         ("read the adapter registry", registry.snapshot),
                         ("read the registry generation", registry.generation),
                         ("read adapter .a.", lambda: registry.card_embeddings("a", "v1"))]:
        with pytest.raises(RegistryUnavailable, match=action):
            call()
    assert tree_state(store.root) == files


def test_redis_dying_between_staging_and_commit(tmp_path, adapter_dir, monkeypatch):
    """The transaction never lands; the staged copy is either deleted or, when Redis cannot
    even say whether it landed, kept for collect_garbage, which removes it once Redis is back."""
    server = RedisServer(data_dir=tmp_path / "redis").start()  # its data survive a restart
    try:
        store = AdapterStore(tmp_path / "store")
        registry = registry_on(server, store)
        registry.add_version("a", adapter_dir(0), card("a"), embeddings())
        redis.Redis.from_url(server.url).save()
        before_redis, before_files = redis_state(server.url), tree_state(store.root)

        real_stage = store.stage

        def stage_then_lose_redis(*args, **kwargs):
            staged = real_stage(*args, **kwargs)
            server.stop()
            return staged

        monkeypatch.setattr(store, "stage", stage_then_lose_redis)
        with pytest.raises(RegistryUnavailable, match=r"a@v2: .*unknown whether.*collect_garbage"):
            registry.add_version("a", adapter_dir(1), card("a"), embeddings())
        monkeypatch.undo()

        server = RedisServer(port=server.port, data_dir=tmp_path / "redis").start()
        assert redis_state(server.url) == before_redis  # the record never changed
        assert registry.get("a").versions.keys() == {"v1"}
        assert registry.collect_garbage(min_age_s=0) == ["a@v2"]
        assert tree_state(store.root) == before_files
    finally:
        server.stop()


def test_serving_snapshot_outlives_redis(own_server, tmp_path, adapter_dir):
    """The serving side's catalog keeps resolving known adapters while Redis is away."""
    from services.serving.catalog import CatalogCache

    registry = registry_on(own_server, AdapterStore(tmp_path / "store"))
    registry.add_version("a", adapter_dir(0), card("a"), embeddings())
    registry.add_version("a", adapter_dir(1), card("a"), embeddings(), activate=False)
    registry.set_canary("a", "v2", 50)
    cache = CatalogCache(registry, min_interval_s=0)
    assert cache.get().generation == registry.generation()
    own_server.stop()
    catalog = cache.get()
    served = {catalog.resolve("a", tenant=None, request_id=f"req{i}")[1] for i in range(40)}
    assert served == {"v1", "v2"}  # active and canary both still served
