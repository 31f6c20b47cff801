"""Micro-benchmark of the choices inside one decode step, on the demo base model's shapes.

Each line compares the way the engine does an operation with the alternatives it was chosen
over, side by side in one process, on one pinned thread (the engine's figures in docs/engine.md
are end to end; these say why the decode path is written as it is):
- attention over the rows' prefixes: grouped batched matmuls on a bfloat16 slice, the same on a
  float32 cache, and PyTorch's scaled_dot_product_attention with a mask;
- writing a step's keys into the cache: index_put_ against scatter_;
- greedy picking over the vocabulary: bfloat16 argmax against float32 conversion + argmax;
- random sampling (temperature, top_p): one draw for all rows (bucketed nucleus, one uniform number
  a row) against sorting the vocabulary and multinomial, per row and batched;
- the model's linears: torch's linear against oneDNN with the weight packed once;
- a LoRA delta under a bfloat16 model: stacks in bfloat16 against float32 (the input converted).

    python -m cluster.bench.decode_ops [--rows 64] [--span 61] [--threads 1] [--only SECTION ...]
        [--json docs/decode_ops.json]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from cluster.bench.retrieval_scale import clocked
from services.composition import Composition
from services.lora.backends import shrink_expand_delta
from services.lora.batch_meta import build_batch_meta
from services.lora.sampling import draw_tokens

# SmolLM2-135M: hidden 576, 9 query heads over 3 key heads of 64, MLP 1536, vocabulary 49152
HIDDEN, HEADS, KV_HEADS, HEAD_DIM, MLP, VOCAB = 576, 9, 3, 64, 1536, 49152
LINEARS = {"q/o proj": (HIDDEN, HIDDEN), "k/v proj": (HIDDEN, KV_HEADS * HEAD_DIM), "gate/up proj": (HIDDEN, MLP),
           "down proj": (MLP, HIDDEN), "lm head": (HIDDEN, VOCAB)}


def wall_ms(fn, repeat: int) -> float:
    """Median wall milliseconds of one call (after a warm-up call)."""
    return clocked(fn, repeat)[0]


def attention_variants(rows: int, span: int, length: int) -> dict:
    """One decode step's attention of one layer: (rows, 9 heads, 1 query) over `span` positions."""
    groups = HEADS // KV_HEADS
    q = torch.randn(rows, KV_HEADS, groups, HEAD_DIM)  # (n, kv, groups, d): one new token per row
    mask = torch.zeros(rows, 1, 1, span, dtype=torch.bool)  # every position visible

    def grouped(cache_k, cache_v, query):
        keys, values = cache_k[:, :, :span], cache_v[:, :, :span]  # (n, kv, span, d) slices of the slots
        weights = torch.softmax((query @ keys.transpose(-1, -2)).float().masked_fill_(mask, float("-inf")), -1)
        return weights.to(values.dtype) @ values  # (n, kv, groups, d)

    def sdpa(cache_k, cache_v, query):
        keys = cache_k[:, :, :span].repeat_interleave(groups, dim=1)  # (n, heads, span, d)
        values = cache_v[:, :, :span].repeat_interleave(groups, dim=1)
        return torch.nn.functional.scaled_dot_product_attention(query.reshape(rows, HEADS, 1, HEAD_DIM), keys,
                                                                values, attn_mask=~mask)

    out = {}
    cache_k = torch.randn(rows, KV_HEADS, length, HEAD_DIM).to(torch.bfloat16)  # (n, kv, length, d)
    cache_v = torch.randn(rows, KV_HEADS, length, HEAD_DIM).to(torch.bfloat16)
    out["grouped matmuls, bf16 cache, prefix converted to f32"] = wall_ms(
        lambda: grouped(cache_k[:, :, :span].float(), cache_v[:, :, :span].float(), q), 50)
    for label, cache_dtype, query_dtype in (("bf16 cache", torch.bfloat16, torch.bfloat16),
                                            ("f32 cache, bf16 model", torch.float32, torch.bfloat16),
                                            ("f32 model", torch.float32, torch.float32)):
        cache_k = torch.randn(rows, KV_HEADS, length, HEAD_DIM).to(cache_dtype)  # (n, kv, length, d)
        cache_v = torch.randn(rows, KV_HEADS, length, HEAD_DIM).to(cache_dtype)
        query = q.to(query_dtype)
        out[f"grouped matmuls, {label}"] = wall_ms(lambda: grouped(cache_k, cache_v, query.to(cache_dtype)), 50)
        out[f"sdpa with a mask, {label}"] = wall_ms(lambda: sdpa(cache_k, cache_v, query.to(cache_dtype)), 50)
    return out


def write_variants(rows: int, span: int, length: int) -> dict:
    """One layer's keys of a decode step (rows, kv, 1, d) written at each row's position."""
    out = {}
    for dtype in (torch.bfloat16, torch.float32):
        cache = torch.zeros(rows, KV_HEADS, length, HEAD_DIM, dtype=dtype)
        k = torch.randn(rows, KV_HEADS, 1, HEAD_DIM, dtype=dtype)
        positions = torch.full((rows, 1), span - 1)
        at = (torch.arange(rows)[:, None, None], torch.arange(KV_HEADS)[None, :, None], positions[:, None, :])
        index = positions[:, None, :, None].expand(rows, KV_HEADS, 1, HEAD_DIM)
        name = str(dtype).removeprefix("torch.")
        out[f"index_put_, {name}"] = wall_ms(lambda: cache.index_put_(at, k), 50)
        out[f"scatter_, {name}"] = wall_ms(lambda: cache.scatter_(2, index, k), 50)
    return out


