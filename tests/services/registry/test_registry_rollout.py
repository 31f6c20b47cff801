"""AdapterRegistry over a real Redis with real PEFT folders: versions, pointers, tenants, audit."""
from __future__ import annotations

import numpy as np
import pytest
import redis
from registry_fixtures import BASE_MODEL, card, embeddings, tiny_config

from services.lora.adapter_files import adapter_checksum
from services.registry.registry import (AccessDenied, AdapterNotFound, AdapterRegistry, InvalidAdapter,
                                        RegistryError, VersionConflict)


def test_add_version_records_everything_and_stages_the_files(registry, adapter_dir, store):
    src = adapter_dir(0)
    emb = embeddings(2, 8)
    generation = registry.generation()
    vrec = registry.add_version("math", src, card("math", "arith"), emb, actor="alice")
    assert vrec.version == "v1" and vrec.rank == 4 and vrec.scaling == 2.0
    assert vrec.target_modules == ["q_proj", "v_proj"]
    assert vrec.checksum == adapter_checksum(src) == adapter_checksum(store.path("math", "v1"))
    assert vrec.path == str(store.path("math", "v1")) and vrec.created_by == "alice"
    assert vrec.embedding_shape == (2, 8)
    rec = registry.get("math")
    assert (rec.active_version, rec.base_model, rec.domain, rec.visibility, rec.owner_tenant) == \
        ("v1", BASE_MODEL, "arith", "shared", None)
    assert rec.versions == {"v1": vrec}
    got = registry.card_embeddings("math")
    assert got.dtype == np.float32 and got.shape == (2, 8)
    np.testing.assert_array_equal(got, emb)
    assert registry.generation() == generation + 1
    [entry] = registry.history("math")
    assert (entry["actor"], entry["action"], entry["version"]) == ("alice", "add_version+activate", "v1")
    assert entry["at"] > 0


def test_activate_rollback_and_canary(registry, adapter_dir):
    registry.add_version("m", adapter_dir(0), card("m", "d1"), embeddings())
    registry.add_version("m", adapter_dir(1), card("m", "d2"), embeddings(seed=1), activate=False)
    assert registry.get("m").active_version == "v1"
    assert registry.get("m").domain == "d1"  # the active version's card decides

    registry.set_canary("m", "v2", 10)
    canary = registry.get("m").canary
    assert (canary.version, canary.percent, canary.auto) == ("v2", 10, False)
    with pytest.raises(VersionConflict, match="active version other than 'v1'"):
        registry.set_canary("m", "v1", 10)
    with pytest.raises(InvalidAdapter, match="canary percent 100"):
        registry.set_canary("m", "v2", 100)
    with pytest.raises(AdapterNotFound, match="no version 'v9'"):
        registry.set_canary("m", "v9", 5)

    rec = registry.activate("m", "v2", actor="bob")  # promotes the canary
    assert (rec.active_version, rec.canary, rec.domain) == ("v2", None, "d2")
    generation = registry.generation()
    registry.activate("m", "v2")  # already active: no write
    assert registry.generation() == generation

    registry.add_version("m", adapter_dir(2), card("m", "d3"), embeddings(seed=2))
    assert registry.get("m").active_version == "v3"
    assert registry.rollback("m") == "v2"
    assert registry.rollback("m") == "v1"
    with pytest.raises(VersionConflict, match="no earlier active version"):
        registry.rollback("m")
    assert registry.get("m").active_version == "v1"
    actions = [e["action"] for e in registry.history("m")]
    assert actions == ["add_version+activate", "add_version", "set_canary", "activate", "add_version+activate",
                       "rollback", "rollback"]
    assert [e["actor"] for e in registry.history("m")][3] == "bob"


def test_canary_of_a_rolled_back_version_is_cleared(registry, adapter_dir):
    registry.add_version("c", adapter_dir(0), card("c"), embeddings())
    registry.add_version("c", adapter_dir(1), card("c"), embeddings())
    registry.set_canary("c", "v1", 50)
    assert registry.rollback("c") == "v1"
    assert registry.get("c").canary is None
    registry.clear_canary("c")


def test_retire_keeps_files_and_history_and_never_reuses_versions(registry, adapter_dir, store):
    registry.add_version("r", adapter_dir(0), card("r"), embeddings())
    registry.retire("r", actor="ops")
    with pytest.raises(AdapterNotFound, match="'r' is not registered"):
        registry.get("r")
    assert registry.snapshot() == []
    assert store.versions("r") == ["v1"]  # a replica may still serve it
    assert registry.history("r")[-1]["action"] == "retire"
    assert registry.collect_garbage(in_use=["r@v1"], min_age_s=0) == []
    assert registry.collect_garbage(min_age_s=0) == ["r@v1"]
    assert store.names() == []
    assert registry.add_version("r", adapter_dir(1), card("r"), embeddings()).version == "v2"


