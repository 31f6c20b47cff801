"""The canary verdict's statistics against independent oracles, the verdict loop over a real
Redis and registry, the quality gate's rule and report, and the bounded metric labels."""
from __future__ import annotations

import asyncio
import math
from fractions import Fraction
from statistics import NormalDist

import numpy as np
import pytest
from registry_fixtures import card, embeddings

from services.config import RolloutConfig
from services.registry.registry import QualityGateRefused
from services.rollout.canary import Arm, CanaryJudge, binomial_tail, decide, latency_excess_p, progress, reset
from services.rollout.quality_gate import CARD_SPLIT_EVERY, GateSamples, judge, run_gate, split_card
from services.schemas import AdapterCard, CardSample, CompositionPlan, UsedAdapter

RULE = dict(min_requests=50, alpha=0.05, error_floor=0.01, latency_tolerance=0.5)


def arm(latencies, errors: int = 0) -> Arm:
    logs = np.log(np.asarray(latencies, dtype=float))
    return Arm(requests=len(latencies) + errors, errors=errors, log_sum=float(logs.sum()),
               log_sq=float((logs ** 2).sum()))


# ---- statistics ---------------------------------------------------------------------------
@pytest.mark.parametrize("k,n,p", [(0, 10, 0.1), (1, 10, 0.1), (3, 20, 0.01), (20, 20, 0.01), (7, 40, 0.2),
                                   (150, 400, 0.3)])
def test_binomial_tail_matches_exact_rational_sum(k, n, p):
    q = Fraction(p).limit_denominator(10_000)
    exact = sum(math.comb(n, i) * q ** i * (1 - q) ** (n - i) for i in range(k, n + 1))
    assert binomial_tail(k, n, float(q)) == pytest.approx(float(exact), rel=1e-9, abs=1e-300)


def test_latency_test_from_running_sums_matches_raw_samples():
    rng = np.random.default_rng(0)
    a, c = rng.lognormal(-2.0, 0.3, 80), rng.lognormal(-1.4, 0.4, 30)
    la, lc = np.log(a), np.log(c)
    se = math.sqrt(lc.var(ddof=1) / len(lc) + la.var(ddof=1) / len(la))
    z = (lc.mean() - la.mean() - math.log(1.5)) / se
    assert latency_excess_p(arm(c), arm(a), 0.5) == pytest.approx(1 - NormalDist().cdf(z), rel=1e-9)
    assert arm(c).log_var() == pytest.approx(lc.var(ddof=1))


def test_a_broken_canary_is_rolled_back_within_a_few_requests():
    active = arm([0.1] * 200)
    verdicts = [decide(active, Arm(requests=n, errors=n), **RULE) for n in range(1, 10)]
    first = next(i for i, v in enumerate(verdicts, start=1) if v is not None)
    assert first <= 3 and verdicts[first - 1].promote is False and "errors" in verdicts[first - 1].reason


def test_a_healthy_canary_waits_for_min_requests_then_is_promoted():
    rng = np.random.default_rng(1)
    active = arm(rng.lognormal(-2, 0.2, 300))
    canary = rng.lognormal(-2, 0.2, 60)
    assert all(decide(active, arm(canary[:n]), **RULE) is None for n in range(1, 50))
    verdict = decide(active, arm(canary[:50]), **RULE)
    assert verdict.promote is True and "latency" in verdict.reason


def test_a_much_slower_canary_is_rolled_back_and_a_slightly_slower_one_promoted():
    rng = np.random.default_rng(2)
    active = arm(rng.lognormal(-2, 0.2, 300))
    slow = decide(active, arm(rng.lognormal(-2 + math.log(3), 0.2, 50)), **RULE)
    assert slow.promote is False and "latency" in slow.reason
    assert decide(active, arm(rng.lognormal(-2 + math.log(1.1), 0.2, 50)), **RULE).promote is True


def test_errors_at_the_active_versions_rate_do_not_roll_back():
    active = Arm(requests=1000, errors=50, log_sum=math.log(0.1) * 950, log_sq=math.log(0.1) ** 2 * 950)
    canary = Arm(requests=50, errors=3, log_sum=math.log(0.1) * 47, log_sq=math.log(0.1) ** 2 * 47)
    assert decide(active, canary, **RULE).promote is True


