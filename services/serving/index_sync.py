"""Keep a vector index in step with the registry (the index is derived state).

Two kinds of index, one writer each:
- embedded (`qdrant.url` unset): each retriever replica's own in-process copy, written by that
  replica alone from the registry, so any number of replicas agree.
- shared (a Qdrant server): one collection every replica searches. Only the holder of the Redis
  writer lock (`IndexWriterLock`) writes it; the other replicas only search. Before, every replica
  wrote, and a replica whose own list differed from the collection's (an adapter added or
  retired, a new replica, an upgrade, `index rebuild`) cleared the collection the others were
  searching.

Either way the index is never cleared: registry changes are applied as the upsert or removal of
single adapters (point ids are deterministic, so an adapter is replaced in place), and a rebuild
fills a new collection and then moves the alias to it (`AdapterIndex.rebuild`). A search sees the
index before or after a change, never half of it."""
from __future__ import annotations

import logging
import os
import socket
import time
from typing import Callable

from services.errors import ServiceError, Unavailable
from services.retrieval.index import IndexEntry, entry_fields

# A Redis key operators bump (`loraretriever index rebuild`) to ask for a rebuild.
REBUILD_EPOCH_KEY = "lr:index:rebuild-epoch"
# The epoch a shared collection was last rebuilt for (per alias): a new writer does not redo it.
REBUILT_EPOCH_KEY = "lr:index:rebuilt-epoch:{alias}"
WRITER_LOCK_KEY = "lr:index:writer:{alias}"
# The lease is renewed on every refresh (a retriever refreshes every second); a writer that dies
# hands over after this long. Long writes (a rebuild) renew it as they go.
WRITER_TTL_S = 30.0
_RENEW_EVERY = 64  # adapters written between two renewals of the lease
_UNSET = object()

log = logging.getLogger(__name__)

_RENEW = """
if redis.call('get', KEYS[1]) == ARGV[1] then
  return redis.call('pexpire', KEYS[1], ARGV[2])
end
return 0
"""
_RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then
  return redis.call('del', KEYS[1])
end
return 0
"""


class IndexWriterBusy(RuntimeError):
    """Another process holds the writer lock of a shared index."""


class IndexWriterLost(RuntimeError):
    """The writer lock expired or was taken over in the middle of a write; the write stopped."""


def record_fields(record) -> tuple:
    """The index entry fields of a registry record's active version (compared with entry_fields)."""
    return entry_fields(record.active_version, record.owner_tenant if record.visibility == "private" else None,
                        record.base_model, record.domain)


def process_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class IndexWriterLock:
    """A Redis lease naming the one process that writes a shared index (SET NX PX; renewed and
    released only by its holder, checked in Lua)."""

    def __init__(self, redis, alias: str, *, holder: str | None = None, ttl_s: float = WRITER_TTL_S):
        self.redis = redis
        self.key = WRITER_LOCK_KEY.format(alias=alias)
        self.holder = holder or process_id()
        self.ttl_ms = int(ttl_s * 1000)

    def hold(self) -> bool:
        """Renew the lease if this process holds it, else take it if free; True while this process writes."""
        if self.redis.eval(_RENEW, 1, self.key, self.holder, self.ttl_ms):
            return True
        return bool(self.redis.set(self.key, self.holder, nx=True, px=self.ttl_ms))

    def release(self) -> None:
        self.redis.eval(_RELEASE, 1, self.key, self.holder)

    def current(self) -> str | None:
        value = self.redis.get(self.key)
        return value.decode() if isinstance(value, bytes) else value


