"""Composition planning: named adapters, retrieval results, weights, visibility, canaries."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

from services.schemas import CompositionMode, LoraOptions, RetrievalResult, RetrievedAdapter, Weighting
from services.serving.catalog import AdapterUnavailable, Catalog, canary_bucket
from services.composition import composition_weights
from services.serving.planner import PlanDefaults, needs_retrieval, plan_composition

DEFAULTS = PlanDefaults(top_k=3, composition=CompositionMode.mixture, weighting=Weighting.uniform,
                        temperature=1.0, min_similarity=0.0)


def record(name, active="1", versions=("1",), tenant=None, visibility="shared", canary=None):
    return SimpleNamespace(name=name, active_version=active, versions={v: {} for v in versions},
                           owner_tenant=tenant, visibility=visibility, canary=canary, base_model="b", domain="d")


CATALOG = Catalog.of([
    record("upper", versions=("1", "2")),
    record("lower"),
    record("secret", tenant="acme", visibility="private"),
])


def plan(model="auto", opts=None, retrieved=None, tenant=None, request_id="r1", catalog=CATALOG):
    return plan_composition(model=model, base_model_id="base", opts=opts or LoraOptions(), defaults=DEFAULTS,
                            catalog=catalog, tenant=tenant, request_id=request_id, retrieved=retrieved)


def hits(*pairs):
    return RetrievalResult(adapters=[RetrievedAdapter(name=n, score=s) for n, s in pairs])


def test_softmax_weights_match_a_direct_formula():
    scores, t = [0.9, 0.5, 0.1], 0.5
    denom = sum(math.exp(s / t) for s in scores)
    expected = [math.exp(s / t) / denom for s in scores]
    assert composition_weights(scores, Weighting.softmax, t) == pytest.approx(expected)
    assert composition_weights(scores, Weighting.uniform, t) == pytest.approx([1 / 3] * 3)


def test_auto_mixture_uses_retrieved_adapters_with_active_versions():
    p = plan(retrieved=hits(("upper", 0.8), ("lower", 0.6)))
    assert p.composition is CompositionMode.mixture
    assert p.keys() == ["upper@1", "lower@1"]
    assert [a.weight for a in p.adapters] == pytest.approx([0.5, 0.5])
    assert [a.score for a in p.adapters] == [0.8, 0.6]


def test_selection_keeps_top1_and_empty_retrieval_means_base_model():
    p = plan(opts=LoraOptions(composition="selection"), retrieved=hits(("lower", 0.7), ("upper", 0.6)))
    assert p.keys() == ["lower@1"] and p.adapters[0].weight == 1.0
    assert plan(retrieved=hits()).composition is CompositionMode.none


def test_named_adapter_and_version_and_base_model():
    assert plan(model="upper").keys() == ["upper@1"]
    assert plan(model="upper@2").keys() == ["upper@2"]
    assert plan(model="upper@2").composition is CompositionMode.selection
    assert plan(model="base").adapters == []
    explicit = plan(model="auto", opts=LoraOptions(adapters=["upper", "lower"], composition="fusion"))
    assert explicit.composition is CompositionMode.fusion and explicit.keys() == ["upper@1", "lower@1"]
    assert not needs_retrieval("auto", LoraOptions(adapters=["upper"]))


@pytest.mark.parametrize("ref", ["missing", "upper@9", "secret"])
def test_unavailable_adapters_are_indistinguishable(ref):
    with pytest.raises(AdapterUnavailable, match="does not exist or is not available"):
        plan(model=ref)


def test_private_adapters_only_for_their_tenant():
    assert plan(model="secret", tenant="acme").keys() == ["secret@1"]
    # retrieval results naming another tenant's adapter are dropped, not served
    p = plan(retrieved=hits(("secret", 0.9), ("lower", 0.5)), tenant="other")
    assert p.keys() == ["lower@1"]


def test_canary_split_is_deterministic_per_request():
    canary = SimpleNamespace(version="2", percent=30)
    cat = Catalog.of([record("upper", versions=("1", "2"), canary=canary)])
    ids = [f"req-{i}" for i in range(400)]
    chosen = {rid: plan(model="upper", request_id=rid, catalog=cat).keys()[0] for rid in ids}
    assert chosen == {rid: plan(model="upper", request_id=rid, catalog=cat).keys()[0] for rid in ids}
    share = sum(v == "upper@2" for v in chosen.values()) / len(ids)
    assert 0.2 < share < 0.4
    assert all((chosen[r] == "upper@2") == (canary_bucket(r, "upper") < 30) for r in ids)


def gain_table(adapter: str, neighbours: list[str]):
    """A table whose family evidence favours mixing, the neighbours' mixture doing 0.6 of the adapter's job."""
    from services.lora.compatibility import GainTable, Measure

    members = "+".join(sorted([adapter, *neighbours]))
    return GainTable(adapter, neighbours, 4, {
        "base": Measure(0.0, -5.0), f"selection:{adapter}": Measure(1.0, -0.1),
        f"mixture:{members}": Measure(0.9, -1.0), f"fusion:{members}": Measure(0.5, -2.0),
        f"selection:{neighbours[0]}": Measure(0.3, -3.0), f"mixture:{neighbours[0]}+x@1": Measure(0.6, -2.0),
        f"fusion:{neighbours[0]}+x@1": Measure(0.4, -2.5)})


def snapshot(tables: list, in_domain=0.5):
    from services.registry.compatibility import CompatibilitySnapshot
    from services.serving.policy import PolicyThresholds

    return CompatibilitySnapshot({t.adapter: t for t in tables}, PolicyThresholds(in_domain=in_domain), generation=1)


def test_auto_mixes_measured_versions_and_says_why():
    compat = snapshot([gain_table("upper@1", ["lower@1"])])
    plan = plan_composition(model="auto", base_model_id="base", opts=LoraOptions(composition="auto"),
                            defaults=DEFAULTS, catalog=CATALOG, tenant=None, request_id="r1",
                            retrieved=hits(("upper", 0.62), ("lower", 0.60), ("secret", 0.61)), compat=compat)
    assert plan.composition is CompositionMode.mixture
    assert [(a.name, a.version, a.score) for a in plan.adapters] == [("upper", "1", 0.62), ("lower", "1", 0.60)]
    assert [a.weight for a in plan.adapters] == pytest.approx([0.5, 0.5])
    assert plan.decision["policy"] == "auto" and "compose the family" in plan.decision["reason"]
    assert set(plan.decision) == {"policy", "reason", "family"}  # 'secret' is another tenant's: never considered


def test_auto_selects_when_the_active_version_is_unmeasured_and_mixes_out_of_domain():
    compat = snapshot([gain_table("upper@2", ["lower@1"])])  # measured for a version not active
    close = plan_composition(model="auto", base_model_id="base", opts=LoraOptions(composition="auto"),
                             defaults=DEFAULTS, catalog=CATALOG, tenant=None, request_id="r1",
                             retrieved=hits(("upper", 0.62), ("lower", 0.60)), compat=compat)
    assert close.composition is CompositionMode.selection and [a.name for a in close.adapters] == ["upper"]
    assert "not measured yet" in close.decision["reason"]
    far = plan_composition(model="auto", base_model_id="base", opts=LoraOptions(composition="auto"),
                           defaults=DEFAULTS, catalog=CATALOG, tenant=None, request_id="r1",
                           retrieved=hits(("upper", 0.3), ("lower", 0.2)), compat=compat)
    assert far.composition is CompositionMode.mixture and "out of domain" in far.decision["reason"]
    assert [a.weight for a in far.adapters] == pytest.approx([0.5, 0.5])


def test_auto_below_min_similarity_answers_with_the_base_model():
    plan = plan_composition(model="auto", base_model_id="base", opts=LoraOptions(composition="auto", min_similarity=0.7),
                            defaults=DEFAULTS, catalog=CATALOG, tenant=None, request_id="r1",
                            retrieved=hits(("upper", 0.62)), compat=None)
    assert plan.composition is CompositionMode.none and plan.adapters == []
    assert "no adapter fits" in plan.decision["reason"]


def test_auto_with_named_adapters_mixes_them_as_asked():
    plan = plan_composition(model="auto", base_model_id="base",
                            opts=LoraOptions(composition="auto", adapters=["upper", "lower"]),
                            defaults=DEFAULTS, catalog=CATALOG, tenant=None, request_id="r1")
    assert plan.composition is CompositionMode.mixture and plan.decision is None
