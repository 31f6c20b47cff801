"""Which embedder and index a retriever replica answers with: the active retriever model's.

A replica keeps serving with its current (embedder, index) pair while a new active model is
prepared on a background thread: the model loaded, its own index filled with card vectors of
that model (embedded: a copy in this process; a Qdrant server: the collection `<alias>__<version>`,
written by its one writer, waited for until it holds every served adapter). Only then does the
pair switch, between two batches, so a query is always embedded and searched by the same model
and no answer sees a half-filled index. A model that fails to load or index leaves the current
pair serving (logged; tried again when the active pointer moves)."""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable

log = logging.getLogger(__name__)


@dataclass
class ServingModel:
    version: str | None  # None: the configured embedder
    embedder: object
    sync: object  # IndexSync of this model's index
    hybrid_weight: float | None = None  # a tuned model's embedding share of the hybrid score; None: the replica's


class ModelFollower:
    def __init__(self, base: ServingModel, active_version: Callable[[], str | None],
                 prepare: Callable[[str | None], ServingModel], *, ready_timeout_s: float = 600.0):
        """active_version() reads the pointer (Redis); prepare(version) builds a model's pair, its
        index filled (blocking; runs on the background thread)."""
        self.current = base
        self.base = base
        self.active_version = active_version
        self.prepare = prepare
        self.ready_timeout_s = ready_timeout_s
        self._next: ServingModel | None = None
        self._preparing: str | None | object = _NONE
        self._failed: str | None | object = _NONE
        self._lock = threading.Lock()

    def serving(self) -> ServingModel:
        """The pair to answer the next batch with (switches here, between batches, when one is ready)."""
        with self._lock:
            if self._next is not None:
                previous, self.current, self._next = self.current, self._next, None
                log.info("retriever model switched: %s -> %s", previous.version or "configured embedder",
                         self.current.version or "configured embedder")
        return self.current

    def poll(self) -> None:
        """Start preparing the active model if it is not the one serving (one preparation at a time)."""
        try:
            wanted = self.active_version()
        except Exception as err:  # Redis away: keep the current model
            log.warning("cannot read the active retriever model: %s", err)
            return
        with self._lock:
            pending = self._next.version if self._next is not None else _NONE
            if wanted in (self.current.version, pending, self._preparing, self._failed):
                return
            self._preparing = wanted
        threading.Thread(target=self._prepare, args=(wanted,), daemon=True, name="retriever-model").start()

    def _prepare(self, version: str | None) -> None:
        started = time.monotonic()
        try:
            model = self.base if version is None else self.prepare(version)
            if version is None:
                model.sync.refresh(force=True)
            with self._lock:
                self._next, self._failed = model, _NONE
            log.info("retriever model %s ready in %.1f s", version or "configured embedder", time.monotonic() - started)
        except Exception as err:
            log.warning("retriever model %s could not be prepared (%s); serving with %s", version, err,
                        self.current.version or "the configured embedder")
            with self._lock:
                self._failed = version
        finally:
            with self._lock:
                self._preparing = _NONE


_NONE = object()


def card_vectors(registry, embedder) -> Callable[[str, str], object]:
    """IndexSync's vectors for a tuned model: the version's card samples embedded by that model
    (the registry's stored embeddings are the configured embedder's)."""
    def vectors(name: str, version: str):
        card = registry.get(name).version(version).card
        return embedder.encode([s.inputs for s in card.sample])  # (samples, dim)
    return vectors


def wait_until_complete(sync, registry, timeout_s: float) -> None:
    """Refresh until the index holds every adapter the registry serves (a shared collection is filled
    by its writer: this replica, or another one)."""
    deadline = time.monotonic() + timeout_s
    while True:
        sync.refresh(force=True)
        served = {r.name for r in registry.snapshot() if r.active_version is not None}
        missing = served - set(sync.index.names())
        if not missing:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"the index {sync.index.collection!r} still lacks {len(missing)} adapters")
        time.sleep(1.0)


def prepare_model(cfg, registry, redis, models, version: str, writer_id: str,
                  ready_timeout_s: float = 600.0) -> ServingModel:
    """A tuned model's (embedder, index) pair, its index complete (see the module's docstring)."""
    from services.retrieval.embedder import Embedder
    from services.retrieval.host_runtime import host_backend
    from services.serving.index_sync import IndexSync
    from services.wiring import make_index

    record = models.get(version)
    if record is None:
        raise LookupError(f"retriever model {version} is not registered")
    e = cfg.embedder
    embedder = Embedder(record.path, e.instruction, batch_size=e.batch_size, backend=e.backend or host_backend(record.backend),
                        max_seq_length=e.max_seq_length, threads=e.threads, cache_entries=e.cache_entries)
    # a server keeps one collection per model version (rollback finds it there); embedded: in memory
    index = make_index(cfg, embedder.dim, collection=f"{cfg.qdrant.collection}__{version}",
                       in_memory=cfg.qdrant.url is None, model_scoring=record.scoring)
    sync = IndexSync(registry, index, redis=redis, vectors=card_vectors(registry, embedder), writer_id=writer_id)
    wait_until_complete(sync, registry, ready_timeout_s)
    return ServingModel(version, embedder, sync, record.hybrid_weight)
