"""Keep the gain tables and the auto policy's thresholds in step with the active versions.

Run after an adapter's active version changes (add, promote, rollback) or one leaves (retire):
the active version's gain table is measured over its `neighbours` nearest active adapters
(centroid cosine of their cards), and so are the tables of the adapters whose nearest neighbours
now differ from the ones their stored table was measured with, nearest to the changed adapter
first and at most `neighbours` of them; then the policy's thresholds are calibrated again from
every active card. Cost per change: at most 1 + `neighbours` batched forwards on a composer
(services/lora/compatibility.py), whatever the size of the library.
"""
from __future__ import annotations

import logging
import time
from typing import Awaitable, Callable

import numpy as np

from services.composition import AdapterKey
from services.lora.compatibility import GainTable
from services.registry.compatibility import CompatibilityStore
from services.serving.policy import calibrate, unit

log = logging.getLogger(__name__)

# measure(jobs: [(adapter key, neighbour keys)], card samples by key as (inputs, targets)) -> one table per job
MeasureGains = Callable[[list[tuple[str, list[str]]], dict[str, list[tuple[str, str]]]], Awaitable[list[GainTable]]]


def nearest(target: str, centroids: dict[str, np.ndarray], k: int) -> list[str]:
    """The k keys whose centroid is closest (cosine) to target's, best first."""
    others = [key for key in centroids if key != target]
    return sorted(others, key=lambda key: -float(centroids[key] @ centroids[target]))[:k]


def stale_jobs(target: str | None, centroids: dict[str, np.ndarray], store: CompatibilityStore,
               neighbours: int) -> list[tuple[str, list[str]]]:
    """(adapter, its nearest neighbours) to measure: the target if its table is missing or was
    measured with other neighbours, then the target's nearest adapters whose tables are."""
    jobs = []
    order = ([target] if target is not None else []) + (nearest(target, centroids, neighbours) if target else [])
    for key in order:
        want = nearest(key, centroids, neighbours)
        table = store.table(key)
        if table is None or table.neighbours != want:
            jobs.append((key, want))
    return jobs


async def refresh_compatibility(registry, store: CompatibilityStore, measure: MeasureGains, *,
                                name: str | None, neighbours: int, max_samples: int) -> dict:
    """Measure `name`'s active version and the neighbours it changed (None: only recalibrate)."""
    started = time.perf_counter()
    records = {r.name: r for r in registry.snapshot() if r.active_version is not None}
    cards = {r.name: registry.card_embeddings(r.name) for r in records.values()}  # name -> (samples, dim)
    store.set_thresholds(calibrate(cards))
    if name not in records or neighbours == 0:
        return {"measured": [], "seconds": round(time.perf_counter() - started, 2)}
    keys = {n: str(AdapterKey(n, r.active_version)) for n, r in records.items()}
    centroids = {keys[n]: unit(e.mean(axis=0)) for n, e in cards.items()}
    jobs = [(key, want) for key, want in stale_jobs(keys[name], centroids, store, neighbours)
            if any(s.targets for s in _card(records, key).sample)]
    if jobs:  # each table is measured on its own adapter's card
        samples = {key: [(s.inputs, s.targets) for s in _card(records, key).sample if s.targets][:max_samples]
                   for key, _ in jobs}
        for table in await measure(jobs, samples):
            store.put(table)
    seconds = round(time.perf_counter() - started, 2)
    log.info("gain tables after a change of %s: %d measured in %.2f s", keys[name], len(jobs), seconds)
    return {"measured": [key for key, _ in jobs], "seconds": seconds}


def _card(records, key: str):
    adapter = AdapterKey.parse(key)
    return records[adapter.name].versions[adapter.version].card
