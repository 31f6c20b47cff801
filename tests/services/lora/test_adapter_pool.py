"""The device adapter pool: LRU slots, pinning, in-use protection, CPU tier, counters."""
from __future__ import annotations

import pytest
import torch
from peft_adapters import NoTokenizer, tiny_model, write_peft_adapter

from services.composition import Composition, CompositionError
from services.composition import CompositionMode as Mode
from services.lora.adapter_files import AdapterValidationError
from services.lora.engine import CompositionEngine
from services.lora.pool import AdapterNotLoaded, AdapterPoolFull

RANKS = {"a": 2, "b": 8, "c": 4, "d": 1, "e": 32}



@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root, config = tmp_path_factory.mktemp("adapters"), tiny_model().config
    return {name: write_peft_adapter(root / name, config, rank=r, alpha=r, target_modules=("q_proj", "up_proj"),
                                     seed=i) for i, (name, r) in enumerate(RANKS.items())}


def make_engine(folders, **kw):
    engine = CompositionEngine(tiny_model(), NoTokenizer(), **kw)
    for name in RANKS:
        engine.load_adapter(name, folders[name])
    return engine


IDS, MASK = torch.arange(3, 9)[None], torch.ones(1, 6, dtype=torch.long)


def logits(engine, name):
    return engine.forward_logits(IDS, MASK, [Composition.of(Mode.selection, [name], [1.0])])


def test_lru_eviction_and_counters(folders):
    engine = make_engine(folders, device_slots=2)
    assert engine.resident_adapters() == []  # loading fills the CPU tier only
    reference = {name: logits(engine, name) for name in "ab"}
    logits(engine, "a")  # a is now the most recently used
    logits(engine, "c")  # evicts b
    assert sorted(engine.resident_adapters()) == ["a", "c"]
    stats = engine.pool_stats()
    assert (stats["hits"], stats["misses"], stats["loads"], stats["evictions"]) == (1, 3, 3, 1)
    assert stats["load_seconds"] > 0
    torch.testing.assert_close(logits(engine, "b"), reference["b"], rtol=0, atol=1e-6)  # reloaded into a's slot
    torch.testing.assert_close(logits(engine, "a"), reference["a"], rtol=0, atol=1e-6)


def test_rank_growth_keeps_resident_adapters_exact(folders):
    engine = make_engine(folders)
    before = logits(engine, "d")  # rank 1 sets the pool rank to 1
    logits(engine, "e")  # rank 32 pads every stack
    assert engine.pool_stats()["rank"] == 32
    torch.testing.assert_close(logits(engine, "d"), before, rtol=0, atol=1e-6)


def test_pinned_and_in_use_adapters_are_never_evicted(folders):
    engine = make_engine(folders, device_slots=2)
    engine.pin("a")
    assert engine.resident_adapters() == ["a"]
    with engine.composed([Composition.of(Mode.selection, ["b"], [1.0])]):  # b is in use by a running batch
        with pytest.raises(AdapterPoolFull, match="1 more adapters"):
            engine.pool.acquire(["c"])
        assert sorted(engine.resident_adapters()) == ["a", "b"]
    logits(engine, "c")  # b is free again: it goes, the pinned a stays
    assert sorted(engine.resident_adapters()) == ["a", "c"]
    engine.unpin("a")
    logits(engine, "d")
    assert sorted(engine.resident_adapters()) == ["c", "d"]


def test_batch_wider_than_the_pool_is_refused_without_eviction(folders):
    engine = make_engine(folders, device_slots=2, max_adapters_per_row=4)
    logits(engine, "a")
    with pytest.raises(AdapterPoolFull):
        engine.forward_logits(IDS, MASK, [Composition.of(Mode.mixture, ["b", "c", "d"], [0.3, 0.3, 0.4])])
    assert engine.resident_adapters() == ["a"] and engine.pool_stats()["evictions"] == 0
    assert engine.pool.in_use == {}


def test_cpu_tier_rereads_from_disk(folders):
    engine = make_engine(folders, device_slots=1, cpu_slots=2)
    stats = engine.pool_stats()
    assert (stats["cpu_resident"], stats["loaded"], stats["cpu_evictions"]) == (2, 5, 3)
    first = logits(engine, "a")  # a was let go of by the CPU tier: re-read from its folder
    assert engine.pool_stats()["disk_reloads"] == 1
    logits(engine, "e")
    torch.testing.assert_close(logits(engine, "a"), first, rtol=0, atol=1e-6)


def test_unload_and_refusals_leave_no_trace(folders, tmp_path):
    engine = make_engine(folders)
    logits(engine, "a")
    engine.unload_adapter("a")
    assert not engine.has_adapter("a") and "a" not in engine.resident_adapters()
    with pytest.raises(AdapterNotLoaded, match="'a' is not loaded"):
        logits(engine, "a")
    (tmp_path / "broken").mkdir()
    with pytest.raises(AdapterValidationError):
        engine.load_adapter("broken", tmp_path / "broken")
    with pytest.raises(AdapterValidationError, match="path separator"):
        engine.load_adapter("../b", folders["b"])
    assert not engine.has_adapter("broken") and engine.pool_stats()["loaded"] == 4


def test_rows_beyond_limits_are_refused(folders):
    engine = make_engine(folders, max_adapters_per_row=2)
    with pytest.raises(CompositionError, match="limit is 2"):
        engine.forward_logits(IDS, MASK, [Composition.of(Mode.mixture, ["a", "b", "c"], [0.3, 0.3, 0.4])])
    with pytest.raises(CompositionError, match="2 adapters but 1 weights"):
        engine.forward_logits(IDS, MASK, [Composition.of(Mode.fusion, ["a", "b"], [1.0])])
    with pytest.raises(CompositionError, match="twice"):
        engine.forward_logits(IDS, MASK, [Composition.of(Mode.mixture, ["a", "a"], [0.5, 0.5])])
    assert engine.pool.in_use == {}


def test_concurrent_batches_do_not_disturb_each_other(folders):
    """Batches from two threads, one of them growing the pool's rank: each equals its lone result."""
    from concurrent.futures import ThreadPoolExecutor

    expected = {name: logits(make_engine(folders), name) for name in "de"}
    engine = make_engine(folders, device_slots=2)
    with ThreadPoolExecutor(2) as threads:
        results = list(threads.map(lambda name: [logits(engine, name) for _ in range(3)], "de"))
    for name, outs in zip("de", results):
        for out in outs:
            torch.testing.assert_close(out, expected[name], rtol=0, atol=1e-6)


def test_slots_written_in_inference_mode_can_be_rewritten_outside_it(folders):
    """forward_logits runs in inference mode; a later batch outside it writes the same stacks
    (this failed with 'Inplace update to inference tensor outside InferenceMode')."""
    engine = make_engine(folders, device_slots=1)
    logits(engine, "a")
    with engine.composed([Composition.single("b")]):  # evicts a, writes b into the same slot
        pass
    assert engine.resident_adapters() == ["b"]
