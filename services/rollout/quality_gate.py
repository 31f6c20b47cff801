"""The quality gate: before a staged adapter version may take traffic, it answers held-out
samples of its task, and so do the active version and the base model, through the same
composer path that serves users; the answers are scored with the card's metric by the
code of `eval generate` (services.evaluation.generation).

The rule (docs/rollout.md): the version passes when its mean score is at most `margin`
points below the active version's and above the base model's. The report is stored with
the version; promote and canary refuse a failed version unless forced."""
from __future__ import annotations

import asyncio
import time
import uuid
from typing import Awaitable, Callable, Literal

import numpy as np
from pydantic import Field, field_validator

from services.evaluation.generation import primary_score
from services.registry.records import QualityReport
from services.schemas import AdapterCard, CardSample, ChatMessage, CompositionMode, CompositionPlan, Strict, UsedAdapter
from services.text_metrics import score

CARD_SPLIT_EVERY = 4  # without given samples, every 4th labelled card sample is held out of the card

# answers(user messages, 'name@version' or None for the base model) -> one answer per message
Answers = Callable[[list[str], "str | None"], Awaitable[list[str]]]


class GateSamples(Strict):
    """Held-out samples of the adapter's task, and the metric that scores answers to them."""

    metric: Literal["em", "bleu", "rouge"] = "rouge"
    samples: list[CardSample] = Field(default_factory=list, max_length=1024,
                                      description="empty: every 4th labelled card sample is held out")

    @field_validator("samples")
    @classmethod
    def _labelled(cls, samples: list[CardSample]) -> list[CardSample]:
        if any(not s.targets for s in samples):
            raise ValueError("every evaluation sample needs its expected answer in 'targets'")
        return samples


def split_card(card: AdapterCard, evaluation: GateSamples | None) -> tuple[AdapterCard, GateSamples, str]:
    """(the card the retriever embeds, the gate's samples, their source).

    Given samples are used as they are; otherwise every CARD_SPLIT_EVERY-th card sample with a
    target is moved out of the card, so the version is scored on inputs retrieval never saw."""
    evaluation = evaluation or GateSamples()
    if evaluation.samples:
        return card, evaluation, "held_out"
    labelled = [i for i, s in enumerate(card.sample) if s.targets]
    held = set(labelled[CARD_SPLIT_EVERY - 1::CARD_SPLIT_EVERY])
    kept = [s for i, s in enumerate(card.sample) if i not in held]
    samples = [card.sample[i] for i in sorted(held)]
    return card.model_copy(update={"sample": kept}), evaluation.model_copy(update={"samples": samples}), "card_split"


def mean_score(metric: str, answers: list[str], targets: list[str]) -> float:
    """Mean primary score (EM, BLEU or ROUGE-L, 0-100) of answers against their targets."""
    values = [primary_score(metric, score(metric, a, t)) for a, t in zip(answers, targets)]
    return round(sum(values) / len(values), 2)


def judge(version_score: float, active_score: float | None, base_score: float, margin: float) -> list[str]:
    """The reasons the version fails the gate (none: it passes)."""
    reasons = []
    if active_score is not None and version_score < active_score - margin:
        reasons.append(f"{version_score:.1f} is more than {margin:g} below the active version's {active_score:.1f}")
    if version_score <= base_score:
        reasons.append(f"{version_score:.1f} is not above the base model's {base_score:.1f}")
    return reasons


def centroid_cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine of the mean rows of two (samples, dim) card embeddings."""
    ca, cb = a.mean(axis=0), b.mean(axis=0)
    return float(ca @ cb / (np.linalg.norm(ca) * np.linalg.norm(cb) + 1e-12))


async def run_gate(answers: Answers, *, name: str, version: str, active_version: str | None,
                   evaluation: GateSamples, source: str, margin: float, max_samples: int,
                   cosine: float | None = None, moved_below: float = 0.9) -> QualityReport:
    """Score version, active version and base model on the same samples, concurrently (so the
    composer batches them together), and judge. A version that cannot answer fails; if the
    active version or the base model cannot, the version is reported as not gated."""
    samples = evaluation.samples[:max_samples]
    report = QualityReport(metric=evaluation.metric, samples=len(samples), source=source, version=version,
                           active_version=active_version, margin=margin, passed=None, centroid_cosine=cosine,
                           card_moved=cosine is not None and cosine < moved_below)
    if not samples:
        return report.model_copy(update={"reasons": ["no labelled samples to score (give 'evaluation' samples, "
                                                     f"or at least {CARD_SPLIT_EVERY} card samples with targets)"]})
    started = time.perf_counter()
    prompts, targets = [s.inputs for s in samples], [s.targets for s in samples]
    systems = {"version": f"{name}@{version}", "base": None}
    if active_version is not None:
        systems["active"] = f"{name}@{active_version}"
    outcomes = await asyncio.gather(*(answers(prompts, key) for key in systems.values()), return_exceptions=True)
    got = dict(zip(systems, outcomes))
    seconds = round(time.perf_counter() - started, 3)
    failed = {k: v for k, v in got.items() if isinstance(v, BaseException)}
    if "version" in failed:
        return report.model_copy(update={"passed": False, "seconds": seconds, "reasons": [
            f"{name}@{version} could not answer: {str(failed['version'])[:200]}"]})
    scores = {k: mean_score(evaluation.metric, v, targets) for k, v in got.items() if k not in failed}
    report = report.model_copy(update={"score": scores["version"], "active_score": scores.get("active"),
                                       "base_score": scores.get("base"), "seconds": seconds})
    if failed:
        return report.model_copy(update={"reasons": [f"the {k} could not answer: {str(v)[:200]}"
                                                     for k, v in failed.items()]})
    reasons = judge(scores["version"], scores.get("active"), scores["base"], margin)
    return report.model_copy(update={"passed": not reasons, "reasons": reasons})


def composer_answers(compose: Callable[..., Awaitable[dict]], max_tokens: int) -> Answers:
    """Answers through the serving composer: `compose(job)` runs one ComposeJob and returns its
    result dict (the call user requests go through). Greedy, chat template, as `eval generate`."""
    from services.serving.composer_service import ComposeJob

    async def answers(prompts: list[str], key: str | None) -> list[str]:
        plan = CompositionPlan()
        if key is not None:
            name, _, version = key.partition("@")
            plan = CompositionPlan(adapters=[UsedAdapter(name=name, version=version, weight=1.0)],
                                   composition=CompositionMode.selection)
        tag = uuid.uuid4().hex[:8]
        jobs = [ComposeJob(request_id=f"gate-{tag}-{i}", messages=[ChatMessage(role="user", content=p)], plan=plan,
                           max_tokens=max_tokens, temperature=0.0) for i, p in enumerate(prompts)]
        results = await asyncio.gather(*(compose(job) for job in jobs))
        return [r["text"] for r in results]

    return answers
