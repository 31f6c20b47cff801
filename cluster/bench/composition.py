"""Throughput of heterogeneous LoRA batches: this engine against the other ways to serve them.

    python -m cluster.bench.composition [--layers 2] [--out docs]

Builds a SmolLM2-135M-shaped Llama (hidden 576, MLP 1536, 9 heads, 3 KV heads) with random
weights and `--layers` decoder layers (every layer is alike, so ratios hold per layer), and P
rank-8 PEFT adapters on all seven projections. Times the decoder stack (no LM head, no KV cache)
on prompt (seq 16) and decode (seq 1) shapes; prints a table, writes docs/composition.md numbers
and docs/composition.png.
"""
from __future__ import annotations

import argparse
import copy
import itertools
import logging
import random
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from cluster.bench.run_record import command_line
from services.lora.engine import CompositionEngine
from services.composition import Composition, CompositionMode

log = logging.getLogger("bench.composition")

MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SHAPES = {"prompt": 16, "decode": 1}  # tokens per row in one forward
BATCHES = [1, 8, 32, 64]
KS = [1, 3]
DISTINCT = [8, 32, 64]
RANK = 8


def paper_delta(x, a_stack, b_stack, meta, layer_key):
    """LoraRetriever's formulation: every row through every distinct adapter of the batch, each
    adapter's full output materialised, then a per-row weight mask."""
    a_all = a_stack[meta.unique_slots]  # (p, r, in)
    b_all = b_stack[meta.unique_slots]  # (p, r, out): B transposed
    xa = torch.einsum("bsi,pri->bspr", x, a_all)  # (batch, seq, p, r)
    outs = torch.einsum("bspr,pro->bspo", xa, b_all)  # (batch, seq, p, out)
    return torch.einsum("bspo,bp->bso", outs, meta.dense_weights)


class NoTokenizer:
    eos_token_id = pad_token_id = 0


@dataclass
class Setup:
    engine: CompositionEngine
    peft: PeftModel
    base: LlamaForCausalLM
    names: list[str]


def build(layers: int, adapters: int, folder: Path) -> Setup:
    config = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=layers, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, max_position_embeddings=2048)
    torch.manual_seed(0)
    names = [f"task{i}" for i in range(adapters)]
    lora = LoraConfig(r=RANK, lora_alpha=16, target_modules=MODULES, init_lora_weights=False)
    base = LlamaForCausalLM(config).eval()
    peft = get_peft_model(copy.deepcopy(base), lora, adapter_name=names[0])
    for name in names[1:]:
        peft.add_adapter(name, lora)
    peft.save_pretrained(folder)  # one sub-folder per adapter
    peft.eval()
    engine = CompositionEngine(copy.deepcopy(base), NoTokenizer(), device_slots=adapters,
                               max_adapters_per_row=max(KS))
    for name in names:
        engine.load_adapter(name, folder / name)
    return Setup(engine, peft, base, names)


def rows_for(batch: int, k: int, distinct: int, names: list[str], mode: CompositionMode):
    """Row b uses adapters b*k .. b*k+k-1 modulo `distinct`: every distinct adapter appears."""
    rng = random.Random(batch * 31 + k)
    pool = rng.sample(names, distinct)
    return [Composition.of(mode, [pool[(b * k + j) % distinct] for j in range(k)]) for b in range(batch)]  # 1/k each


def seconds_per_call(methods: dict, rounds: int = 3, min_round: float = 0.1) -> dict[str, float]:
    """Best time per call of each method; rounds interleave the methods so that load from other
    processes on the machine hits them alike, and the best round filters it out."""
    best = {name: float("inf") for name in methods}
    for name, fn in methods.items():
        fn()  # warm-up
    for _ in range(rounds):
        for name, fn in methods.items():
            reps, started = 0, time.perf_counter()
            while reps < 1 or time.perf_counter() - started < min_round:
                fn()
                reps += 1
            best[name] = min(best[name], (time.perf_counter() - started) / reps)
    return best


def measure(setup: Setup, shape: str, batch: int, k: int, distinct: int) -> dict[str, float]:
    """Tokens/s of each method on one heterogeneous batch; methods that cannot express it are left out."""
    seq = SHAPES[shape]
    ids = torch.randint(3, 49152, (batch, seq))
    mask = torch.ones_like(ids)
    mode = CompositionMode.selection if k == 1 else CompositionMode.mixture
    rows = rows_for(batch, k, distinct, setup.names, mode)
    engine = setup.engine
    decoder = engine.model.model

    def engine_with(backend):
        def run():
            engine.context.backend = backend
            decoder(input_ids=ids, attention_mask=mask, use_cache=False)
        return run

    methods = {"base": lambda: setup.base.model(input_ids=ids, attention_mask=mask, use_cache=False),
               "engine": engine_with("auto"), "engine gather": engine_with("gather"),
               "engine shrink-expand": engine_with("shrink_expand"),
               "paper (all adapters, masked)": engine_with(paper_delta)}
    if k == 1:
        names = [r.adapters[0] for r in rows]
        peft_decoder = setup.peft.base_model.model.model

        def peft_mixed_batch():
            # what PeftModel.forward(adapter_names=...) does, around the decoder stack only
            with setup.peft.base_model._enable_peft_forward_hooks(adapter_names=names):
                peft_decoder(input_ids=ids, attention_mask=mask, use_cache=False)
        methods["peft mixed batch"] = peft_mixed_batch

        def swap_per_request():
            for b, name in enumerate(names):
                setup.peft.set_adapter(name)
                peft_decoder(input_ids=ids[b:b + 1], attention_mask=mask[b:b + 1], use_cache=False)
        methods["swap per request"] = swap_per_request
    # One batch metadata for all timed calls, as generate builds it once for prefill and every decode step.
    with torch.inference_mode(), engine.composed(rows):
        seconds = seconds_per_call(methods)
    engine.context.backend = "auto"
    return {name: batch * seq / s for name, s in seconds.items()}


