"""One shared index, two writers: no search ever sees an empty or partial index.

The shared collection is what a Qdrant server would hold; no server binary exists here, so an
embedded Qdrant client stands in for it, each call under one lock (a server applies each request
atomically; the embedded client is not thread-safe). Everything else is the product's: the
registry over a real redis-server and adapter store, the writer lock in that Redis, AdapterIndex
in its shared mode (searches and writes through the alias, rebuilds into a new collection) and
IndexSync, exactly as two retriever replicas run them."""
from __future__ import annotations

import random
import threading
import time

import numpy as np
import pytest
from registered_zoo import register_tiny_zoo
from qdrant_client import QdrantClient

from services.retrieval.index import AdapterIndex
from services.schemas import AdapterCard
from services.serving.index_sync import REBUILD_EPOCH_KEY, IndexSync, IndexWriterBusy, IndexWriterLock

RACE_S = 8.0


class SerializedClient:
    """Every call of the wrapped client under one lock, as a server serializes its requests."""

    def __init__(self, client: QdrantClient):
        self._client, self._lock = client, threading.Lock()

    def __getattr__(self, name):
        method = getattr(self._client, name)

        def call(*args, **kwargs):
            with self._lock:
                return method(*args, **kwargs)
        return call


@pytest.fixture
def stack(tiny_zoo, redis_server, tmp_path):
    admin, client, _ = register_tiny_zoo(tiny_zoo, redis_server, tmp_path / "store", db=6)
    yield admin, client
    client.flushdb()


def test_two_writers_racing_adds_retires_and_rebuilds_never_show_a_partial_index(stack, tiny_zoo):
    admin, r = stack
    registry, dim = admin.registry, admin.embedder.dim
    stable = sorted(tiny_zoo.adapters)  # never retired: every search must find all of them
    source = tiny_zoo.cards[0]
    source_vectors = admin.embedder.encode([s.inputs for s in source.sample])  # (samples, dim)
    queries = admin.embedder.encode([q.inputs for q in tiny_zoo.queries])  # (queries, dim)
    server = SerializedClient(QdrantClient(":memory:"))

    writers = [IndexSync(registry, AdapterIndex(dim, client=server), redis=r, writer_id=f"writer-{i}",
                         min_interval_s=0.0) for i in range(2)]
    reader = AdapterIndex(dim, client=server)
    stop = threading.Event()
    problems: list[str] = []
    counts = {"searches": 0, "rebuilds": 0, "turns": [0, 0], "churn adds": 0, "churn retires": 0}

    def write(i: int) -> None:
        sync, rng = writers[i], random.Random(i)
        while not stop.is_set():
            sync.refresh()
            if sync.writes:
                counts["turns"][i] += 1
                if rng.random() < 0.3:
                    try:
                        sync.rebuild()
                        counts["rebuilds"] += 1
                    except IndexWriterBusy:
                        pass
                if rng.random() < 0.5:
                    sync.release()  # hand over: the other writer takes the next turn
            time.sleep(0.01)

    def churn() -> None:
        rng, n = random.Random(7), 0
        while not stop.is_set():
            name = f"churn-{n}"
            card = AdapterCard(model_name=name, sample=source.sample, domain=source.domain)
            registry.add_version(name, tiny_zoo.adapters[source.model_name], card, source_vectors)
            counts["churn adds"] += 1
            if rng.random() < 0.3:
                r.set(REBUILD_EPOCH_KEY, str(time.time()))  # an operator's `index rebuild`
            time.sleep(0.05)
            registry.retire(name)
            counts["churn retires"] += 1
            n += 1

    def search() -> None:
        while not stop.is_set():
            try:
                results = reader.search(queries, top_k=8)
            except Exception as err:  # the alias must always name a collection
                problems.append(f"search failed: {err!r}")
                continue
            counts["searches"] += 1
            for result in results:
                found = {a.name for a in result.adapters}
                if not found:
                    problems.append("a search returned no adapter at all")
                elif not set(stable) <= found:
                    problems.append(f"a search missed {sorted(set(stable) - found)}")

    writers[0].refresh()  # the first writer creates and fills the collection before searches start
    threads = [threading.Thread(target=write, args=(i,)) for i in range(2)]
    threads += [threading.Thread(target=churn)] + [threading.Thread(target=search) for _ in range(2)]
    for t in threads:
        t.start()
    time.sleep(RACE_S)
    stop.set()
    for t in threads:
        t.join(60)

    assert not problems, f"{len(problems)} bad searches of {counts['searches']}, first: {problems[:3]}"
    assert counts["searches"] >= 20 and counts["churn adds"] >= 5 and counts["rebuilds"] >= 2, counts
    assert all(turns > 0 for turns in counts["turns"]), f"both writers must have written: {counts}"
    # no leftovers: the alias's collection and the one it replaced, nothing else
    assert len([c for c in server.get_collections().collections if c.name.startswith("adapters--ix-")]) <= 2
    # and the index ends in step with the registry
    final = writers[0] if writers[0].writer.hold() else writers[1]
    final.refresh(force=True)
    live = sorted(rec.name for rec in registry.snapshot() if rec.active_version is not None)
    assert sorted(reader.names()) == live


