"""Writers racing on one adapter (each with its own Redis connection, as separate processes would)."""
from __future__ import annotations

import threading

import redis
from registry_fixtures import BASE_MODEL, card, embeddings, tiny_config

from services.lora.adapter_files import adapter_checksum
from services.registry.registry import AdapterNotFound, AdapterRegistry, RegistryError, VersionConflict


def registries(redis_server, store, count):
    return [AdapterRegistry(redis.Redis.from_url(redis_server.url), store, base_config=tiny_config(),
                            base_model=BASE_MODEL) for _ in range(count)]


def race(*calls):
    """Run the calls in threads released together; returns each result or raised error."""
    barrier = threading.Barrier(len(calls))
    results = [None] * len(calls)

    def run(i, call):
        barrier.wait()
        try:
            results[i] = call()
        except RegistryError as err:
            results[i] = err

    threads = [threading.Thread(target=run, args=(i, c)) for i, c in enumerate(calls)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def assert_consistent(registry, store, name):
    """Pointers name existing versions; every version has its embeddings and intact files; no stray files."""
    rec = registry.get(name)
    assert rec.active_version is None or rec.active_version in rec.versions
    if rec.canary is not None:
        assert rec.canary.version in rec.versions and rec.canary.version != rec.active_version
    for version, vrec in rec.versions.items():
        assert registry.card_embeddings(name, version).shape == vrec.embedding_shape
        assert adapter_checksum(store.path(name, version)) == vrec.checksum
    assert sorted(store.versions(name)) == sorted(rec.versions)
    return rec


def test_racing_adds_each_get_their_own_version(redis_client, redis_server, store, adapter_dir):
    writers = registries(redis_server, store, 4)
    sources = [adapter_dir(seed) for seed in range(4)]
    generation = writers[0].generation()
    results = race(*[lambda w=w, s=s: w.add_version("hot", s, card("hot"), embeddings()) for w, s in
                     zip(writers, sources)])
    assert all(not isinstance(r, Exception) for r in results), results
    rec = assert_consistent(writers[0], store, "hot")
    assert sorted(r.version for r in results) == sorted(rec.versions) and len(rec.versions) == 4
    assert {r.checksum for r in results} == {adapter_checksum(s) for s in sources}
    assert rec.active_version in rec.versions
    assert writers[0].generation() == generation + 4
    assert [e["action"] for e in writers[0].history("hot")] == ["add_version+activate"] * 4


def test_racing_adds_of_the_same_files_register_once(redis_client, redis_server, store, adapter_dir):
    writers = registries(redis_server, store, 2)
    results = race(*[lambda w=w: w.add_version("same", adapter_dir(1, f"copy{id(w)}"), card("same"), embeddings())
                     for w in writers])
    assert sorted(type(r).__name__ for r in results) == ["VersionConflict", "VersionRecord"]
    assert list(assert_consistent(writers[0], store, "same").versions) == ["v1"]


def test_activation_racing_retirement_never_dangles(redis_client, redis_server, store, adapter_dir):
    a, b = registries(redis_server, store, 2)
    for round_ in range(6):
        name = f"flip{round_}"
        a.add_version(name, adapter_dir(0), card(name), embeddings(), activate=False)
        a.add_version(name, adapter_dir(1), card(name), embeddings())
        activated, retired = race(lambda: a.activate(name, "v1"), lambda: b.retire_version(name, "v1"))
        a.collect_garbage(min_age_s=0)  # a retired version's files wait for this
        rec = assert_consistent(a, store, name)
        if isinstance(retired, VersionConflict):  # activation won: v1 is active and kept
            assert rec.active_version == "v1" and not isinstance(activated, Exception)
        else:  # retirement won: activation found no v1 and v2 stays active
            assert isinstance(activated, AdapterNotFound) and "v1" not in rec.versions
            assert rec.active_version == "v2"


def test_canary_and_activation_racing_keep_the_record_valid(redis_client, redis_server, store, adapter_dir):
    a, b = registries(redis_server, store, 2)
    for seed in range(3):
        a.add_version("cn", adapter_dir(seed), card("cn"), embeddings())
    for i in range(20):
        race(lambda: a.activate("cn", f"v{1 + i % 3}"), lambda: b.set_canary("cn", f"v{1 + (i + 1) % 3}", 25),
             lambda: b.clear_canary("cn") if i % 4 == 0 else None)
        assert_consistent(a, store, "cn")
