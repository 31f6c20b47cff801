"""`composition: auto` decisions on constructed gain tables, and calibration from cards."""
from __future__ import annotations

import numpy as np
import pytest

from services.composition import CompositionMode
from services.lora.compatibility import GainTable, Measure
from services.serving.policy import PolicyThresholds, calibrate, decide, family_evidence

TH = PolicyThresholds(in_domain=0.5)


def table(adapter, neighbours, *, own, loo, base=0.2, alone=1.0):
    """own: {members: accuracy} of compositions with the adapter (mixture and fusion alike);
    loo: {"selection" | "mixture" | "fusion": accuracy} of the leave-own-out rows."""
    measures = {"base": Measure(base, -3.0), f"selection:{adapter}": Measure(alone, -0.1)}
    for members, acc in own.items():
        for mode in ("mixture", "fusion"):
            measures[f"{mode}:{'+'.join(sorted((adapter, *members)))}"] = Measure(acc, -1.0)
    measures[f"selection:{neighbours[0]}"] = Measure(loo["selection"], -2.0)
    for mode in ("mixture", "fusion"):
        measures[f"{mode}:{'+'.join(sorted(neighbours))}"] = Measure(loo[mode], -2.0)
    return GainTable(adapter, list(neighbours), 4, measures)


MIXING_FAMILY = {  # the mixture of neighbours beats any one of them on each card
    "a": table("a", ["b", "c"], own={("b",): 0.95, ("b", "c"): 0.9}, loo={"selection": 0.4, "mixture": 0.7, "fusion": 0.5}),
    "b": table("b", ["a", "c"], own={("a",): 0.95, ("a", "c"): 0.9}, loo={"selection": 0.5, "mixture": 0.8, "fusion": 0.6}),
    "c": table("c", ["a", "b"], own={("a",): 0.9, ("a", "b"): 0.85}, loo={"selection": 0.4, "mixture": 0.6, "fusion": 0.5}),
}
CONFLICTING_FAMILY = {  # toy siblings: one neighbour is right more often than a blend, and mixing breaks the top-1
    "x": table("x", ["y", "z"], own={("y",): 0.3, ("y", "z"): 0.1}, loo={"selection": 0.3, "mixture": 0.1, "fusion": 0.1}),
    "y": table("y", ["x", "z"], own={("x",): 0.4, ("x", "z"): 0.2}, loo={"selection": 0.2, "mixture": 0.2, "fusion": 0.1}),
}


def test_in_domain_a_family_that_shares_the_job_composes_every_retrieved_adapter():
    # a's neighbours mixed without it: 0.7 on its card, base 0.2, a alone 1.0 -> 0.625 of its job
    d = decide([("a", 0.8), ("b", 0.7), ("c", 0.6)], MIXING_FAMILY.get, TH, min_similarity=0.0)
    assert (d.mode, d.adapters) == (CompositionMode.mixture, ["a", "b", "c"])
    assert d.weights == pytest.approx([1 / 3] * 3)
    assert "in domain" in d.reason and "mixture does 0.62 of the top-1's job" in d.reason
    assert d.evidence == {"selection": pytest.approx(0.433, abs=1e-3), "mixture": 0.7, "fusion": pytest.approx(0.533, abs=1e-3)}
    # the composition is the paper's over what retrieval found, measured neighbours of a or not
    d = decide([("a", 0.8), ("c", 0.7), ("q", 0.6)], MIXING_FAMILY.get, TH, min_similarity=0.0)
    assert (d.mode, d.adapters) == (CompositionMode.mixture, ["a", "c", "q"])


def test_in_domain_neighbours_doing_too_little_of_the_top1s_job_leave_it_alone():
    strict = PolicyThresholds(in_domain=0.5, min_transfer=0.7)
    d = decide([("a", 0.8), ("b", 0.7), ("c", 0.6)], MIXING_FAMILY.get, strict, min_similarity=0.0)
    assert (d.mode, d.adapters, d.weights) == (CompositionMode.selection, ["a"], [1.0])
    assert "mixture does 0.62 < 0.7 of its job on its card" in d.reason


def test_in_domain_a_conflicting_family_keeps_the_top1_alone():
    d = decide([("x", 0.9), ("y", 0.85), ("z", 0.8)], CONFLICTING_FAMILY.get, TH, min_similarity=0.0)
    assert (d.mode, d.adapters, d.weights) == (CompositionMode.selection, ["x"], [1.0])
    assert "does -0.12 < 0.5 of its job" in d.reason  # blended, its siblings do worse than the base model


def test_out_of_domain_leans_on_the_family_over_all_retrieved():
    d = decide([("a", 0.4), ("b", 0.35), ("c", 0.3)], MIXING_FAMILY.get, TH, min_similarity=0.0)
    assert (d.mode, d.adapters) == (CompositionMode.mixture, ["a", "b", "c"]) and "out of domain" in d.reason
    # a family whose evidence favours selection still composes out of domain, by its better composition
    d = decide([("x", 0.4), ("y", 0.35), ("z", 0.3)], CONFLICTING_FAMILY.get, TH, min_similarity=0.0)
    assert (d.mode, d.adapters) == (CompositionMode.mixture, ["x", "y", "z"])  # mixture 0.15 > fusion 0.1
    assert "compose the family: mixture measured best" in d.reason


