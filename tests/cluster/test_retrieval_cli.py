"""`loraretriever eval retrieval` and `retriever train`: outputs, exit codes, nothing written on failure."""
from __future__ import annotations

import json

import pytest

from cluster.cli import main
from services.retrieval.host_runtime import host_backend
from services.retrieval.served import SERVING_FILE

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


def test_bad_embedder_settings_exit_2(files, capsys):
    args = ["eval", "retrieval", "--cards", str(files[0]), "--queries", str(files[1])]
    assert main([*args, "--max-seq-length", "3"]) == 2
    assert "max_seq_length must be at least 8" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:  # argparse refuses an unknown backend by name
        main([*args, "--backend", "tpu"])
    assert exit_info.value.code == 2 and "invalid choice: 'tpu'" in capsys.readouterr().err


def test_backends_give_the_same_ranking_on_the_tiny_files(files, capsys):
    for backend in ("torch", "onnx"):
        assert main(["eval", "retrieval", "--cards", str(files[0]), "--queries", str(files[1]), "--backend", backend]) == 0
        assert json.loads(capsys.readouterr().out)["top1"] == 100.0


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


def test_train_writes_a_model_folder_that_eval_loads(files, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("LORARETRIEVER_HOME", str(tmp_path / "home"))  # the ONNX export of this model goes here
    model = tmp_path / "model"
    assert main(["retriever", "train", "--cards", str(files[0]), "--out", str(model), "--epochs", "1"]) == 0
    assert "nothing scored" in capsys.readouterr().out  # 2 samples a card: none can be held out
    assert (model / "config.json").is_file()
    recorded = json.loads((model / SERVING_FILE).read_text())
    assert (recorded["backend"], recorded["scoring"], recorded["hybrid_weight"], recorded["gated"]) == \
        ("onnx", "centroid", 1.0, False)
    assert main(["eval", "retrieval", "--cards", str(files[0]), "--queries", str(files[1]), "--embedder", str(model)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["queries"] == 2 and printed["serving"] == {"backend": host_backend("onnx"), "scoring": "centroid", "hybrid_weight": 1.0}
    exported = list((tmp_path / "home" / "embedders").glob("model-*/model.onnx"))
    assert bool(exported) == (host_backend("onnx") == "onnx")  # the ONNX runtime exports once; bf16 reads the folder


CARDS_4 = [{"model_name": "addition", "domain": "arithmetic",
            "sample": [{"inputs": f"What is {a} plus {b}?", "targets": str(a + b)} for a, b in ((3, 4), (12, 30), (5, 6), (8, 1))]},
           {"model_name": "reverse", "domain": "strings",
            "sample": [{"inputs": f"Reverse the word: {w}", "targets": w[::-1]} for w in ("lamp", "river", "stone", "cloud")]},
           {"model_name": "upper", "domain": "strings",
            "sample": [{"inputs": f"Write in capital letters: {w}", "targets": w.upper()} for w in ("lamp", "river", "stone", "cloud")]}]


def test_train_scores_a_candidate_chooses_its_serving_and_refits(tmp_path, capsys, monkeypatch):
    """Cards that can hold samples out: the cluster's tuning run, offline. The served model is the
    refit on every sample (not the candidate scored), and eval serves the folder the recorded way."""
    monkeypatch.setenv("LORARETRIEVER_HOME", str(tmp_path / "home"))
    cards, queries = tmp_path / "CARDS.json", tmp_path / "QUERIES.json"
    cards.write_text(json.dumps(CARDS_4))
    queries.write_text(json.dumps(QUERIES))
    refit, kept = tmp_path / "refit", tmp_path / "candidate"
    assert main(["retriever", "train", "--cards", str(cards), "--out", str(refit), "--epochs", "1"]) == 0
    said = capsys.readouterr().out
    assert "held-out top-1" in said and "refitting on all 12 card samples" in said
    assert main(["retriever", "train", "--cards", str(cards), "--out", str(kept), "--epochs", "1", "--no-refit"]) == 0
    assert "refitting" not in capsys.readouterr().out
    recorded = json.loads((refit / SERVING_FILE).read_text())
    assert recorded["gated"] is True and recorded["refit"] is True and recorded["heldout_samples"] == 3
    assert recorded == {**json.loads((kept / SERVING_FILE).read_text()), "refit": True}  # one split, one choice
    assert (refit / "model.safetensors").read_bytes() != (kept / "model.safetensors").read_bytes()
    chosen = {k: recorded[k] for k in ("backend", "scoring", "hybrid_weight")}
    assert recorded["candidate_top1"] == recorded["candidate_top1_per_runtime"][chosen["backend"]][
        chosen["scoring"] + ("+hybrid" if chosen["hybrid_weight"] < 1.0 else "")]["top1"]

    args = ["eval", "retrieval", "--cards", str(cards), "--queries", str(queries), "--embedder", str(refit)]
    assert main(args) == 0  # served as replicas on this host serve it (bf16 where the CPU has AMX)
    assert json.loads(capsys.readouterr().out)["serving"] == {**chosen, "backend": host_backend(chosen["backend"])}
    assert main([*args, "--backend", "torch", "--scoring", "samples", "--hybrid-weight", "0.5"]) == 0
    assert json.loads(capsys.readouterr().out)["serving"] == {"backend": "torch", "scoring": "samples", "hybrid_weight": 0.5}


def test_eval_serves_the_configured_embedder_as_replicas_do(tmp_path, capsys):
    """No folder: float32 (bf16 on a CPU with AMX), centroid, the hybrid weight chosen on the cards
    (lexical.choose_weight)."""
    from services.retrieval.embedder import Embedder
    from services.retrieval.lexical import choose_weight

    cards, queries = tmp_path / "CARDS.json", tmp_path / "QUERIES.json"
    cards.write_text(json.dumps(CARDS_4))
    queries.write_text(json.dumps(QUERIES))
    assert main(["eval", "retrieval", "--cards", str(cards), "--queries", str(queries)]) == 0
    serving = json.loads(capsys.readouterr().out)["serving"]
    embedder = Embedder(backend=host_backend("onnx"))
    texts = {c["model_name"]: [s["inputs"] for s in c["sample"]] for c in CARDS_4}
    expected = choose_weight(texts, {n: embedder.encode(t) for n, t in texts.items()})[0]
    assert serving == {"backend": host_backend("onnx"), "scoring": "centroid", "hybrid_weight": expected}
    assert main(["eval", "retrieval", "--cards", str(cards), "--queries", str(queries), "--no-hybrid"]) == 0
    assert json.loads(capsys.readouterr().out)["serving"]["hybrid_weight"] == 1.0
    assert main(["eval", "retrieval", "--cards", str(cards), "--queries", str(queries), "--hybrid-weight", "1.5"]) == 2
    assert "--hybrid-weight must be between 0 and 1" in capsys.readouterr().err


def _a_file(tmp_path):
    (tmp_path / "file.txt").write_text("x")
    return tmp_path / "file.txt"


# /sys refuses new files to everyone, root included (a chmod-ed folder would not stop root).
@pytest.mark.parametrize("command, target, message", [
    ("eval", lambda tmp: "/sys/result.json", "cannot write in /sys"),
    ("eval", lambda tmp: tmp, "is a folder, not a file"),
    ("eval", lambda tmp: _a_file(tmp) / "result.json", "file.txt is not a folder"),
    ("eval", lambda tmp: tmp / "missing" / "result.json", "missing does not exist"),
    ("train", lambda tmp: "/sys/model", "cannot write in /sys"),
    ("train", lambda tmp: "/sys/new/deeper/model", "cannot write in /sys"),
    ("train", lambda tmp: _a_file(tmp), "is a file, not a folder"),
    ("train", lambda tmp: _a_file(tmp) / "model", "file.txt is a file, not a folder"),
])
def test_output_paths_are_checked_before_the_work(tmp_path, capsys, command, target, message):
    """The cards file does not exist either: the output path's error comes first, so nothing was
    loaded, embedded or trained before it."""
    missing = str(tmp_path / "no-cards.json")
    args = (["eval", "retrieval", "--cards", missing, "--queries", missing, "--json", str(target(tmp_path))]
            if command == "eval" else ["retriever", "train", "--cards", missing, "--out", str(target(tmp_path))])
    code = main(args)
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1, err
    assert "Traceback" not in err and not list(tmp_path.glob(".write-check.*"))


def test_train_creates_missing_parents_of_out(files, tmp_path):
    model = tmp_path / "new" / "deeper" / "model"
    assert main(["retriever", "train", "--cards", str(files[0]), "--out", str(model), "--epochs", "1"]) == 0
    assert (model / "config.json").is_file()