def argmax_variants(rows: int) -> dict:
    logits = torch.randn(rows, VOCAB).to(torch.bfloat16)  # (n, vocab)
    return {"argmax, bf16": wall_ms(lambda: logits.argmax(-1), 30),
            "to f32, argmax": wall_ms(lambda: logits.float().argmax(-1), 30)}


def sort_nucleus_draw(logits: torch.Tensor, top_p: float, generators: list) -> list[int]:
    """The sort-based reference: probabilities sorted, the prefix reaching top_p kept, multinomial
    (at top_p 1, multinomial alone)."""
    probs = torch.softmax(logits, -1)  # (n, vocab)
    if top_p >= 1:
        return [int(torch.multinomial(probs[i], 1, generator=g)) for i, g in enumerate(generators)]
    ordered, order = probs.sort(-1, descending=True)
    ordered[(ordered.cumsum(-1) - ordered) >= top_p] = 0.0
    return [int(order[i, torch.multinomial(ordered[i], 1, generator=g)]) for i, g in enumerate(generators)]


def sampling_variants(rows: int) -> dict:
    """Temperature 1 with top_p 0.9 or 1, over a peaked (trained-model-like) and a flat vocabulary."""
    generators = [torch.Generator().manual_seed(i) for i in range(rows)]
    out = {}
    for shape, scale in (("peaked", 4.0), ("flat", 0.5)):
        logits = torch.randn(rows, VOCAB) * scale  # (n, vocab)
        for top_p in (0.9, 1.0):
            key = f"{shape}, top_p {top_p}"
            out[f"{key}: per row, sort + multinomial"] = wall_ms(
                lambda: [sort_nucleus_draw(logits[i:i + 1], top_p, generators[i:i + 1]) for i in range(rows)], 5)
            out[f"{key}: batched sort + multinomial"] = wall_ms(lambda: sort_nucleus_draw(logits, top_p, generators), 5)
            out[f"{key}: draw_tokens (buckets, one uniform a row)"] = wall_ms(
                lambda: draw_tokens(logits, [1.0] * rows, [top_p] * rows, generators), 10)
    return out


def linear_variants(rows: int) -> dict:
    """Each linear of the model at `rows` tokens (a decode step) and 8x that (a prompt chunk)."""
    out = {}
    for dtype in (torch.bfloat16, torch.float32):
        name = str(dtype).removeprefix("torch.")
        for label, (fan_in, fan_out) in LINEARS.items():
            weight = torch.randn(fan_out, fan_in).to(dtype)
            packed = torch.ops.mkldnn._reorder_linear_weight(weight, rows)
            for tokens in (rows, 8 * rows):
                x = torch.randn(tokens, fan_in).to(dtype)
                repeat = 10 if label == "lm head" else 40
                key = f"{label} {fan_in}x{fan_out}, {tokens} tokens, {name}"
                out[f"{key}: torch linear"] = wall_ms(lambda: torch.nn.functional.linear(x, weight), repeat)
                out[f"{key}: oneDNN packed"] = wall_ms(
                    lambda: torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], ""), repeat)
    return out


def lora_variants(rows: int, adapters: int = 8, rank: int = 8) -> dict:
    """One LoRA delta (the engine's shrink/expand backend) under a bfloat16 model: each row its own
    adapter of `adapters`, stacks and rank-space math in bfloat16, or in float32 with the input
    converted and the delta converted back (what LoraLinear does on CPU)."""
    rows_of = [Composition.single(f"a{i % adapters}") for i in range(rows)]
    slot_of = {f"a{i}": i for i in range(adapters)}
    out = {}
    for label, (fan_in, fan_out) in LINEARS.items():
        if label == "lm head":
            continue
        x = torch.randn(rows, 1, fan_in).to(torch.bfloat16)  # (rows, 1, in): a decode step
        for dtype in (torch.bfloat16, torch.float32):
            a = torch.randn(adapters, rank, fan_in).to(dtype)  # (slots, r, in)
            b = torch.randn(adapters, rank, fan_out).to(dtype)  # (slots, r, out)
            meta = build_batch_meta(rows_of, slot_of, dtype=dtype, device="cpu")
            key = f"{label} {fan_in}x{fan_out}: {str(dtype).removeprefix('torch.')} stacks"
            out[key] = wall_ms(lambda: shrink_expand_delta(x.to(dtype), a, b, meta, label).to(torch.bfloat16), 200)
    return out


SECTIONS = {  # name -> fn(rows, span, slot length) -> {variant: median ms}
    "attention": attention_variants,
    "key write": write_variants,
    "greedy pick": lambda rows, span, length: argmax_variants(rows),
    "random sampling": lambda rows, span, length: sampling_variants(rows),
    "linear": lambda rows, span, length: linear_variants(rows),
    "lora delta": lambda rows, span, length: lora_variants(rows),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=64, help="rows in the decode step")
    parser.add_argument("--span", type=int, default=61, help="positions each row attends to")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--only", nargs="+", choices=SECTIONS, default=list(SECTIONS), help="these sections alone")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    length = 2 * args.span  # the slot capacity: doubling growth leaves room past the longest row
    report = {"rows": args.rows, "span": args.span, "threads": args.threads, "torch": torch.__version__, "ms": {}}
    with torch.inference_mode():
        for section in args.only:
            results = SECTIONS[section](args.rows, args.span, length)
            print(f"\n{section} ({args.rows} rows, {args.threads} thread{'s' * (args.threads > 1)}), ms:")
            for name, ms in results.items():
                print(f"  {name:<62} {ms:8.3f}", flush=True)
            report["ms"][section] = {name: round(ms, 4) for name, ms in results.items()}
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