# ---- the verdict loop over Redis and the registry -----------------------------------------
def plan(name: str, version: str) -> CompositionPlan:
    return CompositionPlan(adapters=[UsedAdapter(name=name, version=version, weight=1.0)])


def two_versions(registry, adapter_dir):
    registry.add_version("m", adapter_dir(0), card("m"), embeddings())
    registry.add_version("m", adapter_dir(1), card("m"), embeddings(), activate=False)


def test_the_judge_rolls_a_failing_canary_back_once_and_audits_the_numbers(registry, adapter_dir):
    two_versions(registry, adapter_dir)
    reset(registry.r, "m", "v2")
    registry.set_canary("m", "v2", 10, auto=True, min_requests=20)
    judges = [CanaryJudge(registry, RolloutConfig()) for _ in range(2)]  # two ingress replicas
    for _ in range(30):
        judges[0].observe([plan("m", "v1")], 200, 0.1)
    written = []
    for i in range(6):
        judges[i % 2].catalog.get(force=True)
        written += judges[i % 2].observe([plan("m", "v2")], 503, 0.05)
    assert len(written) == 1 and written[0].startswith("m@v2 rolled back: errors")
    record = registry.get("m")
    assert record.canary is None and record.active_version == "v1" and record.last_verdict.startswith("v2 rolled")
    entry = registry.history("m")[-1]
    assert (entry["action"], entry["actor"], entry["version"]) == ("canary_rollback", "canary-verdict", "v2")
    assert "errors 3/3" in entry["detail"] or "errors 2/2" in entry["detail"]


def test_the_judge_promotes_a_healthy_canary_and_ignores_client_errors(registry, adapter_dir):
    two_versions(registry, adapter_dir)
    reset(registry.r, "m", "v2")
    registry.set_canary("m", "v2", 10, auto=True, min_requests=10)
    promoted = []
    judge_ = CanaryJudge(registry, RolloutConfig(), on_promote=promoted.append)
    for _ in range(20):
        judge_.observe([plan("m", "v1")], 200, 0.1)
    for _ in range(5):
        judge_.observe([plan("m", "v2")], 429, 0.0)  # the caller's limit, not the version
    assert progress(registry.r, "m", "v2")["canary"].requests == 0
    written = [v for _ in range(10) for v in judge_.observe([plan("m", "v2")], 200, 0.1)]
    assert len(written) == 1 and "promoted" in written[0]
    assert registry.get("m").active_version == "v2" and registry.history("m")[-1]["action"] == "canary_promote"
    assert promoted == ["m"]  # compatibility scores follow the new active version


def test_a_manual_canary_is_not_judged(registry, adapter_dir):
    two_versions(registry, adapter_dir)
    registry.set_canary("m", "v2", 10)
    assert CanaryJudge(registry, RolloutConfig()).observe([plan("m", "v2")] * 3, 503, 0.1) == []
    assert progress(registry.r, "m", "v2")["canary"].requests == 0 and registry.get("m").canary.version == "v2"


# ---- the quality gate ---------------------------------------------------------------------
def test_card_split_holds_out_every_fourth_labelled_sample():
    samples = [CardSample(inputs=f"q{i}", targets="" if i == 1 else f"a{i}") for i in range(10)]
    kept, evaluation, source = split_card(AdapterCard(model_name="m", sample=samples), None)
    labelled = [i for i in range(10) if i != 1]
    held = labelled[CARD_SPLIT_EVERY - 1::CARD_SPLIT_EVERY]
    assert [s.inputs for s in evaluation.samples] == [f"q{i}" for i in held] and source == "card_split"
    assert [s.inputs for s in kept.sample] == [f"q{i}" for i in range(10) if i not in held]
    given = GateSamples(metric="em", samples=[CardSample(inputs="x", targets="y")])
    assert split_card(AdapterCard(model_name="m", sample=samples), given)[1:] == (given, "held_out")
    with pytest.raises(ValueError, match="needs its expected answer"):
        GateSamples(samples=[CardSample(inputs="x")])


