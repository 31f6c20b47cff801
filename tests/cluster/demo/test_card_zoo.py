"""`demo build --cards`: a real-task zoo from a subset of the bundled Flan cards, on the tiny Llama."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from cluster.cli import main
from cluster.demo.card_zoo import TaskCard, choose_tasks, split_samples
from cluster.demo.zoo import ZooError, load_zoo

FLAN = Path(__file__).resolve().parents[3] / "cluster" / "data" / "flan_cards.json"
TASKS = ("sst2", "copa", "glue_qqp")


@pytest.fixture(scope="module")
def cards_file(tmp_path_factory):
    """Three tasks of two families, 8 samples each (the command reads any file of this shape)."""
    tasks = [t for t in json.loads(FLAN.read_text())["tasks"] if t["task"] in TASKS]
    path = tmp_path_factory.mktemp("cards") / "cards.json"
    path.write_text(json.dumps({"tasks": [{**t, "samples": t["samples"][:8]} for t in tasks]}))
    return path


@pytest.fixture(scope="module")
def built(cards_file, tmp_path_factory):
    root = tmp_path_factory.mktemp("flan_zoo")
    args = ["demo", "build", "--tiny", "--cards", str(cards_file), "--families", "sentiment",
            "--tasks", "copa", "--held-out", "2", "--root", str(root)]
    assert main(args) == 0
    return root, args


def test_one_adapter_per_chosen_task_trained_on_its_training_split_only(built, cards_file):
    root, _ = built
    zoo = load_zoo(root)
    assert zoo.complete and sorted(zoo.adapters) == ["copa", "sst2"]  # sentiment is sst2 here
    by_task = {t["task"]: t for t in json.loads(cards_file.read_text())["tasks"]}
    for card in zoo.cards:
        held = [q for q in zoo.queries if q.task == card.model_name]
        assert len(card.sample) == 6 and len(held) == 2 and card.domain == by_task[card.model_name]["domain"]
        train = {(s.inputs, s.targets) for s in card.sample}
        test = {(q.inputs, q.targets) for q in held}
        assert not train & test and train | test == {(s["inputs"], s["targets"]) for s in by_task[card.model_name]["samples"]}
        assert all(q.metric == "em" and q.domain == card.domain for q in held)
    manifest = json.loads((root / "manifest.json").read_text())
    assert {"adapter_score", "base_score", "train_seconds"} <= set(manifest["adapters"]["copa"])


def test_a_second_build_only_verifies(built):
    root, args = built
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*.safetensors")}
    assert main(args) == 0
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*.safetensors")} == before


def test_folds_hold_out_disjoint_samples():
    task = TaskCard("t", "d", [(f"x{i}", f"y{i}") for i in range(20)])
    held = [set(split_samples(task, 5, fold)[1]) for fold in range(4)]
    assert all(len(h) == 5 for h in held) and set().union(*held) == set(task.samples)
    assert split_samples(task, 5, 0) == split_samples(task, 5, 0)  # fixed per task
    with pytest.raises(ZooError, match="--fold 4"):
        split_samples(task, 5, 4)
    with pytest.raises(ZooError, match="cannot hold out 20"):
        split_samples(task, 20, 0)


def test_unknown_families_and_tasks_are_named():
    tasks = [TaskCard("a", "nli", [("x", "y")]), TaskCard("b", "sentiment", [("x", "y")])]
    assert [t.name for t in choose_tasks(tasks, families=["nli"])] == ["a"]
    with pytest.raises(ZooError, match="no task of family paraphrase"):
        choose_tasks(tasks, families=["paraphrase"])
    with pytest.raises(ZooError, match="no card for zzz"):
        choose_tasks(tasks, names=["zzz"])


@pytest.mark.parametrize("args, message", [
    (["--families", "nli"], "add --cards FILE"),
    (["--cards", "{cards}", "--adapters", "2"], "--adapters N is for the demo zoo"),
    (["--cards", "{cards}", "--families", "poetry"], "no task of family poetry"),
    (["--cards", "{missing}"], "cannot read a cards file"),
])
def test_bad_input_is_one_sentence_and_exit_2(cards_file, tmp_path, capsys, args, message):
    args = [a.format(cards=cards_file, missing=tmp_path / "none.json") for a in args]
    assert main(["demo", "build", "--tiny", "--root", str(tmp_path / "zoo"), *args]) == 2
    assert message in capsys.readouterr().err