def test_without_measurements_in_domain_selects_and_out_of_domain_mixes_as_the_paper():
    nothing = lambda name: None  # noqa: E731
    d = decide([("a", 0.8), ("b", 0.7)], nothing, TH, min_similarity=0.0)
    assert (d.mode, d.adapters) == (CompositionMode.selection, ["a"]) and "not measured yet" in d.reason
    d = decide([("a", 0.3), ("b", 0.2), ("c", 0.1)], nothing, TH, min_similarity=0.0)
    assert (d.mode, d.adapters) == (CompositionMode.mixture, ["a", "b", "c"]) and "the paper's mixture" in d.reason


def family_fusing_by(lead: float) -> dict[str, GainTable]:
    """A sharing family (mixture 0.7 on each card without the adapter) whose fusion scores `lead` more."""
    return {n: table(n, [m for m in "abc" if m != n], own={}, loo={"selection": 0.3, "mixture": 0.7, "fusion": 0.7 + lead})
            for n in "abc"}


@pytest.mark.parametrize("top_score,setting", [(0.8, "in domain"), (0.4, "out of domain")])
def test_fusion_is_chosen_only_on_a_lead_of_one_card_sample_or_more(top_score, setting):
    hits = [("a", top_score), ("b", top_score - 0.05), ("c", top_score - 0.1)]
    d = decide(hits, family_fusing_by(0.25).get, TH, min_similarity=0.0)  # one sample in the tables' 4
    assert (d.mode, d.adapters) == (CompositionMode.fusion, ["a", "b", "c"]) and setting in d.reason
    assert "fusion leads the mixture by 0.25" in d.reason
    d = decide(hits, family_fusing_by(0.2).get, TH, min_similarity=0.0)  # less: chance on 4 samples a card
    assert (d.mode, d.adapters) == (CompositionMode.mixture, ["a", "b", "c"])
    assert "fusion's lead 0.20 is under one card sample in 4" in d.reason


def test_family_evidence_ignores_the_own_rows_and_incomplete_tables():
    partial = GainTable("p", ["a"], 4, {"base": Measure(0, -5), "selection:p": Measure(1, 0), "selection:a": Measure(1, 0)})
    evidence = family_evidence([MIXING_FAMILY["a"], partial])
    assert evidence[CompositionMode.mixture].accuracy == 0.7 and evidence[CompositionMode.selection].accuracy == 0.4


def test_below_min_similarity_or_nothing_retrieved_is_the_base_model():
    assert decide([("a", 0.2), ("b", 0.19)], MIXING_FAMILY.get, TH, min_similarity=0.3).mode is CompositionMode.none
    d = decide([], MIXING_FAMILY.get, TH, min_similarity=0.0)
    assert (d.mode, d.adapters, d.reason) == (CompositionMode.none, [], "no adapter fits: top score none < 0")


def test_a_single_hit_is_selected():
    assert decide([("a", 0.4)], MIXING_FAMILY.get, TH, min_similarity=0.0).adapters == ["a"]


def clusters(rng, centers, n, noise):
    out = {}
    for name, center in centers.items():
        rows = center + noise * rng.standard_normal((n, center.size))
        out[name] = rows / np.linalg.norm(rows, axis=1, keepdims=True)
    return out


def test_in_domain_threshold_is_the_low_quantile_of_own_centroid_similarities():
    """Against a direct brute-force computation of the leave-one-out similarities."""
    rng = np.random.default_rng(1)
    cards = clusters(rng, {n: rng.standard_normal(8) for n in "xyz"}, 6, 0.4)
    own = []
    for rows in cards.values():
        for s in range(len(rows)):
            rest = np.delete(rows, s, axis=0).sum(axis=0)
            own.append(rows[s] @ rest / np.linalg.norm(rest))
    calibrated = calibrate(cards)
    assert calibrated.in_domain == pytest.approx(np.quantile(own, 0.05), rel=1e-6) and calibrated.samples == 18


def test_calibration_follows_how_tight_the_cards_are():
    rng = np.random.default_rng(0)
    centers = {name: rng.standard_normal(32) for name in "abcd"}
    tight, loose = calibrate(clusters(rng, centers, 20, 0.05)), calibrate(clusters(rng, centers, 20, 0.6))
    assert tight.in_domain > loose.in_domain > 0


def test_cards_of_one_sample_keep_the_defaults():
    assert calibrate({"a": np.eye(3)[:1]}) == PolicyThresholds()


def test_in_domain_neighbours_that_do_another_job_on_the_top1s_card_are_not_mixed_in():
    """The family favours mixing, but on the top-1's own card its neighbours mixed without it do
    (0.4 - 0.2) / (1.0 - 0.2) = 0.25 of its job: the toy zoo's siblings (uppercase vs acronym)."""
    tables = {**MIXING_FAMILY, "a": table("a", ["b", "c"], own={("b",): 0.95, ("b", "c"): 0.9},
                                          loo={"selection": 0.3, "mixture": 0.4, "fusion": 0.3})}
    d = decide([("a", 0.8), ("b", 0.7), ("c", 0.6)], tables.get, TH, min_similarity=0.0)
    assert (d.mode, d.adapters) == (CompositionMode.selection, ["a"])
    assert "does 0.25 < 0.5 of its job" in d.reason
    assert tables["a"].transfer(CompositionMode.mixture) == pytest.approx(0.25)


def test_thresholds_stored_by_an_earlier_rule_still_load():
    stored = {"in_domain": 0.5006, "min_retained": 0.8, "min_transfer": 0.5, "tie": 0.02, "samples": 225}
    assert PolicyThresholds.from_dict(stored) == PolicyThresholds(in_domain=0.5006, min_transfer=0.5, samples=225)
    assert PolicyThresholds.from_dict(PolicyThresholds(in_domain=0.4).to_dict()) == PolicyThresholds(in_domain=0.4)
