"""Retrieval quality and cost on the synthetic tasks; writes JSON, docs/retrieval.png and the tables of docs/retrieval.md.

Compares the embedder backends (PyTorch reference, ONNX Runtime float32 and int8) with and
without the instruction, on short prompts and on long ones at several sequence-length limits;
centroid vs per-sample scoring; the packaged embedder vs one fine-tuned on 40% of the adapters
(scored on the other 60%); and times embedding and search apart, warmed up, threads pinned,
one prompt alone and batches of 32, at the suite's 54 adapters and at 1,000.

    python -m cluster.bench.retrieval_bench [--epochs 4] [--out var/bench/retrieval]
"""
from __future__ import annotations

import argparse
import json
import random
import re
import sys
import tempfile
import time
from pathlib import Path

# first: it pins BLAS to one thread (as Ray gives a retriever replica) before numpy loads
from cluster.bench.retrieval_scale import clocked, unit_rows

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from cluster.bench.retrieval_tasks import TASKS, write_task_files  # noqa: E402
from cluster.bench.run_record import command_line  # noqa: E402
from services.retrieval.embedder import BACKENDS, DEFAULT_BACKEND, DEFAULT_MAX_SEQ_LENGTH, Embedder  # noqa: E402
from services.retrieval.evaluation import KS, evaluate, load_cards, load_queries  # noqa: E402
from services.retrieval.finetune import train_retriever  # noqa: E402
from services.retrieval.index import AdapterIndex  # noqa: E402
from services.retrieval.retriever import Retriever  # noqa: E402

DOC = Path("docs/retrieval.md")
PLOT = Path("docs/retrieval.png")
BEGIN, END = "<!-- retrieval-bench:begin -->", "<!-- retrieval-bench:end -->"
SCORINGS = (("centroid", "centroid", 1), ("best sample", "samples", 1), ("top-3 samples", "samples", 3))
# (backend, max_seq_length) on long prompts: every backend at the model's limit, shorter limits on the default
LENGTHS = tuple((b, 256) for b in BACKENDS) + ((DEFAULT_BACKEND, 128), (DEFAULT_BACKEND, 64), ("torch", 128))


def cached_embedder(model: str | None = None, **kw) -> Embedder:
    """Each text is encoded once across the many configurations compared here (timings are taken apart)."""
    return Embedder(model, threads=1, cache_entries=10_000_000, **kw)


def run(embedder, cards, queries, scoring: str, m: int, **kw) -> dict:
    index = AdapterIndex(embedder.dim, scoring=scoring, sample_top_m=m)
    return evaluate(Retriever(embedder, index), cards, queries, **kw)


def compare_scorings(embedder, cards, queries, **kw) -> dict:
    return {label: run(embedder, cards, queries, scoring, m, **kw) for label, scoring, m in SCORINGS}


def compare_backends(cards, queries, model: str | None = None) -> dict:
    """Centroid top-k of every backend, with and without the instruction."""
    out = {}
    for backend in BACKENDS:
        for label, kw in (("instruction", {}), ("no instruction", {"instruction": ""})):
            out[f"{backend}, {label}"] = run(cached_embedder(model, backend=backend, **kw), cards, queries, "centroid", 1)
    return out


def compare_lengths(cards, queries) -> dict:
    """Long prompts: centroid top-k and batch-32 embedding cost per backend and sequence-length limit."""
    out = {}
    for backend, length in LENGTHS:
        r = run(cached_embedder(backend=backend, max_seq_length=length), cards, queries, "centroid", 1)
        out[f"{backend}, {length} tokens"] = r
        print(f"long prompts, {backend}, {length} tokens: top-1 {r['top1']}, {r['embed_ms_per_query']} ms", flush=True)
    return out