def test_only_the_lock_holder_writes_and_a_reader_never_creates_the_collection(stack):
    admin, r = stack
    dim = admin.embedder.dim
    server = SerializedClient(QdrantClient(":memory:"))
    reader_index = AdapterIndex(dim, client=server)
    assert reader_index.target() is None  # a reader opened before any writer creates nothing

    lock = IndexWriterLock(r, "adapters", holder="someone-else")
    assert lock.hold()
    sync = IndexSync(admin.registry, AdapterIndex(dim, client=server), redis=r, writer_id="replica", min_interval_s=0)
    sync.refresh()
    assert not sync.writes and reader_index.target() is None
    with pytest.raises(IndexWriterBusy, match="someone-else"):
        sync.rebuild()
    lock.release()
    sync.refresh()
    assert sync.writes and sorted(reader_index.names()) == sorted(r.name for r in admin.registry.snapshot())
    assert lock.current() == "replica"
    assert not lock.hold()  # taken: another holder cannot renew or take it


def test_rebuild_switches_the_alias_and_a_failed_rebuild_leaves_the_old_collection(stack):
    admin, r = stack
    dim = admin.embedder.dim
    index = AdapterIndex(dim)  # embedded, with its in-memory search copy
    sync = IndexSync(admin.registry, index, redis=r, min_interval_s=0)
    sync.refresh()
    first, names = index.target(), index.names()
    query = admin.embedder.encode(["hello"])  # (1, dim)
    before = [a.name for a in index.search(query, top_k=3)[0].adapters]
    assert sync.rebuild() == len(names)
    assert index.target() != first and index.names() == names
    assert [a.name for a in index.search(query, top_k=3)[0].adapters] == before
    assert [c.name for c in index.client.get_collections().collections] == [index.target()]

    def broken(name, version):
        raise RuntimeError("card vectors unavailable")
    serving = index.target()
    sync.vectors = broken
    with pytest.raises(RuntimeError, match="unavailable"):
        sync.rebuild()
    assert index.target() == serving and index.names() == names
    assert [c.name for c in index.client.get_collections().collections] == [serving]


def test_an_index_made_before_aliases_is_upgraded_by_its_first_rebuild(tmp_path):
    from qdrant_client import models

    dim, path = 8, str(tmp_path / "q")
    legacy = QdrantClient(path=path)
    legacy.create_collection("adapters", vectors_config=models.VectorParams(size=dim, distance=models.Distance.COSINE))
    legacy.close()
    index = AdapterIndex(dim, path=path)
    assert index.target() == "adapters"
    index.upsert("a", np.eye(dim, dtype=np.float32)[:2])
    from services.retrieval.index import IndexEntry
    index.rebuild([IndexEntry("a", np.eye(dim, dtype=np.float32)[:2]), IndexEntry("b", np.eye(dim, dtype=np.float32)[2:4])])
    assert index.target().startswith("adapters--ix-") and index.names() == ["a", "b"]
    index.client.close()
    assert AdapterIndex(dim, path=path).names() == ["a", "b"]


def test_index_rebuild_command_on_a_server_index_goes_through_its_one_writer(stack, tiny_zoo, tmp_path, monkeypatch):
    """`loraretriever index rebuild` with `qdrant.url`: with no writer it rebuilds itself under the
    lock; with a replica holding the lock it asks, and that writer rebuilds (the locked embedded
    client stands in for the server behind the URL)."""
    import services.wiring
    from cluster.status import rebuild_index

    admin, r = stack
    dim = admin.embedder.dim
    server = SerializedClient(QdrantClient(":memory:"))
    monkeypatch.setattr(services.wiring, "make_index", lambda cfg, dim: AdapterIndex(dim, client=server))
    cfg = server_config(r, tiny_zoo, tmp_path)
    assert "switched to it: 3 adapters" in rebuild_index(cfg)
    first = AdapterIndex(dim, client=server).target()

    replica = IndexSync(admin.registry, AdapterIndex(dim, client=server), redis=r, writer_id="replica-1",
                        min_interval_s=0)
    replica.refresh()
    assert replica.writes
    stop = threading.Event()
    follower = threading.Thread(target=lambda: [replica.refresh() or time.sleep(0.05) for _ in iter(stop.is_set, True)])
    follower.start()
    try:
        assert "replica-1 rebuilt" in rebuild_index(cfg, wait_s=30)
    finally:
        stop.set()
        follower.join(10)
    assert AdapterIndex(dim, client=server).target() not in (None, first)


def server_config(r, zoo, tmp_path):
    """The stack's config with a Qdrant server URL (never dialled: make_index is replaced)."""
    from services.config import AppConfig

    kwargs = r.connection_pool.connection_kwargs
    return AppConfig.model_validate({
        "base_model": {"path": str(zoo.base), "name": "tiny-random-llama"},
        "adapter_store": {"path": str(tmp_path / "store")},
        "redis": {"url": f"redis://{kwargs['host']}:{kwargs['port']}/{kwargs['db']}", "start_local": False},
        "qdrant": {"url": "http://127.0.0.1:1"}})