def test_gate_rule():
    assert judge(50.0, 51.0, 10.0, margin=2.0) == []
    assert "more than 2 below the active version's 53.0" in judge(50.0, 53.0, 10.0, margin=2.0)[0]
    assert judge(10.0, None, 10.0, margin=2.0) == ["10.0 is not above the base model's 10.0"]


def fake_answers(table: dict):
    """answers(prompts, key) for a unit test of the gate: each system's fixed answer per prompt."""
    async def answers(prompts, key):
        if isinstance(table[key], Exception):
            raise table[key]
        return [table[key].get(p, "") for p in prompts]

    return answers


def gate(table, active="v1"):
    evaluation = GateSamples(metric="em", samples=[CardSample(inputs=f"q{i}", targets=f"a{i}") for i in range(4)])
    return asyncio.run(run_gate(fake_answers(table), name="m", version="v2", active_version=active,
                                evaluation=evaluation, source="held_out", margin=2.0, max_samples=32))


def test_gate_report_scores_with_the_cards_metric():
    right = {f"q{i}": f"a{i}" for i in range(4)}
    report = gate({"m@v2": right, "m@v1": {"q0": "a0", "q1": "a1"}, None: {}})
    assert (report.score, report.active_score, report.base_score, report.passed) == (100.0, 50.0, 0.0, True)
    worse = gate({"m@v2": {"q0": "a0"}, "m@v1": right, None: {}})
    assert worse.passed is False and "below the active version's 100.0" in worse.reasons[0]
    broken = gate({"m@v2": RuntimeError("cannot load"), "m@v1": right, None: {}})
    assert broken.passed is False and "could not answer: cannot load" in broken.reasons[0]
    no_base = gate({"m@v2": right, "m@v1": right, None: RuntimeError("down")})
    assert no_base.passed is None and no_base.score == 100.0


def test_a_failed_gate_blocks_promote_and_canary_unless_forced_and_audited(registry, adapter_dir):
    two_versions(registry, adapter_dir)
    report = gate({"m@v2": {}, "m@v1": {"q0": "a0"}, None: {}})
    registry.set_quality("m", "v2", report)
    assert registry.history("m")[-1]["action"] == "quality_gate"
    for attempt in (lambda: registry.activate("m", "v2"), lambda: registry.set_canary("m", "v2", 10)):
        with pytest.raises(QualityGateRefused, match=r"refused: quality gate failed .* v2 0\.0, active v1 25\.0"):
            attempt()
    registry.set_canary("m", "v2", 10, force=True, actor="ops")
    assert registry.get("m").canary.forced and "forced over the quality gate" in registry.history("m")[-1]["detail"]
    registry.activate("m", "v2", actor="ops", force=True)
    entry = registry.history("m")[-1]
    assert (entry["action"], entry["actor"]) == ("activate", "ops") and "forced over the quality gate" in entry["detail"]
    assert registry.get("m").versions["v2"].quality.passed is False  # kept with the version


# ---- bounded metric labels ---------------------------------------------------------------
def test_version_labels_stay_bounded_and_canaries_always_get_theirs():
    from deployments.metrics import OTHER, VersionLabels
    from services.registry.records import Canary

    class Rec:
        def __init__(self, active, canary=None):
            self.active_version, self.canary = active, canary

    labels = VersionLabels(cap=3)
    tags = [labels.tags(f"a{i}", "v1", Rec("v1")) for i in range(1000)]
    assert len({(t["adapter"], t["version"]) for t in tags}) == 4 and tags[-1]["adapter"] == OTHER
    under_canary = Rec("v1", Canary(version="v2", percent=5))
    assert labels.tags("z", "v2", under_canary) == {"adapter": "z", "version": "v2", "role": "canary"}
    assert labels.tags("z", "v1", under_canary) == {"adapter": "z", "version": "v1", "role": "active"}
    assert labels.tags("a0", "v1", Rec("v1"))["adapter"] == "a0"  # already labelled stays labelled
