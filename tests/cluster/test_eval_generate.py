"""`eval generate`: row plans, task interleaving, summaries by hand, and the whole command on
the tiny zoo with PEFT + transformers generation as the oracle of the engine's answers."""
from __future__ import annotations

import json

import pytest

from services.evaluation.generation import interleave_tasks, plan, summarize
from services.schemas import CompositionMode, Query


def _q(task: str, domain: str, metric: str = "em", target: str = "x") -> Query:
    return Query(inputs=f"{task} input", targets=target, task=task, domain=domain, metric=metric)


def test_plan_rows_per_system():
    q = _q("add", "arithmetic")
    assert plan("base", q, ["add", "double"]).mode is CompositionMode.none
    assert plan("perfect", q, ["double"]).adapters == ("add",)
    assert plan("selection", q, ["double", "add"]).adapters == ("double",)
    mixture = plan("mixture", q, ["double", "add", "subtract"])
    assert mixture.adapters == ("double", "add", "subtract") and mixture.weights == pytest.approx((1 / 3,) * 3)
    assert plan("fusion", q, ["double", "add"]).mode is CompositionMode.fusion
    assert plan("mixture", q, []).mode is CompositionMode.none  # nothing retrieved: base model
    with pytest.raises(ValueError, match="unknown system 'best'"):
        plan("best", q, [])


def test_interleave_mixes_tasks_in_every_batch():
    queries = [_q("a", "d")] * 3 + [_q("b", "d")] * 2 + [_q("c", "e")]
    assert interleave_tasks(queries) == [0, 3, 5, 1, 4, 2]


def test_summarize_by_hand():
    queries = [_q("a", "d1"), _q("a", "d1"), _q("t", "d2", "bleu"), _q("r", "d2", "rouge")]
    scores = [{"em": 100.0}, {"em": 0.0}, {"bleu": 40.0}, {"rouge1": 90.0, "rouge2": 50.0, "rougeL": 80.0}]
    out = summarize(queries, scores)
    assert out["domains"]["d1"] == {"n": 2, "em": 50.0, "score": 50.0}
    assert out["domains"]["d2"] == {"n": 2, "bleu": 40.0, "rouge1": 90.0, "rouge2": 50.0, "rougeL": 80.0, "score": 60.0}
    assert out["overall"]["score"] == pytest.approx((100 + 0 + 40 + 80) / 4)
