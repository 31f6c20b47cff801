"""Keep compatibility scores and the auto policy's thresholds in step with the active versions.

Run after an adapter's active version changes (add, promote, rollback) or one leaves (retire):
the active version is scored against its `neighbours` nearest active adapters (centroid cosine of
their cards) where no score exists for these two versions yet, on the serving composer, and the
policy's thresholds are calibrated again from every active card. Cost: one batched forward per
new pair (measured in docs/policy.md); bounded by `neighbours`.
"""
from __future__ import annotations

import logging
import time
from typing import Awaitable, Callable

import numpy as np

from services.composition import AdapterKey
from services.lora.compatibility import PairScore
from services.registry.compatibility import CompatibilityStore
from services.serving.policy import calibrate, unit

log = logging.getLogger(__name__)

# score_pairs(pairs of keys, card samples by key as (inputs, targets)) -> one PairScore per pair
ScorePairs = Callable[[list[tuple[str, str]], dict[str, list[tuple[str, str]]]], Awaitable[list[PairScore]]]


def nearest(target: str, centroids: dict[str, np.ndarray], k: int) -> list[str]:
    """The k keys whose centroid is closest (cosine) to target's, best first."""
    others = [key for key in centroids if key != target]
    return sorted(others, key=lambda key: -float(centroids[key] @ centroids[target]))[:k]


async def refresh_compatibility(registry, store: CompatibilityStore, score_pairs: ScorePairs, *,
                                name: str | None, neighbours: int, max_samples: int) -> dict:
    """Score `name`'s active version against its nearest neighbours (None: only recalibrate)."""
    started = time.perf_counter()
    records = {r.name: r for r in registry.snapshot() if r.active_version is not None}
    cards = {r.name: registry.card_embeddings(r.name) for r in records.values()}  # name -> (samples, dim)
    store.set_thresholds(calibrate(cards))
    if name not in records:
        return {"scored": [], "seconds": round(time.perf_counter() - started, 2)}
    keys = {n: str(AdapterKey(n, r.active_version)) for n, r in records.items()}
    centroids = {keys[n]: unit(e.mean(axis=0)) for n, e in cards.items()}
    target = keys[name]
    pairs = [(target, other) for other in nearest(target, centroids, neighbours) if not store.has(target, other)]
    if pairs:
        samples = {}
        for key in {k for pair in pairs for k in pair}:
            adapter = AdapterKey.parse(key)
            card = records[adapter.name].versions[adapter.version].card
            samples[key] = [(s.inputs, s.targets) for s in card.sample if s.targets][:max_samples]
        for (a, b), score in zip(pairs, await score_pairs(pairs, samples)):
            store.put(a, b, score)
    seconds = round(time.perf_counter() - started, 2)
    log.info("compatibility of %s: %d new pairs in %.2f s", target, len(pairs), seconds)
    return {"scored": [list(p) for p in pairs], "seconds": seconds}
