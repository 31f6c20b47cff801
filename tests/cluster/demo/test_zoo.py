"""The demo zoo on the tiny model: layout, checksums, PEFT compatibility, skip and resume."""
from __future__ import annotations

import hashlib
import json
import shutil

import pytest
import torch
from peft import PeftModel
from transformers import AutoTokenizer, LlamaForCausalLM

from cluster.cli import main
from cluster.demo.train import LORA_TARGETS
from cluster.demo.zoo import CARD_SAMPLES, ZooError, build_zoo, load_zoo


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_layout_cards_and_queries(tiny_zoo):
    assert tiny_zoo.complete
    assert {p.name for p in tiny_zoo.base.iterdir()} >= {"config.json", "model.safetensors", "tokenizer.json"}
    assert AutoTokenizer.from_pretrained(tiny_zoo.base).chat_template
    assert sorted(tiny_zoo.adapters) == ["add", "review_sentiment", "uppercase"]
    assert len({c.domain for c in tiny_zoo.cards}) == 3
    assert all(len(c.sample) == CARD_SAMPLES for c in tiny_zoo.cards)
    card_inputs = {s.inputs for c in tiny_zoo.cards for s in c.sample}
    assert tiny_zoo.queries and not card_inputs & {q.inputs for q in tiny_zoo.queries}  # held out
    assert {q.task for q in tiny_zoo.queries} == set(tiny_zoo.adapters)


def test_manifest_checksums_match_the_files(tiny_zoo):
    manifest = json.loads(tiny_zoo.manifest_file.read_text())
    assert manifest["cards"] == _sha(tiny_zoo.cards_file) and manifest["queries"] == _sha(tiny_zoo.queries_file)
    for name, digest in manifest["base"].items():
        assert _sha(tiny_zoo.base / name) == digest
    for adapter, entry in manifest["adapters"].items():
        assert set(entry["files"]) >= {"adapter_config.json", "adapter_model.safetensors"}
        for name, digest in entry["files"].items():
            assert _sha(tiny_zoo.adapters[adapter] / name) == digest
        assert {"base_score", "adapter_score", "metric", "domain"} <= set(entry)


def test_adapters_are_peft_folders_that_change_the_model(tiny_zoo):
    config = json.loads((tiny_zoo.adapters["add"] / "adapter_config.json").read_text())
    assert config["r"] == 8 and set(config["target_modules"]) == set(LORA_TARGETS)
    assert config["base_model_name_or_path"] == "tiny-random-llama"
    model = LlamaForCausalLM.from_pretrained(tiny_zoo.base)
    ids = torch.tensor([[1, 500, 600, 700]])
    with torch.no_grad():
        base = model(ids).logits
        tuned = PeftModel.from_pretrained(model, tiny_zoo.adapters["add"])(ids).logits
    assert (base - tuned).abs().max() > 1e-3


def _copy(tiny_zoo, tmp_path):
    root = tmp_path / "zoo"
    shutil.copytree(tiny_zoo.root, root)
    return root


def test_finished_build_is_only_verified(tiny_zoo, tmp_path):
    root = _copy(tiny_zoo, tmp_path)
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*.safetensors")}
    landed = []
    zoo = build_zoo(root, tiny=True, progress=False, on_adapter=lambda name, _: landed.append(name))
    assert landed == ["uppercase", "add", "review_sentiment"]
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*.safetensors")} == before
    assert zoo.complete


def test_tampered_or_missing_adapters_are_rebuilt(tiny_zoo, tmp_path):
    root = _copy(tiny_zoo, tmp_path)
    shutil.rmtree(root / "adapters" / "add")
    weights = root / "adapters" / "review_sentiment" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)
    assert list(load_zoo(root).adapters) == ["uppercase"]
    kept = (root / "adapters" / "uppercase" / "adapter_model.safetensors").stat().st_mtime_ns

    zoo = build_zoo(root, tiny=True, progress=False)
    assert sorted(zoo.adapters) == ["add", "review_sentiment", "uppercase"]
    assert (root / "adapters" / "uppercase" / "adapter_model.safetensors").stat().st_mtime_ns == kept


def test_interrupted_build_keeps_what_landed(tiny_zoo, tmp_path):
    root = _copy(tiny_zoo, tmp_path)
    for name in ("add", "review_sentiment"):
        shutil.rmtree(root / "adapters" / name)

    def stop_at_add(name, _folder):
        if name == "add":
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_zoo(root, tiny=True, progress=False, on_adapter=stop_at_add)
    assert sorted(load_zoo(root).adapters) == ["add", "uppercase"]
    assert sorted(p.name for p in (root / "adapters").iterdir()) == ["add", "uppercase"]  # no scratch folders


def test_load_zoo_of_an_empty_folder_is_empty(tmp_path):
    zoo = load_zoo(tmp_path)
    assert zoo.adapters == {} and zoo.cards == [] and not zoo.complete


def test_corrupt_manifest_is_named(tiny_zoo, tmp_path):
    root = _copy(tiny_zoo, tmp_path)
    (root / "manifest.json").write_text("{not json")
    with pytest.raises(ZooError, match="manifest.json is not valid JSON"):
        load_zoo(root)


def test_cli_rejects_a_bad_adapter_count(tmp_path, capsys):
    assert main(["demo", "build", "--root", str(tmp_path), "--tiny", "--adapters", "0"]) == 2
    err = capsys.readouterr().err
    assert "adapters must be between 1 and 3, not 0" in err and err.count("\n") == 1
    assert not any(tmp_path.iterdir())


def test_adapter_fingerprint_covers_the_training_data():
    from cluster.demo.zoo import make_recipe

    recipe = make_recipe()
    examples = [("Add 1 and 2.", "3")]
    assert recipe.adapter_key("add", examples) == make_recipe().adapter_key("add", list(examples))
    assert recipe.adapter_key("add", examples) != recipe.adapter_key("add", [("Add 1 and 2.", "4")])
    assert recipe.adapter_key("add", examples) != make_recipe(tiny=True).adapter_key("add", examples)
