"""`composition: auto` decisions on constructed score vectors, and calibration from cards."""
from __future__ import annotations

import math

import numpy as np
import pytest

from services.composition import CompositionMode
from services.serving.policy import PolicyThresholds, calibrate, decide

TH = PolicyThresholds(margin=0.1, temperature=0.1 / math.log(2), min_retained=0.8)
COMPAT = {("a", "b"): 0.95, ("a", "c"): 0.3}


def compat(x, y):
    return COMPAT.get((x, y))


def test_clear_top1_is_selected_alone():
    d = decide([("a", 0.8), ("b", 0.6), ("c", 0.5)], compat, TH, min_similarity=0.0)
    assert (d.mode, d.adapters, d.weights) == (CompositionMode.selection, ["a"], [1.0])
    assert "clear top-1" in d.reason and d.dropped == []


def test_close_scores_mix_only_compatible_adapters_with_calibrated_weights():
    d = decide([("a", 0.62), ("b", 0.60), ("c", 0.59)], compat, TH, min_similarity=0.0)
    assert d.mode is CompositionMode.mixture and d.adapters == ["a", "b"]
    expected = [1 / (1 + math.exp(-0.02 / TH.temperature)), 1 / (1 + math.exp(0.02 / TH.temperature))]
    assert d.weights == pytest.approx(expected) and sum(d.weights) == pytest.approx(1)
    assert d.dropped == [{"name": "c", "compatibility": 0.3, "why": "incompatible with the top-1: 0.300 < 0.8"}]


def test_a_runner_up_exactly_margin_behind_gets_half_the_weight():
    d = decide([("a", 0.70), ("b", 0.70 - 0.0999)], compat, TH, min_similarity=0.0)
    assert d.weights[1] / d.weights[0] == pytest.approx(0.5, rel=1e-2)


def test_ties_with_only_incompatible_or_unknown_neighbours_keep_the_top1():
    d = decide([("a", 0.5), ("c", 0.5), ("z", 0.5)], compat, TH, min_similarity=0.0)
    assert (d.mode, d.adapters) == (CompositionMode.selection, ["a"])
    assert [x["name"] for x in d.dropped] == ["c", "z"] and d.dropped[1]["compatibility"] is None


def test_below_min_similarity_or_nothing_retrieved_is_the_base_model():
    assert decide([("a", 0.2), ("b", 0.19)], compat, TH, min_similarity=0.3).mode is CompositionMode.none
    d = decide([], compat, TH, min_similarity=0.0)
    assert (d.mode, d.adapters, d.reason) == (CompositionMode.none, [], "no adapter fits: top score none < 0")


def test_a_single_hit_is_selected():
    assert decide([("a", 0.4)], compat, TH, min_similarity=0.0).adapters == ["a"]


def clusters(rng, centers, n, noise):
    out = {}
    for name, center in centers.items():
        rows = center + noise * rng.standard_normal((n, center.size))
        out[name] = rows / np.linalg.norm(rows, axis=1, keepdims=True)
    return out


def test_calibration_follows_how_far_apart_the_cards_are():
    rng = np.random.default_rng(0)
    centers = {name: rng.standard_normal(32) for name in "abcd"}
    tight, loose = calibrate(clusters(rng, centers, 20, 0.05)), calibrate(clusters(rng, centers, 20, 0.6))
    assert tight.samples == loose.samples == 80
    assert tight.margin > loose.margin > 0
    assert tight.temperature == pytest.approx(tight.margin / math.log(2))


def test_calibrated_margin_is_the_tenth_percentile_of_own_pick_margins():
    """Against a direct brute-force computation of the leave-one-out margins."""
    rng = np.random.default_rng(1)
    cards = clusters(rng, {n: rng.standard_normal(8) for n in "xyz"}, 6, 0.4)
    margins = []
    for name, rows in cards.items():
        for s in range(len(rows)):
            own_rest = np.delete(rows, s, axis=0).mean(axis=0)
            own = rows[s] @ own_rest / np.linalg.norm(own_rest)
            best_other = max(rows[s] @ (c := other.mean(axis=0)) / np.linalg.norm(c)
                             for o, other in cards.items() if o != name)
            if own > best_other:
                margins.append(own - best_other)
    assert calibrate(cards).margin == pytest.approx(np.quantile(margins, 0.1), rel=1e-6)


def test_one_adapter_keeps_the_defaults():
    assert calibrate({"a": np.eye(3)}) == PolicyThresholds()
