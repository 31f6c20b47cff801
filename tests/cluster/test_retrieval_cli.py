"""`loraretriever eval retrieval` and `retriever train`: outputs, exit codes, nothing written on failure."""
from __future__ import annotations

import json

import pytest

from cluster.cli import main

CARDS = [
    {"model_name": "addition", "domain": "arithmetic", "sample": [{"inputs": "What is 3 plus 4?", "targets": "7"},
                                                                  {"inputs": "Add 12 and 30.", "targets": "42"}]},
    {"model_name": "reverse", "sample": [{"inputs": "Reverse the word: lamp", "targets": "pmal"},
                                         {"inputs": "Spell 'river' backwards.", "targets": "revir"}]},
]
QUERIES = [
    {"inputs": "What is 9 plus 1?", "targets": "10", "task": "addition", "domain": "arithmetic", "metric": "em"},
    {"inputs": "Reverse the word: tree", "targets": "eert", "task": "reverse", "domain": "strings", "metric": "em"},
]


@pytest.fixture
def files(tmp_path):
    cards, queries = tmp_path / "CARDS.json", tmp_path / "QUERIES.json"
    cards.write_text(json.dumps(CARDS))
    queries.write_text(json.dumps(QUERIES))
    return cards, queries


def test_eval_prints_and_writes_the_result(files, tmp_path, capsys):
    out = tmp_path / "out.json"
    assert main(["eval", "retrieval", "--cards", str(files[0]), "--queries", str(files[1]), "--json", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(out.read_text())
    assert {"top1", "top3", "top5", "top8", "per_domain", "queries", "seconds"} <= printed.keys()
    assert printed["top1"] == 100.0 and printed["queries"] == 2
    assert set(printed["per_domain"]) == {"arithmetic", "strings"}


def test_exclude_own_takes_a_missing_card_domain_from_the_queries(files, capsys):
    assert main(["eval", "retrieval", "--cards", str(files[0]), "--queries", str(files[1]), "--exclude-own",
                 "--instruction", ""]) == 0
    printed = json.loads(capsys.readouterr().out)
    # each domain has one adapter only: with its own adapter removed, nothing of its domain is left
    assert printed["match"] == "domain" and printed["top8"] == 0.0


@pytest.mark.parametrize("break_files,message", [
    (lambda c, q: c.write_text("{not json"), "CARDS.json: not valid JSON"),
    (lambda c, q: c.write_text(json.dumps([{"model_name": "x", "sample": [{"inputs": ""}]}])),
     "CARDS.json: entry 0, field sample[0].inputs"),
    (lambda c, q: q.write_text(json.dumps([{**QUERIES[0], "metric": "f1"}])), "QUERIES.json: entry 0, field metric"),
    (lambda c, q: q.write_text(json.dumps([{**QUERIES[0], "task": "nope"}])), "no card for adapter 'nope'"),
    (lambda c, q: c.unlink(), "CARDS.json: file not found"),
])
def test_bad_files_give_one_line_exit_2_and_write_nothing(files, tmp_path, capsys, break_files, message):
    break_files(*files)
    out = tmp_path / "out.json"
    code = main(["eval", "retrieval", "--cards", str(files[0]), "--queries", str(files[1]), "--json", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1
    assert not out.exists()


def test_bad_embedder_folder_is_a_user_error(files, tmp_path, capsys):
    code = main(["eval", "retrieval", "--cards", str(files[0]), "--queries", str(files[1]),
                 "--embedder", str(tmp_path / "none")])
    assert code == 2 and "embedder model folder" in capsys.readouterr().err


def test_train_refuses_cards_it_cannot_train_on_and_writes_nothing(tmp_path, capsys):
    cards = tmp_path / "CARDS.json"
    cards.write_text(json.dumps(CARDS[:1]))
    code = main(["retriever", "train", "--cards", str(cards), "--out", str(tmp_path / "model")])
    assert code == 2 and "at least 2 adapters" in capsys.readouterr().err
    assert not (tmp_path / "model").exists()


def test_train_writes_a_model_folder_that_eval_loads(files, tmp_path, capsys):
    model = tmp_path / "model"
    assert main(["retriever", "train", "--cards", str(files[0]), "--out", str(model), "--epochs", "1"]) == 0
    assert (model / "config.json").is_file()
    assert main(["eval", "retrieval", "--cards", str(files[0]), "--queries", str(files[1]), "--embedder", str(model)]) == 0
    assert json.loads(capsys.readouterr().out.split("\n", 1)[1])["queries"] == 2
