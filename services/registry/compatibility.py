"""Gain tables of adapter versions and the auto policy's calibrated thresholds, in Redis.

A table belongs to the version it was measured on and to the neighbour versions in it
(`name@version` keys), so a promote or a rollback never reuses a stale one: the new active
version is measured again (services/rollout/compatibility.py), and a rollback finds its old table.
Serving reads a snapshot, refreshed when the generation counter moves, so the hot path never
waits on Redis.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

import redis

from services.lora.compatibility import GainTable
from services.registry.redis_access import guarded
from services.serving.policy import PolicyThresholds

TABLES_KEY = "lr:compat:tables"  # hash: "name@version" -> GainTable as JSON, plus "at"
POLICY_KEY = "lr:compat:policy"  # the calibrated PolicyThresholds as JSON
GENERATION_KEY = "lr:compat:generation"


@dataclass
class CompatibilitySnapshot:
    tables: dict[str, GainTable] = field(default_factory=dict)  # name@version -> its gain table
    thresholds: PolicyThresholds = field(default_factory=PolicyThresholds)
    generation: int = -1

    def table(self, key: str) -> GainTable | None:
        return self.tables.get(key)


class CompatibilityStore:
    def __init__(self, client: redis.Redis):
        self.r = client

    def put(self, table: GainTable) -> None:
        entry = {**table.to_dict(), "at": time.time()}
        with guarded(self.r, f"store the gain table of {table.adapter}"):
            pipe = self.r.pipeline(transaction=True)
            pipe.hset(TABLES_KEY, table.adapter, json.dumps(entry))
            pipe.incr(GENERATION_KEY)
            pipe.execute()

    def table(self, key: str) -> GainTable | None:
        with guarded(self.r, "read gain tables"):
            raw = self.r.hget(TABLES_KEY, key)
        return _table(raw) if raw else None

    def of(self, key: str) -> dict | None:
        """One version's stored table as JSON (for `adapters show`), None if unmeasured."""
        with guarded(self.r, "read gain tables"):
            raw = self.r.hget(TABLES_KEY, key)
        return json.loads(raw) if raw else None

    def set_thresholds(self, thresholds: PolicyThresholds) -> None:
        with guarded(self.r, "store the auto policy's thresholds"):
            pipe = self.r.pipeline(transaction=True)
            pipe.set(POLICY_KEY, json.dumps(thresholds.to_dict()))
            pipe.incr(GENERATION_KEY)
            pipe.execute()

    def generation(self) -> int:
        with guarded(self.r, "read the compatibility generation"):
            return int(self.r.get(GENERATION_KEY) or 0)

    def snapshot(self) -> CompatibilitySnapshot:
        with guarded(self.r, "read the auto policy's thresholds and gain tables"):
            pipe = self.r.pipeline(transaction=True)
            pipe.get(GENERATION_KEY)
            pipe.get(POLICY_KEY)
            pipe.hgetall(TABLES_KEY)
            generation, raw, tables = pipe.execute()
        thresholds = PolicyThresholds.from_dict(json.loads(raw)) if raw else PolicyThresholds()
        return CompatibilitySnapshot({(k.decode() if isinstance(k, bytes) else k): _table(v) for k, v in tables.items()},
                                     thresholds, int(generation or 0))


def _table(raw) -> GainTable:
    data = json.loads(raw)
    data.pop("at", None)
    return GainTable.from_dict(data)


class CompatibilityCache:
    """The serving side's snapshot; re-read when the generation moves (checked at most every
    `check_s`), kept as it is while Redis is away."""

    def __init__(self, store: CompatibilityStore, check_s: float = 1.0):
        self.store, self.check_s = store, check_s
        self._snapshot, self._checked = CompatibilitySnapshot(), 0.0

    def get(self) -> CompatibilitySnapshot:
        now = time.monotonic()
        if now - self._checked >= self.check_s:
            self._checked = now
            try:
                if self.store.generation() != self._snapshot.generation:
                    self._snapshot = self.store.snapshot()
            except Exception:  # Redis away: the last snapshot serves
                pass
        return self._snapshot
