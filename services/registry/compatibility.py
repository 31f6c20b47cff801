"""Compatibility scores of adapter-version pairs and the auto policy's calibrated thresholds, in Redis.

A score belongs to the two versions it was measured on (`name@version` keys), so a promote or a
rollback never reuses a stale one: the new active version's pairs are measured again
(services/rollout/compatibility.py). Serving reads a snapshot, refreshed when the generation
counter moves, so the hot path never waits on Redis.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

import redis

from services.lora.compatibility import PairScore
from services.registry.redis_access import guarded
from services.serving.policy import PolicyThresholds

PAIRS_KEY = "lr:compat:pairs"  # hash: "a@1|b@2" (sorted keys) -> {"score", "retained": {key: share}, "at"}
POLICY_KEY = "lr:compat:policy"  # the calibrated PolicyThresholds as JSON
GENERATION_KEY = "lr:compat:generation"


def pair_field(key_a: str, key_b: str) -> str:
    return "|".join(sorted((key_a, key_b)))


@dataclass
class CompatibilitySnapshot:
    scores: dict[frozenset, float] = field(default_factory=dict)
    thresholds: PolicyThresholds = field(default_factory=PolicyThresholds)
    generation: int = -1

    def score(self, key_a: str, key_b: str) -> float | None:
        return self.scores.get(frozenset((key_a, key_b)))


class CompatibilityStore:
    def __init__(self, client: redis.Redis):
        self.r = client

    def put(self, key_a: str, key_b: str, score: PairScore) -> None:
        entry = {"score": score.score, "retained": {key_a: score.retained_ab, key_b: score.retained_ba},
                 "at": time.time()}
        with guarded(self.r, f"store the compatibility of {key_a} and {key_b}"):
            pipe = self.r.pipeline(transaction=True)
            pipe.hset(PAIRS_KEY, pair_field(key_a, key_b), json.dumps(entry))
            pipe.incr(GENERATION_KEY)
            pipe.execute()

    def has(self, key_a: str, key_b: str) -> bool:
        with guarded(self.r, "read compatibility scores"):
            return bool(self.r.hexists(PAIRS_KEY, pair_field(key_a, key_b)))

    def of(self, key: str) -> dict[str, dict]:
        """Every stored pair of one version: other key -> {"score", "retained", "at"}."""
        out = {}
        for fld, entry in self._entries().items():
            a, b = fld.split("|")
            if key in (a, b):
                out[b if a == key else a] = entry
        return out

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
        with guarded(self.r, "read the auto policy's thresholds"):
            generation, raw = int(self.r.get(GENERATION_KEY) or 0), self.r.get(POLICY_KEY)
        scores = {frozenset(fld.split("|")): entry["score"] for fld, entry in self._entries().items()}
        thresholds = PolicyThresholds(**json.loads(raw)) if raw else PolicyThresholds()
        return CompatibilitySnapshot(scores, thresholds, generation)

    def _entries(self) -> dict[str, dict]:
        with guarded(self.r, "read compatibility scores"):
            raw = self.r.hgetall(PAIRS_KEY)
        return {(k.decode() if isinstance(k, bytes) else k): json.loads(v) for k, v in raw.items()}


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
