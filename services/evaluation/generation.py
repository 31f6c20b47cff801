"""Mixed-task generation quality: base model, perfect selection and retrieved compositions.

Every system answers the same queries. Queries are interleaved across tasks so each
engine step is one heterogeneous batch (rows with different adapter sets), the way a
server sees traffic. Scores are on a 0-100 scale by each query's metric.
"""
from __future__ import annotations

from collections import Counter, defaultdict
from itertools import zip_longest
from typing import Iterable

from tqdm.auto import tqdm

from services.composition import Composition
from services.serving.policy import AUTO, Decision
from services.schemas import Query
from services.text_metrics import score

REFERENCE_SYSTEMS = ("base", "perfect")  # no retrieval: the floor and the ceiling
COMPOSITIONS = ("selection", "mixture", "fusion", "auto")  # auto: the adaptive policy (services/serving/policy.py)
SYSTEMS = REFERENCE_SYSTEMS + COMPOSITIONS


def chat_prompt_ids(tokenizer, user_text: str) -> list[int]:
    """Token ids of the base model's chat-template prompt for one user message, ready for the answer."""
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": user_text}], tokenize=False, add_generation_prompt=True
    )
    return tokenizer(text, add_special_tokens=False).input_ids


def primary_score(metric: str, scores: dict[str, float]) -> float:
    """The one number a query contributes to averages: EM, BLEU or ROUGE-L."""
    return scores["rougeL"] if metric == "rouge" else scores[metric]


def interleave_tasks(queries: list[Query]) -> list[int]:
    """Query indices in round-robin order over tasks, so consecutive rows differ in task."""
    by_task: dict[str, list[int]] = defaultdict(list)
    for i, q in enumerate(queries):
        by_task[q.task].append(i)
    return [i for group in zip_longest(*by_task.values()) for i in group if i is not None]


def plan(system: str, query: Query, retrieved: list[str] | None, decision: Decision | None = None) -> Composition:
    """How `system` answers a query; `retrieved` = adapter names best first (top k); `decision` =
    what the auto policy chose for it."""
    if system == "base":
        return Composition()
    if system == "perfect":
        return Composition.single(query.task)
    if system == AUTO:
        if decision is None:
            raise ValueError("the auto system needs the policy's decision for every query")
        return Composition.of(decision.mode, decision.adapters, decision.weights)
    if system not in COMPOSITIONS:
        raise ValueError(f"unknown system {system!r}; expected one of {', '.join(SYSTEMS)}")
    return Composition.of(system, retrieved or ())  # nothing retrieved: the base model answers


def decision_counts(decisions: list[Decision]) -> dict:
    """How often the policy selected, mixed, fused or fell back to the base model; and each query's choice."""
    modes = Counter(d.mode.value for d in decisions)
    return {"selection": modes["selection"], "mixture": modes["mixture"], "fusion": modes["fusion"],
            "none": modes["none"],
            "mixed_adapters_mean": round(sum(len(d.adapters) for d in decisions if d.mode.value in ("mixture", "fusion"))
                                         / max(modes["mixture"] + modes["fusion"], 1), 2),
            "per_query": [f"{d.mode.value}:{'+'.join(d.adapters)}" for d in decisions]}


def summarize(queries: list[Query], scores: list[dict[str, float]]) -> dict:
    """Mean of every metric per domain and overall, plus `score`: the mean primary score."""

    def mean_of(indices: Iterable[int]) -> dict:
        indices = list(indices)
        sums: dict[str, list[float]] = defaultdict(list)
        for i in indices:
            for name, value in scores[i].items():
                sums[name].append(value)
            sums["score"].append(primary_score(queries[i].metric, scores[i]))
        return {"n": len(indices), **{name: round(sum(v) / len(v), 2) for name, v in sums.items()}}

    domains = sorted({q.domain for q in queries})
    return {
        "overall": mean_of(range(len(queries))),
        "domains": {d: mean_of(i for i, q in enumerate(queries) if q.domain == d) for d in domains},
    }


def evaluate_generation(
    engine, tokenizer, queries: list[Query], retrieved: list[list[str]], *, systems: Iterable[str] = SYSTEMS,
    decisions: list[Decision] | None = None, batch_size: int = 32, max_tokens: int = 24, progress: bool = False,
) -> dict:
    """Answer every query with every system through `engine` (a CompositionEngine with every
    needed adapter loaded under its name) and score the answers.

    retrieved[i] = adapter names retrieved for queries[i], best first; decisions[i] = the auto
    policy's decision for queries[i] (needed for the auto system).
    Returns {system: {"overall": {...}, "domains": {...}, "answers": [...]}}."""
    from services.lora.generation import GenerationRequest

    if len(retrieved) != len(queries):
        raise ValueError(f"{len(retrieved)} retrieval results for {len(queries)} queries")
    prompts = [chat_prompt_ids(tokenizer, q.inputs) for q in queries]
    order = interleave_tasks(queries)
    report = {}
    for system in systems:
        rows = [plan(system, q, r, decisions[i] if decisions else None)
                for i, (q, r) in enumerate(zip(queries, retrieved))]
        answers: list[str] = [""] * len(queries)
        bar = tqdm(total=len(queries), desc=f"{system:>9}", unit="query", disable=not progress)
        for start in range(0, len(order), batch_size):
            batch = order[start:start + batch_size]
            requests = [
                GenerationRequest(prompt_ids=prompts[i], composition=rows[i], max_tokens=max_tokens, temperature=0.0)
                for i in batch
            ]
            for i, result in zip(batch, engine.generate(requests)):
                answers[i] = result.text
            bar.update(len(batch))
        bar.close()
        scores = [score(q.metric, a, q.targets) for q, a in zip(queries, answers)]
        report[system] = {**summarize(queries, scores), "answers": answers}
        if system == AUTO:
            report[system]["decisions"] = decision_counts(decisions)
    return report
