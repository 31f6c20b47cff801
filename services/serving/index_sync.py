"""Keep a vector index in step with the registry (the index is derived state).

Every retriever replica owns one IndexSync; with embedded Qdrant each replica's index is
its own copy, rebuilt from the registry, so any number of replicas agree."""
from __future__ import annotations

import logging
import time
from typing import Callable

# A Redis key operators bump (`loraretriever index rebuild`) to make every replica rebuild.
REBUILD_EPOCH_KEY = "lr:index:rebuild-epoch"

log = logging.getLogger(__name__)


def index_fields(record) -> tuple:
    """What, if changed, needs a re-upsert of an adapter."""
    return (record.active_version, record.owner_tenant, record.visibility, record.base_model, record.domain)


class IndexSync:
    def __init__(self, registry, index, *, rebuild_epoch: Callable[[], object] = lambda: None,
                 min_interval_s: float = 0.5):
        self.registry = registry
        self.index = index
        self.rebuild_epoch = rebuild_epoch
        self.epoch = None
        self.min_interval_s = min_interval_s
        self.generation = -1
        self._indexed: dict[str, tuple] = {}
        self._checked_at = 0.0

    def refresh(self, force: bool = False):
        """Apply registry changes since the last call; returns the index. Redis down: keep serving."""
        now = time.monotonic()
        if not force and now - self._checked_at < self.min_interval_s:
            return self.index
        self._checked_at = now
        try:
            epoch = self.rebuild_epoch()
            try:
                indexed = set(self.index.names())
            except Exception as err:  # the collection itself is gone (Qdrant restarted without storage)
                log.warning("index unreadable (%s), recreating it from the registry", err)
                self.index.ensure_collection()
                indexed = set()
            # An operator asked for a rebuild, or the index lost entries (a restarted Qdrant).
            if epoch != self.epoch or indexed != set(self._indexed):
                self._clear()
                self.epoch, force = epoch, True
            generation = self.registry.generation()
            if force or generation != self.generation:
                self._apply(self.registry.snapshot())
                self.generation = generation
        except Exception as err:
            log.warning("registry unreachable, index unchanged: %s", err)
        return self.index

    def rebuild(self) -> int:
        """Drop everything and index the registry afresh; returns the adapter count."""
        self._clear()
        self.refresh(force=True)
        return len(self._indexed)

    def _clear(self) -> None:
        for name in self.index.names():
            self.index.remove(name)
        self._indexed.clear()

    def _apply(self, records) -> None:
        live = {r.name: r for r in records if r.active_version is not None}
        for name in set(self._indexed) - set(live):
            self.index.remove(name)
            del self._indexed[name]
        for name, rec in live.items():
            fields = index_fields(rec)
            if self._indexed.get(name) == fields:
                continue
            self.index.upsert(
                name, self.registry.card_embeddings(name, rec.active_version), version=rec.active_version,
                tenant=rec.owner_tenant if rec.visibility == "private" else None,
                base_model=rec.base_model, domain=rec.domain,
            )
            self._indexed[name] = fields
            log.info("indexed adapter %s@%s", name, rec.active_version)
