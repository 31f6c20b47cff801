"""Composite adapters (services/lora/composite.py): a mixture's composite against PEFT's "cat"
combination, fusion's and mixture's against the native engine's own composition, and the
content-addressed, bounded folder cache."""
from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from peft_adapters import (
    NoTokenizer,
    tiny_model,
    write_peft_adapters,
)

from services.composition import Composition
from services.composition import CompositionMode as Mode
from services.lora.adapter_files import read_adapter
from services.lora.composite import (
    CompositeCache,
    build_composite,
    composite_name,
    composite_rank,
    grid_weights,
    write_peft_folder,
)
from services.lora.engine import CompositionEngine

ATTN, MLP = ("q_proj", "k_proj", "v_proj", "o_proj"), ("gate_proj", "up_proj", "down_proj")
# unequal ranks, alphas, scalings (one rslora) and target modules
ADAPTERS = {
    "a4": (4, 16, ATTN + MLP, False),
    "b8": (8, 8, MLP + ("q_proj",), True),
    "c6": (6, 24, ("q_proj", "k_proj", "v_proj", "down_proj"), False),
}
GRID = 1 / 256



@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("composite_adapters")
    return write_peft_adapters(root, ADAPTERS, first_seed=40)


@pytest.fixture(scope="module")
def weights_of(folders):
    config = tiny_model().config
    return {name: read_adapter(folder, base_config=config, name=name) for name, folder in folders.items()}


def ids_batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(3, 256, (2, 7), generator=torch.Generator().manual_seed(seed))
    return ids, torch.ones_like(ids)


@torch.inference_mode()
def peft_logits(model, ids, mask, adapter: str) -> torch.Tensor:
    model.set_adapter(adapter)
    return model(input_ids=ids, attention_mask=mask).logits


