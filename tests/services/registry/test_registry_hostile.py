"""Refused adapters: a clear message, and the registry and store exactly as before."""
from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import torch
from registry_fixtures import card, embeddings, redis_state, set_config_field, tree_state
from safetensors.torch import load_file, save_file

from services.registry.registry import InvalidAdapter, VersionConflict


def to_pickle(src):
    weights = src / "adapter_model.safetensors"
    torch.save(load_file(str(weights)), src / "adapter_model.bin")
    weights.unlink()


def truncate(src):
    weights = src / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])


def nan_weights(src):
    weights = src / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    first = sorted(tensors)[0]
    tensors[first][0, 0] = float("nan")
    save_file(tensors, str(weights))


def symlink_outside(src):
    weights = src / "adapter_model.safetensors"
    outside = src.parent / "elsewhere.safetensors"
    weights.rename(outside)
    weights.symlink_to(outside)


def huge_header(src):
    # A safetensors header length far beyond the file: must be refused, not allocated.
    weights = src / "adapter_model.safetensors"
    weights.write_bytes(struct.pack("<Q", 1 << 40) + b"{}")


HOSTILE_FILES = {
    "pickle": (to_pickle, "pickle weights are refused"),
    "truncated": (truncate, "corrupted or truncated"),
    "nan": (nan_weights, "NaN or infinite"),
    "wrong_base": (lambda src: set_config_field(src, "base_model_name_or_path", "meta-llama/Llama-2-7b-hf"),
                   "does not match the served base model"),
    "rank_too_big": (lambda src: set_config_field(src, "r", 128), "r=128 must be an integer from 1 to 64"),
    "rank_mismatch": (lambda src: set_config_field(src, "r", 8), r"shape \(4, 64\), expected \(8, 64\)"),
    "symlink": (symlink_outside, "symlink points outside"),
    "extra_file": (lambda src: (src / "setup.py").write_text("import os"), "setup.py: unexpected file"),
    "no_config": (lambda src: (src / "adapter_config.json").unlink(), "no adapter_config.json"),
    "bad_json": (lambda src: (src / "adapter_config.json").write_text("{"), "not valid JSON"),
    "dora": (lambda src: set_config_field(src, "use_dora", True), "use_dora=True is not supported"),
    "huge_header": (huge_header, "corrupted or truncated"),
}


@pytest.fixture
def seeded(registry, adapter_dir, redis_server, store):
    """A registry holding one good adapter; returns a function giving the full state."""
    registry.add_version("good", adapter_dir(0), card("good"), embeddings())
    return lambda: (redis_state(redis_server.url), tree_state(store.root))


@pytest.mark.parametrize("case", sorted(HOSTILE_FILES))
def test_hostile_adapter_files_are_refused_without_trace(registry, adapter_dir, seeded, case):
    mutate, message = HOSTILE_FILES[case]
    src = adapter_dir(1)
    mutate(src)
    before = seeded()
    for name in ("good", "fresh"):  # a new version of a known adapter, and a new adapter
        with pytest.raises(InvalidAdapter, match=message):
            registry.add_version(name, src, card(name), embeddings())
    assert seeded() == before


@pytest.mark.parametrize("name", ["../escape", "a/b", "..", "x@v1", "a:b", ""])
def test_unsafe_names_are_refused_without_trace(registry, adapter_dir, seeded, name):
    before = seeded()
    with pytest.raises(InvalidAdapter, match="adapter name"):
        registry.add_version(name, adapter_dir(1), card(name or "x"), embeddings())
    assert seeded() == before


BAD_REQUESTS = {
    "card_name": (lambda: card("other"), lambda: embeddings(), "does not match adapter name"),
    "emb_rows": (lambda: card("fresh"), lambda: embeddings(3), r"shape \(3, 8\); expected \(2, dim\)"),
    "emb_1d": (lambda: card("fresh"), lambda: np.zeros(8, np.float32), r"shape \(8,\)"),
    "emb_nan": (lambda: card("fresh"), lambda: np.full((2, 8), np.nan, np.float32), "finite floats"),
    "emb_dim": (lambda: card("fresh"), lambda: embeddings(2, 16), "dim 16; the registry's embedder gives 8"),
}


@pytest.mark.parametrize("case", sorted(BAD_REQUESTS))
def test_bad_cards_and_embeddings_are_refused_without_trace(registry, adapter_dir, seeded, case):
    make_card, make_emb, message = BAD_REQUESTS[case]
    before = seeded()
    with pytest.raises(InvalidAdapter, match=message):
        registry.add_version("fresh", adapter_dir(1), make_card(), make_emb())
    assert seeded() == before


def test_the_same_files_twice_are_a_conflict(registry, adapter_dir, seeded):
    before = seeded()
    with pytest.raises(VersionConflict, match="already has these exact files as version 'v1'"):
        registry.add_version("good", adapter_dir(0), card("good"), embeddings())
    assert seeded() == before


def test_pickle_is_accepted_only_when_allowed(make_registry, adapter_dir, store):
    src = adapter_dir(1)
    to_pickle(src)
    vrec = make_registry(allow_unsafe_pickle=True).add_version("legacy", src, card("legacy"), embeddings())
    assert sorted(p.name for p in store.path("legacy", vrec.version).iterdir()) == \
        ["adapter_config.json", "adapter_model.bin"]
    assert json.loads((store.path("legacy", "v1") / "adapter_config.json").read_text())["r"] == 4
