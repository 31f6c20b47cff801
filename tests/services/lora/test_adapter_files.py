"""read_adapter against real PEFT folders: what it accepts, and each thing it refuses."""
from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from peft_adapters import BASE_MODEL, tiny_config, write_peft_adapter
from safetensors.torch import load_file, save_file

from services.lora.adapter_files import (
    AdapterValidationError,
    LoraAdapterWeights,
    adapter_checksum,
    read_adapter,
)

CONFIG = tiny_config()


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory):
    return write_peft_adapter(tmp_path_factory.mktemp("a") / "math", CONFIG, rank=4, alpha=8,
                              target_modules=("q_proj", "v_proj", "down_proj"), seed=1)


@pytest.fixture
def copy(adapter_dir, tmp_path):
    def make(name="copy"):
        return shutil.copytree(adapter_dir, tmp_path / name)
    return make


def edit_config(folder, **fields):
    path = folder / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(fields)
    path.write_text(json.dumps(config))


def test_reads_peft_weights_exactly(adapter_dir):
    adapter = read_adapter(adapter_dir, base_config=CONFIG, base_model=BASE_MODEL)
    assert isinstance(adapter, LoraAdapterWeights)
    assert (adapter.name, adapter.rank, adapter.scaling) == ("math", 4, 2.0)
    assert adapter.target_modules == ("q_proj", "v_proj", "down_proj")
    assert adapter.base_model == BASE_MODEL
    raw = load_file(str(adapter_dir / "adapter_model.safetensors"))
    key = "model.layers.1.mlp.down_proj"
    torch.testing.assert_close(adapter.a[key], raw[f"base_model.model.{key}.lora_A.weight"], rtol=0, atol=0)
    torch.testing.assert_close(adapter.b[key], raw[f"base_model.model.{key}.lora_B.weight"], rtol=0, atol=0)
    assert adapter.a[key].shape == (4, 128) and adapter.b[key].shape == (64, 4)
    assert len(adapter.a) == 2 * 3 and set(adapter.a) == set(adapter.b)


def test_rslora_scaling(tmp_path):
    folder = write_peft_adapter(tmp_path / "rs", CONFIG, rank=16, alpha=8, target_modules=("o_proj",), seed=2,
                                use_rslora=True)
    assert read_adapter(folder, base_config=CONFIG).scaling == pytest.approx(8 / math.sqrt(16))


def test_refuses_pickle_unless_allowed(copy):
    folder = copy()
    torch.save(load_file(str(folder / "adapter_model.safetensors")), folder / "adapter_model.bin")
    (folder / "adapter_model.safetensors").unlink()
    with pytest.raises(AdapterValidationError, match="pickle"):
        read_adapter(folder, base_config=CONFIG)
    assert read_adapter(folder, base_config=CONFIG, allow_unsafe_pickle=True).rank == 4


def test_refuses_base_model_mismatch(adapter_dir):
    with pytest.raises(AdapterValidationError, match="base_model_name_or_path"):
        read_adapter(adapter_dir, base_config=CONFIG, base_model="meta-llama/Llama-3-8B")
    # a local folder of the same model matches the hub id by its last component
    assert read_adapter(adapter_dir, base_config=CONFIG, base_model=f"/models/{BASE_MODEL}/").rank == 4


def test_refuses_rank_beyond_maximum(adapter_dir):
    with pytest.raises(AdapterValidationError, match="field r=4"):
        read_adapter(adapter_dir, base_config=CONFIG, max_rank=2)


def test_refuses_shapes_of_another_model(adapter_dir):
    wider = tiny_config()
    wider.hidden_size, wider.intermediate_size = 128, 256
    with pytest.raises(AdapterValidationError, match="has shape"):
        read_adapter(adapter_dir, base_config=wider)
    shallow = tiny_config()
    shallow.num_hidden_layers = 1
    with pytest.raises(AdapterValidationError, match="names layer 1"):
        read_adapter(adapter_dir, base_config=shallow)


def test_refuses_rank_that_disagrees_with_tensors(copy):
    folder = copy()
    edit_config(folder, r=8)
    with pytest.raises(AdapterValidationError, match=r"has shape \(4, \d+\), expected \(8, "):
        read_adapter(folder, base_config=CONFIG)


@pytest.mark.parametrize("cut", [10, 200, -100])
def test_refuses_truncated_safetensors(copy, cut):
    folder = copy()
    path = folder / "adapter_model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:cut])
    with pytest.raises(AdapterValidationError, match="corrupted or truncated"):
        read_adapter(folder, base_config=CONFIG)


def test_refuses_garbage_safetensors(copy):
    folder = copy()
    (folder / "adapter_model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(AdapterValidationError, match="corrupted or truncated"):
        read_adapter(folder, base_config=CONFIG)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_refuses_non_finite_weights(copy, bad):
    folder = copy()
    path = folder / "adapter_model.safetensors"
    tensors = load_file(str(path))
    key = next(iter(sorted(tensors)))
    tensors[key][0, 0] = bad
    save_file(tensors, str(path))
    with pytest.raises(AdapterValidationError, match="NaN or infinite"):
        read_adapter(folder, base_config=CONFIG)


def test_refuses_unpaired_and_foreign_tensors(copy):
    folder = copy()
    path = folder / "adapter_model.safetensors"
    tensors = load_file(str(path))
    tensors.pop("base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight")
    save_file(tensors, str(path))
    with pytest.raises(AdapterValidationError, match="lacks its lora_A or lora_B"):
        read_adapter(folder, base_config=CONFIG)
    tensors["base_model.model.lm_head.lora_A.weight"] = torch.zeros(4, 64)
    save_file(tensors, str(path))
    with pytest.raises(AdapterValidationError, match="lm_head"):
        read_adapter(folder, base_config=CONFIG)


@pytest.mark.parametrize("name", ["a/b", "..", "a\\b", ""])
def test_refuses_names_with_path_separators(adapter_dir, name):
    with pytest.raises(AdapterValidationError, match="path separator"):
        read_adapter(adapter_dir, base_config=CONFIG, name=name)


@pytest.mark.parametrize("fields, bad", [({"use_dora": True}, "use_dora"), ({"peft_type": "IA3"}, "peft_type"),
                                         ({"lora_alpha": "x"}, "lora_alpha"), ({"r": 0}, "field r=0")])
def test_refuses_unsupported_config(copy, fields, bad):
    folder = copy()
    edit_config(folder, **fields)
    with pytest.raises(AdapterValidationError, match=bad):
        read_adapter(folder, base_config=CONFIG)


def test_refuses_missing_or_broken_files(copy, tmp_path):
    with pytest.raises(AdapterValidationError, match="not a directory"):
        read_adapter(tmp_path / "absent", base_config=CONFIG)
    folder = copy()
    (folder / "adapter_config.json").write_text("{not json")
    with pytest.raises(AdapterValidationError, match="adapter_config.json: not valid JSON"):
        read_adapter(folder, base_config=CONFIG)
    (folder / "adapter_config.json").unlink()
    with pytest.raises(AdapterValidationError, match="adapter_config.json: file not found"):
        read_adapter(folder, base_config=CONFIG)


def test_checksum_tracks_config_and_weights(adapter_dir, copy):
    folder = copy()
    assert adapter_checksum(folder) == adapter_checksum(adapter_dir)
    assert len(adapter_checksum(folder)) == 64
    edit_config(folder, lora_alpha=16)
    assert adapter_checksum(folder) != adapter_checksum(adapter_dir)
    with pytest.raises(AdapterValidationError, match="file not found"):
        adapter_checksum(folder.parent / "absent")