@pytest.mark.parametrize("names, weights", [(["a4", "b8"], [0.7, 0.3]), (["a4", "b8", "c6"], [0.5, 0.3, 0.2])])
def test_mixture_composite_equals_peft_cat(folders, weights_of, tmp_path, names, weights):
    """PEFT builds the cat adapter from its own loaded modules; ours is written to disk, loaded into
    the same PEFT model as a plain adapter, and both must give the same per-layer delta and logits."""
    composition = Composition.of(Mode.mixture, names, weights)
    rounded = grid_weights(weights, GRID)
    composite = build_composite(composition, [weights_of[n] for n in names], rounded)
    assert composite.rank == sum(ADAPTERS[n][0] for n in names) == composite_rank(
        composition, {n: ADAPTERS[n][0] for n in names})
    write_peft_folder(tmp_path / "ours", composite, base_model="tiny-llama-test")

    model = PeftModel.from_pretrained(tiny_model(), folders[names[0]], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(folders[name], adapter_name=name)
    model.add_weighted_adapter(names, list(rounded), "cat", combination_type="cat")
    model.load_adapter(tmp_path / "ours", adapter_name="ours")
    model.eval()

    checked = 0
    for module_name, module in model.base_model.model.named_modules():
        if isinstance(module, LoraLayer) and "cat" in module.lora_A:
            # PEFT copies use_rslora from the first adapter's config; the product is what must agree
            theirs = module.scaling["cat"] * module.lora_B["cat"].weight @ module.lora_A["cat"].weight  # (out, in)
            ours = module.scaling["ours"] * module.lora_B["ours"].weight @ module.lora_A["ours"].weight
            torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
            checked += 1
    assert checked == 2 * 7  # 2 layers, the union of the adapters' modules is all seven


def test_cat_logits_with_peft(folders, weights_of, tmp_path):
    """End to end through PEFT: the model with our composite equals the model with PEFT's cat adapter
    (first adapter without rslora, so PEFT's copied config keeps the cat adapter's scaling at 1)."""
    names, weights = ["a4", "c6", "b8"], [0.45, 0.35, 0.2]
    composite = build_composite(Composition.of(Mode.mixture, names, weights), [weights_of[n] for n in names])
    write_peft_folder(tmp_path / "ours", composite, base_model="tiny-llama-test")
    model = PeftModel.from_pretrained(tiny_model(), folders[names[0]], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(folders[name], adapter_name=name)
    model.add_weighted_adapter(names, weights, "cat", combination_type="cat")
    model.load_adapter(tmp_path / "ours", adapter_name="ours")
    model.eval()
    ids, mask = ids_batch(1)
    base = peft_logits(model, ids, mask, names[0])
    theirs = peft_logits(model, ids, mask, "cat")
    assert (theirs - base).abs().max() > 1e-2  # the combination changes the output
    torch.testing.assert_close(peft_logits(model, ids, mask, "ours"), theirs, rtol=0, atol=1e-5)


@pytest.mark.parametrize("mode, names, weights", [
    (Mode.fusion, ["a4", "b8"], [0.5, 0.5]),
    (Mode.fusion, ["a4", "b8", "c6"], [0.5, 0.3, 0.2]),
    (Mode.mixture, ["c6", "a4", "b8"], [0.25, 0.25, 0.5]),
])
def test_composite_equals_native_composition(folders, weights_of, tmp_path, mode, names, weights):
    """The composite served as a selection equals the native engine composing the adapters itself
    (weights on the grid: the composite is built with its grid's weights)."""
    composition = Composition.of(mode, names, grid_weights(weights, GRID))
    composite = build_composite(composition, [weights_of[n] for n in names])
    assert composite.rank == (max if mode == Mode.fusion else sum)(ADAPTERS[n][0] for n in names)
    write_peft_folder(tmp_path / "composite", composite, base_model="tiny-llama-test")
    engine = CompositionEngine(tiny_model(), NoTokenizer(), max_adapters_per_row=3)
    for name, folder in folders.items():
        engine.load_adapter(name, folder)
    engine.load_adapter("composite", tmp_path / "composite")  # our validator reads it as any adapter
    ids, mask = ids_batch(2)
    native = engine.forward_logits(ids, mask, [composition] * 2)
    served = engine.forward_logits(ids, mask, [Composition.single("composite")] * 2)
    torch.testing.assert_close(served, native, rtol=0, atol=1e-5)
    config = json.loads((tmp_path / "composite" / "adapter_config.json").read_text())
    assert config["r"] == config["lora_alpha"] == composite.rank


def test_names_are_content_addresses():
    mix = Composition.of(Mode.mixture, ["x@1", "y@1"], [0.6, 0.4])
    assert composite_name(mix, GRID) == composite_name(Composition.of(Mode.mixture, ["x@1", "y@1"],
                                                                       [0.6 + 1e-4, 0.4 - 1e-4]), GRID)
    others = [Composition.of(Mode.mixture, ["x@2", "y@1"], [0.6, 0.4]),  # a new version: a new name
              Composition.of(Mode.mixture, ["y@1", "x@1"], [0.6, 0.4]),
              Composition.of(Mode.fusion, ["x@1", "y@1"], [0.6, 0.4]),
              Composition.of(Mode.mixture, ["x@1", "y@1"], [0.62, 0.38])]
    names = {composite_name(c, GRID) for c in [mix, *others]}
    assert len(names) == 5


def test_cache_hits_builds_and_evicts_least_recently_used(weights_of, tmp_path):
    reads = []

    def read(key):
        reads.append(key)
        return weights_of[key]

    one = Composition.of(Mode.mixture, ["a4", "b8"], [0.5, 0.5])
    probe = CompositeCache(tmp_path / "probe", max_bytes=1 << 30, grid=GRID)
    name, folder = probe.acquire(one, read)
    size = sum(f.stat().st_size for f in folder.iterdir())

    cache = CompositeCache(tmp_path / "cache", max_bytes=2 * size + size // 2, grid=GRID)  # two fit
    compositions = [Composition.of(Mode.mixture, ["a4", "b8"], w) for w in ([0.5, 0.5], [0.25, 0.75], [0.75, 0.25])]
    names = []
    for c in compositions[:2]:
        name, folder = cache.acquire(c, read)
        cache.release(name)
        names.append(name)
        assert read_adapter(folder, base_config=tiny_model().config, name="composite").rank == 12
    reads.clear()
    again, _ = cache.acquire(compositions[0], read)  # a hit: no adapter read, and now most recent
    assert again == names[0] and reads == []
    held = again  # held while the third is built: it must not be evicted
    third, _ = cache.acquire(compositions[2], read)
    cache.release(third)
    assert (tmp_path / "cache" / held).is_dir() and not (tmp_path / "cache" / names[1]).exists()
    cache.release(held)
    stats = cache.stats()
    assert (stats["composite_hits"], stats["composite_misses"], stats["composite_evictions"]) == (1, 3, 1)
    assert stats["composites_cached"] == 2 and stats["composite_cache_bytes"] <= cache.max_bytes

    (tmp_path / "cache" / ".half-built").mkdir()  # a build a crash cut short
    reopened = CompositeCache(tmp_path / "cache", max_bytes=cache.max_bytes, grid=GRID)
    assert set(reopened.entries) == {held, third} and not (tmp_path / "cache" / ".half-built").exists()


def test_a_failed_build_leaves_nothing(weights_of, tmp_path):
    def read(key):
        if key == "b8":
            raise OSError("store lost the files")
        return weights_of[key]

    cache = CompositeCache(tmp_path / "cache", max_bytes=1 << 30, grid=GRID)
    with pytest.raises(OSError):
        cache.acquire(Composition.of(Mode.mixture, ["a4", "b8"]), read)
    assert list((tmp_path / "cache").iterdir()) == [] and cache.in_use == {} and not cache.entries
