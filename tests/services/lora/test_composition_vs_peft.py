"""The engine's logits against PEFT (float32): selection, mixture and fusion over a grid."""
from __future__ import annotations

import itertools
import random
from functools import partial

import pytest
import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from peft_adapters import (
    NoTokenizer,
    add_cat_adapter,
    add_fused_adapter,
    tiny_model,
    write_peft_adapters,
)

from services.composition import Composition
from services.composition import CompositionMode as Mode
from services.lora.engine import CompositionEngine

ATTN, MLP = ("q_proj", "k_proj", "v_proj", "o_proj"), ("gate_proj", "up_proj", "down_proj")
# name -> (rank, alpha, target modules, rslora): ranks 1..64, mixed modules and scalings
ADAPTERS = {
    "r1": (1, 2, ("q_proj", "v_proj"), False),
    "r4": (4, 16, ATTN + MLP, False),
    "r8": (8, 8, MLP, True),
    "r16": (16, 32, ("q_proj", "k_proj", "o_proj", "down_proj"), False),
    "r64": (64, 16, ATTN, False),
}
NAMES = list(ADAPTERS)



@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return write_peft_adapters(root, ADAPTERS, first_seed=10)


@pytest.fixture(scope="module")
def engine(folders):
    engine = CompositionEngine(tiny_model(), NoTokenizer(), max_adapters_per_row=3)
    for name, folder in folders.items():
        engine.load_adapter(name, folder)
    return engine


@pytest.fixture(scope="module")
def peft_model(folders):
    model = PeftModel.from_pretrained(tiny_model(), folders[NAMES[0]], adapter_name=NAMES[0])
    for name in NAMES[1:]:
        model.load_adapter(folders[name], adapter_name=name)
    return model.eval()


