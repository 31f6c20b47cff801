"""State across `down` and `up`: the Redis that `up` starts (LocalCluster) keeps tenants, keys,
adapters, versions and the audit log in its data folder (append-only file), and the adapter
store is made to agree with the registry at start, so version numbers never drift."""
from __future__ import annotations

import pytest
from registry_fixtures import BASE_MODEL, card, embeddings, tiny_config

from cluster.bringup import LocalCluster
from cluster.redis_server import free_port
from services.config import AppConfig
from services.registry.registry import AdapterRegistry
from services.registry.store import AdapterStore
from services.tenancy.tenants import TenantStore
from services.wiring import redis_client


@pytest.fixture
def local(tmp_path, monkeypatch):
    """A LocalCluster's own Redis in a home of its own, started and stopped as `up` and `down` do."""
    monkeypatch.setenv("LORARETRIEVER_HOME", str(tmp_path / "home"))
    cfg = AppConfig.model_validate({"redis": {"url": f"redis://127.0.0.1:{free_port()}/0", "start_local": True},
                                    "adapter_store": {"path": str(tmp_path / "store")}})
    clusters = []

    def up() -> LocalCluster:
        cluster = LocalCluster(cfg, demo=False)
        clusters.append(cluster)
        cluster._start_redis()
        cluster._reconcile_store()
        return cluster

    yield up, cfg
    for cluster in clusters:
        if cluster.redis:
            cluster.redis.stop()


def registry_of(cfg: AppConfig) -> AdapterRegistry:
    return AdapterRegistry(redis_client(cfg), AdapterStore(cfg.adapter_store.path), base_config=tiny_config(),
                           base_model=BASE_MODEL)


def test_down_and_up_keep_tenants_adapters_versions_and_the_audit_log(local, adapter_dir, tmp_path):
    up, cfg = local
    first = up()
    assert (tmp_path / "home" / "redis").is_dir()
    registry = registry_of(cfg)
    registry.add_version("m", adapter_dir(0), card("m"), embeddings())
    registry.add_version("m", adapter_dir(1), card("m"), embeddings(), activate=False)
    registry.set_canary("m", "v2", 10, actor="ops")
    key = TenantStore(redis_client(cfg)).add("acme")
    history = registry.history("m")
    first.redis.stop()  # what `down` does to the Redis it owns

    up()
    registry = registry_of(cfg)
    record = registry.get("m")
    assert (record.active_version, sorted(record.versions), record.canary.version) == ("v1", ["v1", "v2"], "v2")
    assert registry.history("m") == history
    assert TenantStore(redis_client(cfg)).authenticate(key).name == "acme"
    assert registry.add_version("m", adapter_dir(2), card("m"), embeddings()).version == "v3"  # no drift
    assert registry.card_embeddings("m", "v1").shape == (2, 8)


def test_files_the_registry_lost_are_deleted_at_start_so_numbers_do_not_drift(local, adapter_dir, tmp_path):
    up, cfg = local
    first = up()
    registry_of(cfg).add_version("m", adapter_dir(0), card("m"), embeddings())
    first.redis.stop()
    for path in (tmp_path / "home" / "redis").iterdir():  # a Redis that lost its data
        if path.is_dir():
            for f in path.iterdir():
                f.unlink()
            path.rmdir()
        else:
            path.unlink()

    up()
    registry = registry_of(cfg)
    assert registry.snapshot() == [] and registry.store.names() == []
    assert registry.add_version("m", adapter_dir(0), card("m"), embeddings()).version == "v1"


def test_registered_versions_without_files_are_reported(local, adapter_dir, caplog):
    up, cfg = local
    first = up()
    registry = registry_of(cfg)
    registry.add_version("m", adapter_dir(0), card("m"), embeddings())
    registry.store.delete("m", "v1")
    assert registry.missing_files() == ["m@v1"]
    first.redis.stop()
    with caplog.at_level("WARNING", logger="loraretriever.up"):
        up()
    assert "m@v1" in caplog.text and "adapters retire NAME@VERSION" in caplog.text
