"""Registry-driven retriever tuning: a real fine-tune of the packaged embedder on the tiny zoo's
registered cards, model versions in a real redis-server, kept only when better, rolled back."""
from __future__ import annotations

import json

import pytest
from registered_zoo import register_tiny_zoo

from services.retrieval import TRAINING_INFO_FILE
from services.retrieval.model_versions import LOCK_KEY, RetrieverModels, registry_cards, tune
from services.retrieval.served import Serving, read_serving
from services.retrieval.tuning import split_cards


@pytest.fixture
def registered(tiny_zoo, redis_server, tmp_path):
    admin, client, _ = register_tiny_zoo(tiny_zoo, redis_server, tmp_path / "store", db=7)
    yield admin.registry, RetrieverModels(client, tmp_path / "models")
    client.flushdb()


def snapshot(models: RetrieverModels, root) -> tuple:
    return (models.r.hgetall("lr:retriever:models"), models.r.get("lr:retriever:active"),
            models.r.lrange("lr:retriever:previous", 0, -1), sorted(p.name for p in root.iterdir()) if root.exists() else [])


def test_split_holds_out_samples_and_keeps_two_for_training(tiny_zoo):
    train, heldout = split_cards(tiny_zoo.cards, 0.25, seed=1)
    for t, h, card in zip(train, heldout, tiny_zoo.cards):
        assert t.model_name == h.model_name == card.model_name
        assert len(h.sample) == round(len(card.sample) * 0.25) and len(t.sample) + len(h.sample) == len(card.sample)
        assert not {s.inputs for s in t.sample} & {s.inputs for s in h.sample} or len(card.sample) < 3


def test_split_of_a_card_does_not_depend_on_the_other_cards(tiny_zoo):
    """A later run holds out the same samples of an unchanged card, whatever was added or retired:
    the serving version's gate model never trained on them."""
    _, heldout = split_cards(tiny_zoo.cards, 0.25, seed=1)
    _, heldout_later = split_cards(tiny_zoo.cards[::-1][:-1], 0.25, seed=1)  # reordered, one card retired
    later = {h.model_name: h.sample for h in heldout_later}
    assert len(later) == len(heldout) - 1
    assert all(later[h.model_name] == h.sample for h in heldout if h.model_name in later)
    _, other_seed = split_cards(tiny_zoo.cards, 0.25, seed=2)
    assert [h.sample for h in other_seed] != [h.sample for h in heldout]


def test_a_better_candidate_is_kept_a_worse_one_refused_and_rollback_restores(registered, tmp_path):
    registry, models = registered
    root = tmp_path / "models"
    kept = tune(registry, models, epochs=1, min_gain=-100.0)  # any candidate is "better": the keeping path
    assert kept["status"] == "kept", kept
    assert 0 <= kept["candidate_top1"] <= 100 and 0 <= kept["current_top1"] <= 100
    active = models.active()
    assert active.version == kept["version"] == "r1" and (root / "r1" / "config.json").is_file()
    # served: the recipe refit on every sample; the split model stays beside it as the gate model
    assert kept["refit"] is True and kept["refit_seconds"] > 0
    assert active.gate_path == str(root / "r1-gate") and (root / "r1-gate" / "config.json").is_file()
    served_info = json.loads((root / "r1" / TRAINING_INFO_FILE).read_text())
    gate_info = json.loads((root / "r1-gate" / TRAINING_INFO_FILE).read_text())
    assert served_info["adapters"] == gate_info["adapters"] == sorted(c.model_name for c in registry_cards(registry)[0])
    assert (root / "r1" / "model.safetensors").read_bytes() != (root / "r1-gate" / "model.safetensors").read_bytes()
    assert read_serving(root / "r1") == Serving(active.backend, active.scoring, active.hybrid_weight)  # for eval --embedder
    assert active.fingerprint == registry_cards(registry)[1] and models.last_tuning()["status"] == "kept"
    # scored per runtime and serving; served the way float32 scored best (ties: best sample before
    # centroid, embedding alone before hybrid), on int8 only where int8 keeps that top-1 within a point
    per = kept["candidate_top1_per_runtime"]
    keys = ["samples", "centroid", "samples+hybrid", "centroid+hybrid"]
    assert set(per) == {"onnx", "onnx-int8"} and all(list(p) == keys for p in per.values())
    best = max(keys, key=lambda k: per["onnx"][k]["top1"])
    backend = "onnx-int8" if per["onnx-int8"][best]["top1"] >= per["onnx"][best]["top1"] - 1.0 else "onnx"
    assert (kept["scoring"], kept["backend"]) == (active.scoring, active.backend) == (best.split("+")[0], backend)
    assert kept["hybrid_weight"] == active.hybrid_weight == per[backend][best]["weight"]
    assert kept["candidate_top1"] == per[backend][best]["top1"]
    assert all(per[b][k]["weight"] == 1.0 for b in per for k in ("centroid", "samples"))
    before = snapshot(models, root)
    # nothing beats the current by 100 points; both scored as replicas serve them, by the hybrid score
    refused = tune(registry, models, epochs=1, min_gain=100.0, hybrid=True)
    assert refused["status"] == "refused" and "does not beat" in refused["detail"] and refused["hybrid"] is True
    assert 0 <= refused["candidate_top1"] <= 100 and 0 <= refused["current_top1"] <= 100
    assert refused["current_version"] == "r1"
    assert refused["current_scored_with"] == active.gate_path  # by held-out samples it never trained on
    assert snapshot(models, root) == before  # nothing changed but the last run's record
    assert models.last_tuning()["status"] == "refused"

    models.r.set(LOCK_KEY, "another run")
    assert tune(registry, models, epochs=1)["status"] == "busy"
    models.r.delete(LOCK_KEY)

    assert models.rollback() is None and models.active() is None  # back to the configured embedder
    with pytest.raises(LookupError):
        models.rollback()
    assert [m.version for m in models.list()] == ["r1"]  # the version stays for a later promotion