def embed_cost(short: list[str], long: list[str], backend: str, threads: int, max_seq_length: int) -> dict:
    """Milliseconds, wall and CPU: load, first call, one prompt alone, and per prompt in batches of 32."""
    t0 = time.perf_counter()
    embedder = Embedder(backend=backend, threads=threads, max_seq_length=max_seq_length)
    out = {"load s": time.perf_counter() - t0}
    t0 = time.perf_counter()
    embedder.encode(short[:1])
    out["first call ms"] = 1000 * (time.perf_counter() - t0)
    for label, texts in (("short", short), ("long", long)):
        singles = iter(texts[1:])
        wall, cpu = clocked(lambda: embedder.encode([next(singles)]), 24)  # a new prompt each call
        out[f"{label} 1 prompt ms"], out[f"{label} 1 prompt cpu ms"] = wall, cpu
        batches = iter([texts[i:i + 32] for i in range(0, len(texts) - 31, 32)])  # full batches only
        wall, cpu = clocked(lambda: embedder.encode(next(batches)), min(3, (len(texts) - 32) // 32))
        out[f"{label} batch-32 ms/prompt"], out[f"{label} batch-32 cpu ms/prompt"] = wall / 32, cpu / 32
    return {k: round(v, 2) for k, v in out.items()}


def search_cost(index: AdapterIndex, vectors: np.ndarray) -> dict:
    """Milliseconds per query, wall and CPU: one query per call and 32 per call (one batched call)."""
    one = clocked(lambda: index.search(vectors[:1], top_k=3), 20)
    batch = clocked(lambda: index.search(vectors[:32], top_k=3), 5)
    return {"1 query ms": one[0], "1 query cpu ms": one[1],
            "batch-32 ms/query": batch[0] / 32, "batch-32 cpu ms/query": batch[1] / 32}


def query_cost(cards, queries, long_queries) -> dict:
    """Embedding per backend and thread count; search at the suite's size and at 1,000 adapters."""
    short = [q.inputs for q in queries]
    long = [q.inputs for q in long_queries]
    out = {"embed": {f"{b}, {t} thread{'s' * (t > 1)}": embed_cost(short, long, b, t, DEFAULT_MAX_SEQ_LENGTH)
                     for b in BACKENDS for t in (1, 2)}}
    embedder = Embedder(threads=1)
    vectors = embedder.encode(short[:32])
    search = {}
    for label, memory in (("in-memory", True), ("embedded Qdrant", False)):
        index = AdapterIndex(embedder.dim, memory_search=memory)
        for card in cards:
            index.upsert(card.model_name, embedder.encode([s.inputs for s in card.sample]))
        search[f"{len(cards)} adapters, {label}"] = search_cost(index, vectors)
    rng = np.random.default_rng(0)
    index = AdapterIndex(embedder.dim)
    for a in range(1000):
        index.upsert(f"a{a}", unit_rows(rng, 20))
    search["1000 adapters, in-memory"] = search_cost(index, vectors)
    out["search"] = {k: {m: round(v, 3) for m, v in r.items()} for k, r in search.items()}
    out["repeat"] = repeat_cost(long)
    return out


def repeat_cost(long: list[str]) -> dict:
    """Milliseconds, wall and CPU, of long prompts seen before: the replica's embedding cache answers."""
    embedder = Embedder(threads=1, cache_entries=4096)
    embedder.encode(long[:32])
    singles = iter(long[:24] * 2)
    one = clocked(lambda: embedder.encode([next(singles)]), 24)
    batch = clocked(lambda: embedder.encode(long[:32]), 3)
    return {"1 prompt ms": one[0], "1 prompt cpu ms": one[1],
            "batch-32 ms/prompt": batch[0] / 32, "batch-32 cpu ms/prompt": batch[1] / 32}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("var/bench/retrieval"))
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--queries", type=int, default=10, help="queries per task (short prompts)")
    parser.add_argument("--long-samples", type=int, default=20, help="card samples per adapter, long prompts")
    parser.add_argument("--long-queries", type=int, default=5, help="queries per task, long prompts")
    parser.add_argument("--from-json", type=Path, help="only redraw the plot and the doc tables from a results.json")
    parser.add_argument("--skip-cost", action="store_true", help="leave the cost tables to a --cost-only run")
    parser.add_argument("--long-only", action="store_true",
                        help="only the long-prompt comparison of runtimes and length limits, into OUT/long.json")
    parser.add_argument("--cost-only", action="store_true",
                        help="only measure the cost tables, into OUT/cost.json (--from-json OUT/results.json merges it)")
    args = parser.parse_args()
    if args.from_json:
        results = json.loads(args.from_json.read_text())
        cost = args.from_json.parent / "cost.json"  # a later --cost-only run's tables replace the first run's
        if cost.is_file():
            results.update(json.loads(cost.read_text()))
        plot(results)
        write_doc(results)
        return 0
    command = command_line("cluster.bench.retrieval_bench")

    cards_path, queries_path = write_task_files(args.out, seed=args.seed, queries_per_task=args.queries)
    cards = load_cards(cards_path)
    queries = load_queries(queries_path, cards)
    long_cards_path, long_queries_path = write_task_files(args.out / "long", seed=args.seed, long=True,
                                                          samples_per_card=args.long_samples,
                                                          queries_per_task=args.long_queries)
    long_cards = load_cards(long_cards_path)
    long_queries = load_queries(long_queries_path, long_cards)
    if args.long_only:
        args.out.mkdir(parents=True, exist_ok=True)
        long = {"long": compare_lengths(long_cards, long_queries), "long_command": command,
                "long_queries": len(long_queries), "long_samples": args.long_samples}
        (args.out / "long.json").write_text(json.dumps(long, indent=1))
        return 0
    if args.cost_only:
        args.out.mkdir(parents=True, exist_ok=True)
        cost = {"cost": query_cost(cards, queries, long_queries), "cost_command": command}
        (args.out / "cost.json").write_text(json.dumps(cost, indent=1))
        print(json.dumps(cost, indent=1))
        return 0
    results: dict = {"command": command, "tasks": len(cards), "queries": len(queries), "long_queries": len(long_queries),
                     "long_samples": args.long_samples, "default_backend": DEFAULT_BACKEND}

    results["backends"] = compare_backends(cards, queries)
    print(json.dumps({k: r["top1"] for k, r in results["backends"].items()}), flush=True)
    if not args.skip_cost:
        results["cost"] = query_cost(cards, queries, long_queries)
        print(json.dumps(results["cost"], indent=1), flush=True)
    base = {"instruction": cached_embedder(), "no instruction": cached_embedder(instruction="")}
    results["all_tasks"] = {name: compare_scorings(e, cards, queries) for name, e in base.items()}
    results["exclude_own"] = run(base["instruction"], cards, queries, "centroid", 1, exclude_own=True)
    results["long"] = compare_lengths(long_cards, long_queries)

    # fine-tune on 40% of the adapters, score queries of the other 60% (against all adapters, and held-out only)
    names = sorted(c.model_name for c in cards)
    random.Random(args.seed).shuffle(names)
    train = set(names[: round(0.4 * len(names))])
    held_cards = [c for c in cards if c.model_name not in train]
    held_queries = [q for q in queries if q.task not in train]
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        model = train_retriever([c for c in cards if c.model_name in train], Path(tmp) / "model",
                                epochs=args.epochs, seed=args.seed)
        train_seconds = time.perf_counter() - started
        tuned = cached_embedder(str(model))
        results["finetune"] = {
            "train_adapters": sorted(train), "epochs": args.epochs, "train_seconds": round(train_seconds, 1),
            "pools": {pool: {"before": compare_scorings(base["instruction"], pool_cards, held_queries),
                             "after": compare_scorings(tuned, pool_cards, held_queries)}
                      for pool, pool_cards in (("all adapters", cards), ("held-out adapters", held_cards))},
            "backends after": compare_backends(cards, held_queries, str(model)),
        }

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    if (args.out / "cost.json").is_file() and "cost" not in results:
        results.update(json.loads((args.out / "cost.json").read_text()))
    plot(results)
    write_doc(results)
    print(f"wrote {args.out / 'results.json'}, {PLOT}, {DOC}")
    return 0


def _row(label: str, r: dict) -> str:
    return f"| {label} | " + " | ".join(f"{r[f'top{k}']:.1f}" for k in KS) + " |"


def write_doc(results: dict) -> None:
    head = "| configuration | " + " | ".join(f"top-{k} %" for k in KS) + " |\n|---|" + "---:|" * len(KS)
    lines = [f"Made by `{results['command'].strip()}` ({results['tasks']} tasks in "
             f"{len({t.domain for t in TASKS})} domains, 20 card samples each, {results['queries']} short queries; "
             f"the long-prompt variant has {results['long_queries']} queries). Default backend: "
             f"`{results['default_backend']}`.", "",
             "**Embedder backends, all adapters, all queries (centroid scoring; packaged all-MiniLM-L6-v2):**", "", head]
    lines += [_row(label, r) for label, r in results["backends"].items()]
    lines += ["", f"**Long prompts** ({results['long_samples']} card samples per adapter; every card sample and "
              "query wrapped in a 120-320 word task-neutral passage, "
              "before or after the task text; centroid, instruction; ms = embedding per prompt in batches of 32, "
              "1 thread):", "", "| configuration | top-1 % | top-3 % | embed ms/prompt |", "|---|---:|---:|---:|"]
    lines += [f"| {label} | {r['top1']:.1f} | {r['top3']:.1f} | {r['embed_ms_per_query']:.1f} |"
              for label, r in results["long"].items()]
    lines += ["", "**Scorings, default backend:**", "", head]
    for emb, by_scoring in results["all_tasks"].items():
        lines += [_row(f"{scoring}, {emb}", r) for scoring, r in by_scoring.items()]
    ft = results["finetune"]
    lines += ["", f"**Fine-tuned on {len(ft['train_adapters'])} adapters (40%), {ft['epochs']} epochs, "
              f"{ft['train_seconds']:.0f} s on this machine's CPU; queries of the other "
              f"{results['tasks'] - len(ft['train_adapters'])} tasks only (with the instruction, default backend):**",
              "", head]
    for pool, phases in ft["pools"].items():
        for phase, by_scoring in phases.items():
            lines += [_row(f"{scoring}, {phase}, candidates: {pool}", r) for scoring, r in by_scoring.items()]
    lines += ["", "**Fine-tuned model per backend** (centroid, all adapters, held-out tasks' queries):", "", head]
    lines += [_row(label, r) for label, r in ft["backends after"].items()]
    ex = results["exclude_own"]
    lines += ["", f"**Out-of-domain protocol** (`--exclude-own`, centroid, instruction): an adapter of the query's "
              f"domain is top-1 for {ex['top1']:.1f}% of queries and in the top-3 for {ex['top3']:.1f}%."]
    if "cost" in results:
        lines += cost_lines(results)
    text = DOC.read_text()
    pattern = re.compile(re.escape(BEGIN) + ".*?" + re.escape(END), re.S)
    if not pattern.search(text):
        raise SystemExit(f"{DOC} lacks the {BEGIN} ... {END} markers")
    DOC.write_text(pattern.sub(lambda _: BEGIN + "\n" + "\n".join(lines) + "\n" + END, text))


def cost_lines(results: dict) -> list[str]:
    lines = ["", f"**Embedding cost** (made by `{results.get('cost_command', results['command'])}`; each cell wall / "
             "CPU milliseconds; CPU = this process's CPU time, what the call takes on idle cores; warmed up, the "
             "first call reported apart; threads pinned; one prompt: median of 24 new prompts; batches of 32: "
             "median of 2-3):", "", "| backend, threads | load s | first call ms | short: 1 prompt | short: batch-32, "
             "per prompt | long: 1 prompt | long: batch-32, per prompt |", "|---|---:|---:|---:|---:|---:|---:|"]
    keys = ("short 1 prompt", "short batch-32", "long 1 prompt", "long batch-32")
    for label, r in results["cost"]["embed"].items():
        cells = [f"{r[f'{k} ms' if '1 prompt' in k else f'{k} ms/prompt']:.1f} / "
                 f"{r[f'{k} cpu ms' if '1 prompt' in k else f'{k} cpu ms/prompt']:.1f}" for k in keys]
        lines.append(f"| {label} | {r['load s']:.1f} | {r['first call ms']:.0f} | " + " | ".join(cells) + " |")
    lines += ["", "**Search cost** (top-3, centroid; wall / CPU milliseconds per query, medians; one BLAS thread):",
              "", "| index | 1 query | batch of 32, per query |", "|---|---:|---:|"]
    lines += [f"| {label} | {r['1 query ms']:.3f} / {r['1 query cpu ms']:.3f} | "
              f"{r['batch-32 ms/query']:.3f} / {r['batch-32 cpu ms/query']:.3f} |"
              for label, r in results["cost"]["search"].items()]
    if "repeat" in results["cost"]:
        r = results["cost"]["repeat"]
        lines += ["", f"**Repeated prompts** (default runtime, `embedder.cache_entries` on; a long prompt embedded "
                  f"before): {r['1 prompt ms']:.3f} / {r['1 prompt cpu ms']:.3f} ms alone, "
                  f"{r['batch-32 ms/prompt']:.3f} / {r['batch-32 cpu ms/prompt']:.3f} ms per prompt in a batch of 32."]
    return lines


def plot(results: dict) -> None:
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.4))
    _bars(axes[0], {k.replace(", ", "\n"): r for k, r in results["backends"].items()},
          "backends, short prompts, all 54 adapters")
    _bars(axes[1], {k.replace(", ", "\n"): r for k, r in results["long"].items()}, "long prompts, by length limit")
    pools = results["finetune"]["pools"]["all adapters"]
    _bars(axes[2], {f"{s}\n{phase}": r for phase, by in
                    (("before", pools["before"]), ("after", pools["after"])) for s, r in by.items()},
          "held-out tasks' queries, before/after fine-tuning")
    fig.tight_layout()
    fig.savefig(PLOT, dpi=110)


def _bars(ax, configs: dict, title: str) -> None:
    x = np.arange(len(configs))
    for j, k in enumerate((1, 3)):
        ax.bar(x + (j - 0.5) * 0.38, [r[f"top{k}"] for r in configs.values()], 0.38, label=f"top-{k}")
    ax.set_xticks(x, list(configs), fontsize=7)
    ax.set_ylim(0, 100)
    ax.set_ylabel("% of queries")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)


if __name__ == "__main__":
    sys.exit(main())