def left_padded_batch(lengths: list[int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.zeros((len(lengths), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, n in enumerate(lengths):
        ids[b, width - n:] = torch.randint(3, 256, (n,), generator=gen)
        mask[b, width - n:] = 1
    return ids, mask


@torch.inference_mode()
def peft_logits(peft_model, ids, mask, adapter_names: list[str]) -> torch.Tensor:
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    return peft_model(input_ids=ids, attention_mask=mask, position_ids=pos, adapter_names=adapter_names).logits


def assert_real_tokens_close(ours, theirs, mask):
    """Compare logits at real (non-padding) positions, within 1e-4."""
    real = mask.bool()
    torch.testing.assert_close(ours[real], theirs[real], rtol=0, atol=1e-4)


def random_rows(batch: int, k: int, seed: int) -> list[list[str]]:
    rng = random.Random(seed)
    return [rng.sample(NAMES, k) for _ in range(batch)]


@pytest.mark.parametrize("batch", [1, 5])
def test_selection_equals_peft_mixed_batch(engine, peft_model, batch):
    ids, mask = left_padded_batch([7, 3, 5, 7, 2][:batch])
    chosen = [NAMES[b % len(NAMES)] for b in range(batch - 1)] + ["__base__"]
    rows = [Composition.single(name) if name != "__base__" else Composition() for name in chosen]
    ours = engine.forward_logits(ids, mask, rows)
    assert_real_tokens_close(ours, peft_logits(peft_model, ids, mask, chosen), mask)


def test_selection_uses_only_the_top_adapter(engine, peft_model):
    ids, mask = left_padded_batch([6, 6])
    ours = engine.forward_logits(ids, mask, [Composition.of(Mode.selection, ["r8", "r1", "r4"], [0.2, 0.3, 0.5])] * 2)
    assert_real_tokens_close(ours, peft_logits(peft_model, ids, mask, ["r8", "r8"]), mask)


def test_adapters_change_the_output(engine, peft_model):
    """Guards the oracle: the adapters must move logits well beyond the tolerance."""
    ids, mask = left_padded_batch([6])
    base = engine.forward_logits(ids, mask, [Composition()])
    for name in NAMES:
        assert (engine.forward_logits(ids, mask, [Composition.of(Mode.selection, [name], [1.0])]) - base).abs().max() > 1e-2


def weighted_peft_adapter(peft_model, rows, make) -> list[str]:
    """One PEFT adapter per row, made by `make(name, adapters, weights)`; returns the names."""
    names = []
    for i, row in enumerate(rows):
        name = f"combo{len(peft_model.peft_config)}_{i}"
        make(name, list(row.adapters), list(row.weights))
        names.append(name)
    return names


@pytest.mark.parametrize("batch, k", [(1, 2), (4, 3), (6, 2)])
def test_mixture_equals_weighted_sum_of_peft_adapters(engine, peft_model, batch, k):
    ids, mask = left_padded_batch([5, 2, 5, 4, 3, 5][:batch], seed=batch)
    rng = random.Random(k)
    rows = [Composition.of(Mode.mixture, adapters, [rng.uniform(0.1, 1.0) for _ in adapters])
            for adapters in random_rows(batch, k, seed=batch * 10 + k)]
    names = weighted_peft_adapter(peft_model, rows, partial(add_cat_adapter, peft_model))
    oracle = peft_logits(peft_model, ids, mask, names)
    assert_real_tokens_close(engine.forward_logits(ids, mask, rows), oracle, mask)


def test_mixture_layer_equals_explicit_sum_of_peft_deltas(engine, peft_model):
    """One layer, written out: base(x) + sum_i w_i * scaling_i * B_i(A_i(x)) from PEFT's own modules."""
    layer_key = "model.layers.1.self_attn.q_proj"
    peft_layer = peft_model.base_model.model.get_submodule(layer_key)
    assert isinstance(peft_layer, LoraLayer)
    adapters, weights = ["r4", "r16", "r64"], [0.5, 0.3, 0.2]
    x = torch.randn(2, 4, 64, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        deltas = [w * peft_layer.scaling[a] * peft_layer.lora_B[a](peft_layer.lora_A[a](x))
                  for a, w in zip(adapters, weights)]
        expected = peft_layer.base_layer(x) + sum(deltas)
        with engine.composed([Composition.of(Mode.mixture, adapters, weights)] * 2):
            ours = engine.model.get_submodule(layer_key)(x)
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("batch, k, same_rank", [(1, 2, True), (3, 3, False), (5, 2, False)])
def test_fusion_equals_peft_adapter_of_averaged_a_and_b(engine, peft_model, batch, k, same_rank):
    ids, mask = left_padded_batch([4, 6, 2, 6, 5][:batch], seed=k)
    groups = [["r4", "r16"]] * batch if same_rank else random_rows(batch, k, seed=batch + k)
    rows = [Composition.of(Mode.fusion, adapters) for adapters in groups]  # uniform 1/k
    names = weighted_peft_adapter(peft_model, rows, partial(add_fused_adapter, peft_model))
    oracle = peft_logits(peft_model, ids, mask, names)
    assert_real_tokens_close(engine.forward_logits(ids, mask, rows), oracle, mask)


def test_mixed_modes_in_one_batch(engine, peft_model):
    ids, mask = left_padded_batch([5, 3, 5, 4])
    rows = [Composition.of(Mode.selection, ["r1"], [1.0]), Composition.of(Mode.mixture, ["r4", "r8"], [0.6, 0.4]),
            Composition.of(Mode.fusion, ["r16", "r64"], [0.5, 0.5]), Composition()]
    names = [
        "r1",
        weighted_peft_adapter(peft_model, [rows[1]], partial(add_cat_adapter, peft_model))[0],
        weighted_peft_adapter(peft_model, [rows[2]], partial(add_fused_adapter, peft_model))[0],
        "__base__",
    ]
    assert_real_tokens_close(engine.forward_logits(ids, mask, rows), peft_logits(peft_model, ids, mask, names), mask)


GRID = list(itertools.product([1, 3, 8], [1, 2, 3], [1, 6]))  # batch, k, seq


@pytest.mark.parametrize("batch, k, seq", GRID)
def test_fast_backends_equal_reference(engine, batch, k, seq):
    """gather, shrink_expand and the shape dispatch against the row-by-row oracle, all modes mixed."""
    ids, mask = left_padded_batch([seq] * batch, seed=batch * k)
    modes = [Mode.mixture, Mode.fusion, Mode.selection, Mode.none]
    rng = random.Random(batch * 100 + k * 10 + seq)
    rows = [Composition.of(modes[b % len(modes)], adapters, [rng.uniform(0.05, 1) for _ in adapters])
            for b, adapters in enumerate(random_rows(batch, k, seed=seq))]
    results = {}
    try:
        for backend in ("reference", "gather", "shrink_expand", "auto"):
            engine.context.backend = backend
            results[backend] = engine.forward_logits(ids, mask, rows)
    finally:
        engine.context.backend = "auto"
    for backend in ("gather", "shrink_expand", "auto"):
        torch.testing.assert_close(results[backend], results["reference"], rtol=0, atol=1e-4)