def test_retire_version_refuses_the_active_one(registry, adapter_dir, redis_client):
    registry.add_version("x", adapter_dir(0), card("x"), embeddings())
    registry.add_version("x", adapter_dir(1), card("x"), embeddings())
    with pytest.raises(VersionConflict, match="active or in canary"):
        registry.retire_version("x", "v2")
    registry.retire_version("x", "v1")
    assert list(registry.get("x").versions) == ["v2"]
    with pytest.raises(AdapterNotFound):
        registry.card_embeddings("x", "v1")
    with pytest.raises(VersionConflict, match="no earlier active version"):  # v1 is gone
        registry.rollback("x")


def test_tenants_see_shared_plus_their_own(registry, adapter_dir):
    registry.add_version("pub", adapter_dir(0), card("pub"), embeddings())
    registry.add_version("mine", adapter_dir(1), card("mine"), embeddings(), tenant="acme", visibility="private")
    registry.add_version("theirs", adapter_dir(2), card("theirs"), embeddings(), tenant="globex",
                         visibility="private")
    assert [r.name for r in registry.list()] == ["pub"]
    assert [r.name for r in registry.list("acme")] == ["mine", "pub"]
    assert [r.name for r in registry.list("globex")] == ["pub", "theirs"]
    assert [r.name for r in registry.snapshot()] == ["mine", "pub", "theirs"]
    with pytest.raises(AccessDenied, match="belongs to tenant 'acme'"):
        registry.add_version("mine", adapter_dir(3), card("mine"), embeddings(), tenant="globex",
                             visibility="private")
    with pytest.raises(AccessDenied, match="belongs to the operator"):
        registry.add_version("pub", adapter_dir(3), card("pub"), embeddings(), tenant="acme")
    with pytest.raises(VersionConflict, match="loraretriever adapters visibility"):
        registry.add_version("mine", adapter_dir(3), card("mine"), embeddings(), tenant="acme")
    with pytest.raises(InvalidAdapter, match="needs an owner tenant"):
        registry.add_version("anon", adapter_dir(3), card("anon"), embeddings(), visibility="private")
    registry.set_visibility("mine", "shared", tenant="acme")
    assert [r.name for r in registry.list()] == ["mine", "pub"]


def test_pinned_flag(registry, adapter_dir):
    registry.add_version("p", adapter_dir(0), card("p"), embeddings())
    assert registry.set_pinned("p", True).pinned and registry.get("p").pinned
    assert not registry.set_pinned("p", False).pinned


def test_a_reader_without_base_config_cannot_add(redis_client, store, adapter_dir):
    reader = AdapterRegistry(redis_client, store, base_model=BASE_MODEL)
    assert reader.snapshot() == []
    with pytest.raises(RegistryError, match="no base_config"):
        reader.add_version("a", adapter_dir(0), card("a"), embeddings())


def test_works_with_a_bytes_client(redis_server, store, adapter_dir):
    client = redis.Redis.from_url(redis_server.url)  # decode_responses off, as services.wiring makes it
    client.flushdb()
    reg = AdapterRegistry(client, store, base_config=tiny_config(), base_model=BASE_MODEL)
    reg.add_version("b", adapter_dir(0), card("b"), embeddings())
    assert reg.get("b").active_version == "v1" and reg.history("b")[0]["version"] == "v1"


def test_unknown_adapter(registry):
    for call in (lambda: registry.get("nope"), lambda: registry.activate("nope", "v1"),
                 lambda: registry.rollback("nope"), lambda: registry.retire("nope"),
                 lambda: registry.history("nope"), lambda: registry.card_embeddings("nope")):
        with pytest.raises(AdapterNotFound, match="'nope' is not registered"):
            call()


def test_a_registry_for_another_base_model_cannot_extend_an_adapter(registry, make_registry, adapter_dir):
    registry.add_version("m", adapter_dir(0), card("m"), embeddings())
    other = make_registry(base_model="other-base")
    with pytest.raises(VersionConflict, match="registered for base model 'tiny-llama', not 'other-base'"):
        other.add_version("m", adapter_dir(1), card("m"), embeddings())
