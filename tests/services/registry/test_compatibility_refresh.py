"""Gain tables follow the active versions: a registration measures the new version over its nearest
neighbours and re-measures the neighbours whose nearest set it changed (at most `neighbours` of
them), a promote measures the new version, tables survive in Redis per version, and the policy's
thresholds are recalibrated from the cards. The measurer is a stand-in that records what it is
asked (the measurement itself is tested against PEFT in tests/services/lora)."""
from __future__ import annotations

import asyncio

import numpy as np
from registry_fixtures import card

from services.lora.compatibility import GainTable, Measure
from services.registry.compatibility import CompatibilityCache, CompatibilityStore
from services.rollout.compatibility import refresh_compatibility


def clustered(center: np.ndarray, seed: int, samples: int = 2) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (center + 0.01 * rng.standard_normal((samples, center.size))).astype(np.float32)  # (samples, dim)


AXES = np.eye(8, dtype=np.float32)


class Measurer:
    def __init__(self):
        self.asked: list[tuple[str, list[str]]] = []

    async def __call__(self, jobs, cards):
        self.asked += jobs
        assert all(cards[key] for key, _ in jobs)  # each adapter's own card samples travel along
        return [GainTable(key, want, len(cards[key]), {"base": Measure(0.0, -5.0)}) for key, want in jobs]


def refresh(registry, store, measurer, name, neighbours=1):
    return asyncio.run(refresh_compatibility(registry, store, measurer, name=name, neighbours=neighbours,
                                             max_samples=8))


def test_registration_measures_the_new_version_and_the_neighbours_it_changed(registry, adapter_dir, redis_client):
    store, measurer = CompatibilityStore(redis_client), Measurer()
    registry.add_version("near", adapter_dir(0), card("near"), clustered(AXES[0] + 0.2 * AXES[1], 1))
    registry.add_version("far", adapter_dir(1), card("far"), clustered(AXES[5], 2))
    refresh(registry, store, measurer, "far", neighbours=1)
    assert measurer.asked == [("far@v1", ["near@v1"]), ("near@v1", ["far@v1"])]

    registry.add_version("new", adapter_dir(2), card("new"), clustered(AXES[0], 3))
    out = refresh(registry, store, measurer, "new", neighbours=1)
    # new's nearest is near, and near's nearest is now new: both measured; far's table still holds
    assert measurer.asked[2:] == [("new@v1", ["near@v1"]), ("near@v1", ["new@v1"])]
    assert out["measured"] == ["new@v1", "near@v1"]
    assert store.snapshot().table("near@v1").neighbours == ["new@v1"]
    assert store.of("new@v1")["samples"] == 2

    refresh(registry, store, measurer, "new", neighbours=1)  # nothing changed: nothing measured again
    assert len(measurer.asked) == 4

    registry.add_version("new", adapter_dir(3), card("new"), clustered(AXES[0], 4))  # v2 becomes active
    refresh(registry, store, measurer, "new", neighbours=1)
    assert measurer.asked[4:] == [("new@v2", ["near@v1"]), ("near@v1", ["new@v2"])]
    assert store.snapshot().table("new@v1") is not None  # kept for a rollback


def test_no_neighbours_measures_nothing(registry, adapter_dir, redis_client):
    store, measurer = CompatibilityStore(redis_client), Measurer()
    registry.add_version("a", adapter_dir(0), card("a"), clustered(AXES[0], 1))
    registry.add_version("b", adapter_dir(1), card("b"), clustered(AXES[1], 2))
    assert refresh(registry, store, measurer, "b", neighbours=0)["measured"] == [] and measurer.asked == []


def test_thresholds_are_calibrated_from_the_cards_and_served_from_a_snapshot(registry, adapter_dir, redis_client):
    store = CompatibilityStore(redis_client)
    cache = CompatibilityCache(store, check_s=0.0)
    default = cache.get().thresholds
    registry.add_version("a", adapter_dir(0), card("a", samples=4), clustered(AXES[0], 1, samples=4))
    registry.add_version("b", adapter_dir(1), card("b", samples=4), clustered(AXES[1], 2, samples=4))
    refresh(registry, store, Measurer(), None)  # recalibrate only (as after a retire)
    calibrated = cache.get().thresholds
    assert calibrated.samples == 8 and calibrated.in_domain != default.in_domain