class IndexSync:
    def __init__(self, registry, index, *, redis=None, min_interval_s: float = 0.5,
                 vectors: Callable[[str, str], object] | None = None, writer_id: str | None = None):
        """redis: for rebuild requests and, with a shared index, the writer lock (None: this process is
        the only writer, rebuilds on request only). vectors(name, version) -> (samples, dim) card
        embeddings to index (default: the registry's, made by the configured embedder)."""
        self.registry = registry
        self.index = index
        self.redis = redis
        self.writer = IndexWriterLock(redis, index.collection, holder=writer_id) if (
            redis is not None and index.remote) else None
        self.vectors = vectors or registry.card_embeddings
        self.min_interval_s = min_interval_s
        self.generation = -1
        self.epoch: object = _UNSET  # embedded: the rebuild epoch this copy is in step with
        self._indexed: dict[str, tuple] | None = None  # what the collection holds, as this writer knows it
        self._checked_at = 0.0

    @property
    def writes(self) -> bool:
        """Whether this process wrote the index at its last refresh (embedded: always)."""
        return self.writer is None or self._indexed is not None

    def refresh(self, force: bool = False):
        """Apply registry changes since the last call; returns the index. Redis down: keep serving."""
        now = time.monotonic()
        if not force and now - self._checked_at < self.min_interval_s:
            return self.index
        self._checked_at = now
        try:
            if self.writer is not None and not self.writer.hold():
                self._indexed = None  # another process writes: re-read the collection when our turn comes
                return self.index
            if self._rebuild_requested():
                self._rebuild()
                return self.index
            try:
                present = set(self.index.names())
            except Exception as err:  # the collection is gone (a Qdrant server restarted without storage)
                log.warning("index unreadable (%s), rebuilding it from the registry", err)
                self._rebuild()
                return self.index
            if self._indexed is None or present != set(self._indexed):
                # our first turn, a turn after another writer's, or points lost: diff against what is there
                self._indexed, force = self.index.indexed_fields(), True
            generation = self.registry.generation()
            if force or generation != self.generation:
                self._apply(self.registry.snapshot())
                self.generation = generation
        except Exception as err:
            log.warning("index not refreshed (registry or index unreachable, or the writer lock lost): %s", err)
        return self.index

    def rebuild(self) -> int:
        """Index the registry afresh into a new collection, then switch to it; returns the adapter
        count. A shared index only by the writer lock's holder (IndexWriterBusy otherwise)."""
        if self.writer is not None and not self.writer.hold():
            raise IndexWriterBusy(f"{self.writer.current()} writes the index {self.index.collection!r} now")
        return self._rebuild()

    def release(self) -> None:
        """Hand the writer lock back at once (a clean shutdown) instead of letting it expire."""
        if self.writer is not None:
            self.writer.release()
            self._indexed = None

    # ---- internals -----------------------------------------------------------------------------
    def _requested_epoch(self):
        return None if self.redis is None else self.redis.get(REBUILD_EPOCH_KEY)

    def _rebuild_requested(self) -> bool:
        epoch = self._requested_epoch()
        if self.writer is not None:  # shared: was the collection rebuilt for it, by any writer?
            return epoch is not None and epoch != self.redis.get(REBUILT_EPOCH_KEY.format(alias=self.index.collection))
        if self.epoch is _UNSET:  # first refresh: the diff below brings this copy in step
            self.epoch = epoch
        return epoch != self.epoch

    def _rebuild(self) -> int:
        started = time.monotonic()
        epoch = self._requested_epoch()
        generation = self.registry.generation()
        live = [r for r in self.registry.snapshot() if r.active_version is not None]
        indexed = {r.name: record_fields(r) for r in live}
        count = self.index.rebuild(self._entries(live, indexed))
        self._indexed, self.generation = indexed, generation
        if self.writer is not None:
            if epoch is not None:
                self.redis.set(REBUILT_EPOCH_KEY.format(alias=self.index.collection), epoch)
        else:
            self.epoch = epoch
        log.info("rebuilt the index %r: %d adapters in %.1f s", self.index.collection, count,
                 time.monotonic() - started)
        return count

    def _entries(self, records, indexed: dict):
        for i, rec in enumerate(records):
            if i and i % _RENEW_EVERY == 0:
                self._still_writer()
            version, tenant, base_model, domain = record_fields(rec)
            vectors = self._vectors(rec.name, version)
            if vectors is None:
                del indexed[rec.name]
                continue
            yield IndexEntry(rec.name, vectors,
                             {"version": version, "tenant": tenant, "base_model": base_model, "domain": domain})

    def _vectors(self, name: str, version: str):
        """The card vectors, or None when the version went away since the snapshot (retired meanwhile:
        the next refresh sees the registry without it). Redis down raises: the write stops."""
        try:
            return self.vectors(name, version)
        except Unavailable:
            raise
        except ServiceError as err:
            log.warning("not indexing %s@%s: %s", name, version, err)
            return None

    def _still_writer(self) -> None:
        if self.writer is not None and not self.writer.hold():
            self._indexed = None
            raise IndexWriterLost(f"lost the writer lock of {self.index.collection!r} to {self.writer.current()}")

    def _apply(self, records) -> None:
        live = {r.name: r for r in records if r.active_version is not None}
        for name in set(self._indexed) - set(live):
            self.index.remove(name)
            del self._indexed[name]
        changed = 0
        for name, rec in live.items():
            fields = record_fields(rec)
            if self._indexed.get(name) == fields:
                continue
            if changed and changed % _RENEW_EVERY == 0:
                self._still_writer()
            version, tenant, base_model, domain = fields
            vectors = self._vectors(name, version)
            if vectors is None:
                continue
            self.index.upsert(name, vectors, version=version, tenant=tenant, base_model=base_model, domain=domain)
            self._indexed[name] = fields
            changed += 1
            log.info("indexed adapter %s@%s", name, version)

