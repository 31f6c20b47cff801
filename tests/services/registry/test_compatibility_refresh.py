"""Compatibility scores follow the active versions: a registration scores the new version against
its nearest neighbours (and only those), a promote re-scores, scores survive in Redis per version
pair, and the policy's thresholds are recalibrated from the cards. The scorer is a stand-in that
records what it is asked (the measurement itself is tested against PEFT in tests/services/lora)."""
from __future__ import annotations

import asyncio

import numpy as np
from registry_fixtures import card

from services.lora.compatibility import PairScore
from services.registry.compatibility import CompatibilityCache, CompatibilityStore
from services.rollout.compatibility import refresh_compatibility


def clustered(center: np.ndarray, seed: int, samples: int = 2) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (center + 0.01 * rng.standard_normal((samples, center.size))).astype(np.float32)  # (samples, dim)


AXES = np.eye(8, dtype=np.float32)


class Scorer:
    def __init__(self):
        self.asked: list[tuple[str, str]] = []

    async def __call__(self, pairs, cards):
        self.asked += pairs
        assert all(key in cards and cards[key] for pair in pairs for key in pair)  # card samples travel along
        return [PairScore(0.9, 0.7) for _ in pairs]


def refresh(registry, store, scorer, name, neighbours=1):
    return asyncio.run(refresh_compatibility(registry, store, scorer, name=name, neighbours=neighbours,
                                             max_samples=8))


def test_registration_scores_the_nearest_neighbours_and_promote_rescores(registry, adapter_dir, redis_client):
    store, scorer = CompatibilityStore(redis_client), Scorer()
    registry.add_version("near", adapter_dir(0), card("near"), clustered(AXES[0] + 0.2 * AXES[1], 1))
    registry.add_version("far", adapter_dir(1), card("far"), clustered(AXES[5], 2))
    registry.add_version("new", adapter_dir(2), card("new"), clustered(AXES[0], 3))

    out = refresh(registry, store, scorer, "new", neighbours=1)
    assert scorer.asked == [("new@v1", "near@v1")] and out["scored"] == [["new@v1", "near@v1"]]
    assert store.snapshot().score("near@v1", "new@v1") == 0.7  # the worse direction
    assert store.of("new@v1")["near@v1"]["retained"] == {"new@v1": 0.9, "near@v1": 0.7}

    refresh(registry, store, scorer, "new", neighbours=1)  # nothing new: nothing measured again
    assert len(scorer.asked) == 1

    registry.add_version("new", adapter_dir(3), card("new"), clustered(AXES[0], 4))  # v2 becomes active
    refresh(registry, store, scorer, "new", neighbours=1)
    assert scorer.asked[-1] == ("new@v2", "near@v1")
    assert store.snapshot().score("new@v2", "near@v1") is not None
    assert store.snapshot().score("new@v1", "near@v1") is not None  # kept for a rollback


def test_thresholds_are_calibrated_from_the_cards_and_served_from_a_snapshot(registry, adapter_dir, redis_client):
    store = CompatibilityStore(redis_client)
    cache = CompatibilityCache(store, check_s=0.0)
    default = cache.get().thresholds
    registry.add_version("a", adapter_dir(0), card("a", samples=4), clustered(AXES[0], 1, samples=4))
    registry.add_version("b", adapter_dir(1), card("b", samples=4), clustered(AXES[1], 2, samples=4))
    refresh(registry, store, Scorer(), None)  # recalibrate only (as after a retire)
    calibrated = cache.get().thresholds
    assert calibrated.samples == 8 and calibrated.margin != default.margin
