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


def test_command_on_the_tiny_zoo_matches_peft_generation(tiny_zoo, tmp_path, capsys):
    """Base and perfect-selection answers equal transformers' greedy generation with PEFT."""
    from peft import PeftModel
    from transformers import AutoTokenizer, LlamaForCausalLM

    from cluster.cli import main
    from cluster.demo.train import greedy_answers

    out = tmp_path / "result.json"
    args = ["eval", "generate", "--cards", str(tiny_zoo.cards_file), "--queries", str(tiny_zoo.queries_file),
            "--adapters", str(tiny_zoo.adapters_dir), "--base", str(tiny_zoo.base), "--top-k", "2",
            "--max-tokens", "6", "--device", "cpu", "--json", str(out)]
    assert main(args) == 0
    table = capsys.readouterr().out
    assert table.splitlines()[0] == "| setting | system | arithmetic | sentiment | strings | overall |"
    result = json.loads(out.read_text())
    systems = result["systems"]
    assert list(systems) == ["base", "perfect", "selection", "mixture", "fusion", "auto"]
    assert result["settings"]["own_adapter_in_top_k"] > 0
    decisions = systems["auto"]["decisions"]
    assert decisions["selection"] + decisions["mixture"] + decisions["fusion"] + decisions["none"] == len(tiny_zoo.queries)
    assert len(decisions["per_query"]) == len(tiny_zoo.queries)
    policy = result["policy"]
    assert policy["thresholds"]["in_domain"] > 0 and len(result["scores"]) == len(tiny_zoo.queries)
    assert policy["tables"] == len(tiny_zoo.cards) and policy["neighbours"] == 2  # measured on every card
    assert all(t["neighbours"] and "base" in t["measures"] for t in policy["gain_tables"].values())
    assert all(len(r) == 2 for r in result["retrieved"])

    queries = tiny_zoo.queries
    tokenizer = AutoTokenizer.from_pretrained(tiny_zoo.base)
    model = LlamaForCausalLM.from_pretrained(tiny_zoo.base)
    assert systems["base"]["answers"] == greedy_answers(model, tokenizer, [q.inputs for q in queries], 6)
    for task, folder in tiny_zoo.adapters.items():
        mine = [i for i, q in enumerate(queries) if q.task == task]
        tuned = PeftModel.from_pretrained(model, folder)
        expected = greedy_answers(tuned, tokenizer, [queries[i].inputs for i in mine], 6)
        model = tuned.unload()
        assert [systems["perfect"]["answers"][i] for i in mine] == expected
    assert systems["perfect"]["answers"] != systems["base"]["answers"]


def test_command_out_of_domain_never_retrieves_the_own_adapter(tiny_zoo, tmp_path):
    from cluster.cli import main

    out = tmp_path / "ood.json"
    assert main(["eval", "generate", "--cards", str(tiny_zoo.cards_file), "--queries", str(tiny_zoo.queries_file),
                 "--adapters", str(tiny_zoo.adapters_dir), "--base", str(tiny_zoo.base), "--exclude-own",
                 "--no-references", "--composition", "mixture", "--top-k", "2", "--max-tokens", "2",
                 "--device", "cpu", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert list(result["systems"]) == ["mixture"]
    assert result["settings"]["own_adapter_in_top_k"] == 0
    assert all(q.task not in r for q, r in zip(tiny_zoo.queries, result["retrieved"]))


@pytest.mark.parametrize("extra, message", [
    (["--top-k", "3", "--exclude-own"], "--top-k 3 exceeds the 2 adapters a query can retrieve"),
    (["--max-tokens", "0"], "--max-tokens must be at least 1, not 0"),
])
def test_command_rejects_bad_arguments(tiny_zoo, tmp_path, capsys, extra, message):
    from cluster.cli import main

    out = tmp_path / "never.json"
    args = ["eval", "generate", "--cards", str(tiny_zoo.cards_file), "--queries", str(tiny_zoo.queries_file),
            "--adapters", str(tiny_zoo.adapters_dir), "--base", str(tiny_zoo.base), "--json", str(out), *extra]
    assert main(args) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_command_names_a_missing_adapter_folder(tiny_zoo, tmp_path, capsys):
    import shutil

    from cluster.cli import main

    adapters = tmp_path / "adapters"
    shutil.copytree(tiny_zoo.adapters_dir, adapters)
    shutil.rmtree(adapters / "add")
    assert main(["eval", "generate", "--cards", str(tiny_zoo.cards_file), "--queries", str(tiny_zoo.queries_file),
                 "--adapters", str(adapters), "--base", str(tiny_zoo.base)]) == 2
    assert "no adapter folder for add" in capsys.readouterr().err


def test_held_out_queries_evaluate_and_report(tiny_zoo, tmp_path, capsys):
    from cluster.cli import main

    held = tmp_path / "held_out.json"
    assert main(["demo", "held-out", "--out", str(held), "--per-task", "1"]) == 0
    out = tmp_path / "held.json"
    assert main(["eval", "generate", "--cards", str(tiny_zoo.cards_file), "--queries", str(held), "--held-out",
                 "--adapters", str(tiny_zoo.adapters_dir), "--base", str(tiny_zoo.base), "--top-k", "2",
                 "--composition", "selection", "auto", "--max-tokens", "2", "--device", "cpu",
                 "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert list(result["systems"]) == ["base", "selection", "auto"]  # no adapter to select perfectly
    assert sorted(result["systems"]["auto"]["domains"]) == ["composed", "paraphrased"]
    capsys.readouterr()
    assert main(["demo", "report", "--in-domain", str(out), "--held-out", str(out)]) == 0
    report = capsys.readouterr().out
    assert "| held-out tasks | auto (adaptive) |" in report and "| held-out tasks | " in report.split("\n\n")[1]


def test_held_out_queries_must_have_no_adapter(tiny_zoo, capsys):
    from cluster.cli import main

    assert main(["eval", "generate", "--cards", str(tiny_zoo.cards_file), "--queries", str(tiny_zoo.queries_file),
                 "--held-out", "--adapters", str(tiny_zoo.adapters_dir), "--base", str(tiny_zoo.base)]) == 2
    assert "has an adapter, it is not held out" in capsys.readouterr().err