def test_a_failed_run_leaves_everything_as_it_was(registered, tmp_path):
    registry, models = registered
    models.root = tmp_path / "a-file"
    models.root.write_text("not a folder")
    before = snapshot(models, tmp_path / "none")
    failed = tune(registry, models, epochs=1, min_gain=-100.0)
    assert failed["status"] == "failed" and failed["detail"]
    assert snapshot(models, tmp_path / "none") == before and models.r.get(LOCK_KEY) is None


def test_a_failed_refit_keeps_nothing(registered, tmp_path, monkeypatch):
    """The candidate passed its gate, then training it again on every sample fails: no version, no folder."""
    from services.retrieval import model_versions

    registry, models = registered
    root = tmp_path / "models"

    def refit_fails(cards, out_dir, **_):
        out_dir.mkdir(parents=True)
        (out_dir / "partial").write_text("half a model")
        raise RuntimeError("out of memory")

    monkeypatch.setattr(model_versions, "refit_model", refit_fails)
    before = snapshot(models, root)
    failed = tune(registry, models, epochs=1, min_gain=-100.0)
    assert failed["status"] == "failed" and "out of memory" in failed["detail"]
    assert models.active() is None and models.list() == []
    assert snapshot(models, root) == before  # hidden candidate folders included
    assert models.r.get(LOCK_KEY) is None


def test_automatic_runs_wait_for_a_quiet_registry_and_never_repeat_a_card_set(registered):
    """The debounce of the Ingress's watch (deployments/retriever_tuning.py), on the real registry."""
    import json

    from deployments.retriever_tuning import TuningLauncher
    from services.config import AppConfig
    from services.retrieval.model_versions import LAST_KEY

    registry, models = registered
    cfg = AppConfig.model_validate({"retriever_tuning": {"debounce_s": 60, "min_adapters": 3}})
    launcher = TuningLauncher(cfg, registry, models)
    cards, fingerprint = registry_cards(registry)
    assert not launcher.due(len(cards), fingerprint, now=0.0)  # first sight: the quiet time starts
    assert not launcher.due(len(cards), fingerprint, now=59.0)
    assert launcher.due(len(cards), fingerprint, now=60.0)
    assert not launcher.due(len(cards), "another set", now=61.0)  # a change restarts the wait
    assert not launcher.due(len(cards), "another set", now=120.0)
    assert launcher.due(len(cards), "another set", now=121.0)
    assert not launcher.due(2, "another set", now=500.0)  # too few adapters
    models.r.set(LAST_KEY, json.dumps({"fingerprint": "another set", "status": "refused"}))
    assert not launcher.due(len(cards), "another set", now=500.0)  # the last run saw this set


def test_serving_choice_prefers_float32s_best_best_sample_on_a_tie_and_int8_only_within_a_point():
    from services.retrieval.tuning import choose_serving

    def per(f32: tuple, i8: tuple, weight=0.7):  # top-1 of centroid, samples, centroid+hybrid, samples+hybrid
        keys = ("centroid", "samples", "centroid+hybrid", "samples+hybrid")
        return {b: {k: {"top1": t, "weight": weight if "hybrid" in k else 1.0} for k, t in zip(keys, tops)}
                for b, tops in (("onnx", f32), ("onnx-int8", i8))}

    assert choose_serving(per((80, 82, 81, 81), (79, 81, 0, 0))) == ("onnx-int8", "samples", 1.0)  # int8 gives 1
    assert choose_serving(per((80, 82, 81, 81), (80, 80.9, 0, 0))) == ("onnx", "samples", 1.0)  # 1.1: float32
    assert choose_serving(per((80, 80, 80, 80), (80, 60, 80, 80))) == ("onnx", "samples", 1.0)  # a tie: best sample
    assert choose_serving(per((81, 80, 81, 81), (80.5, 0, 0, 0))) == ("onnx-int8", "centroid", 1.0)  # the embedding alone
    assert choose_serving(per((80, 79, 81, 84), (0, 0, 0, 83.5), 0.6)) == ("onnx-int8", "samples", 0.6)