def write_plot(records: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(15, 8), sharey=False)
    for col, (shape, k) in enumerate([("prompt", 3), ("decode", 3), ("decode", 1)]):
        ax = axes[0, col]
        for method in all_methods(records)[1:]:
            pts = sorted((r["batch"], r["ratios"][method]) for r in records
                         if r["shape"] == shape and r["k"] == k and method in r["ratios"]
                         and r["distinct"] == min(max(DISTINCT), r["batch"] * k))
            if pts:
                ax.plot(*zip(*pts), marker="o", label=method)
        ax.set(title=f"{shape}, k={k}, up to {max(DISTINCT)} distinct adapters", xlabel="batch",
               ylabel="tokens/s ÷ base model", xscale="log")
        ax.axhline(1.0, color="grey", lw=0.5)
    for col, (shape, k) in enumerate([("prompt", 3), ("decode", 3), ("decode", 1)]):
        ax = axes[1, col]
        for method in ("engine", "paper (all adapters, masked)"):
            pts = sorted((r["distinct"], r["ratios"][method]) for r in records
                         if r["shape"] == shape and r["k"] == k and r["batch"] == 32)
            ax.plot(*zip(*pts), marker="o", label=method)
        ax.set(title=f"{shape}, k={k}, batch 32", xlabel="distinct adapters in the batch",
               ylabel="tokens/s ÷ base model")
    for ax in axes.flat:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("docs"))
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        log.info("building a %d-layer SmolLM2-shaped model with %d adapters", args.layers, max(DISTINCT))
        setup = build(args.layers, max(DISTINCT), Path(tmp))
        configs = sorted({(shape, batch, k, min(distinct, batch * k))
                          for shape, batch, k, distinct in itertools.product(SHAPES, BATCHES, KS, DISTINCT)})
        records = []
        for i, (shape, batch, k, distinct) in enumerate(configs, 1):
            tokens = measure(setup, shape, batch, k, distinct)
            ratios = {m: v / tokens["base"] for m, v in tokens.items()}
            records.append({"shape": shape, "batch": batch, "k": k, "distinct": distinct, "tokens": tokens,
                            "ratios": ratios})
            log.info("[%d/%d] %s batch=%d k=%d P=%d  %s", i, len(configs), shape, batch, k, distinct,
                     "  ".join(f"{m}={r:.2f}" for m, r in ratios.items()))
    table = markdown_table(records)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    write_plot(records, args.out / "composition.png")
    write_table_into_doc(args.out / "composition.md", table, args)
    log.info("wrote %s and the table in %s", args.out / "composition.png", args.out / "composition.md")


START, END = "<!-- bench:start -->", "<!-- bench:end -->"


def write_table_into_doc(doc: Path, table: str, args) -> None:
    """Replace the measured table between the markers of the doc (added at the end if absent)."""
    command = command_line("cluster.bench.composition")
    block = f"{START}\nMeasured with `{command}` ({time.strftime('%Y-%m-%d')}); tokens/s as ratios to the " \
            f"base model.\n\n{table}\n{END}"
    text = doc.read_text() if doc.exists() else ""
    if START in text and END in text:
        text = text[: text.index(START)] + block + text[text.index(END) + len(END):]
    else:
        text = text + ("\n" if text else "") + block + "\n"
    doc.write_text(text)


def all_methods(records: list[dict]) -> list[str]:
    """Every method measured, in first-seen order ("base" first)."""
    return list(dict.fromkeys(m for r in records for m in r["ratios"]))


def markdown_table(records: list[dict]) -> str:
    methods = all_methods(records)
    head = "| shape | batch | k | distinct | base tokens/s | " + " | ".join(m for m in methods if m != "base") + " |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in records:
        cells = [f"{r['ratios'][m]:.2f}" if m in r["ratios"] else "n/a" for m in methods if m != "base"]
        lines.append(f"| {r['shape']} | {r['batch']} | {r['k']} | {r['distinct']} | {r['tokens']['base']:.0f} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
