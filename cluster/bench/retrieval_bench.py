"""Retrieval quality and cost on the synthetic tasks; writes JSON, docs/retrieval.png and the tables of docs/retrieval.md.

Compares centroid vs per-sample scoring, with and without the instruction, and the packaged
embedder vs one fine-tuned on 40% of the adapters (scored on the other 60%), and times a query.

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

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from cluster.bench.retrieval_tasks import TASKS, write_task_files  # noqa: E402
from cluster.bench.run_record import command_line  # noqa: E402
from services.retrieval import DEFAULT_INSTRUCTION  # noqa: E402
from services.retrieval.embedder import Embedder  # noqa: E402
from services.retrieval.evaluation import KS, evaluate, load_cards, load_queries  # noqa: E402
from services.retrieval.finetune import train_retriever  # noqa: E402
from services.retrieval.index import AdapterIndex  # noqa: E402
from services.retrieval.retriever import Retriever  # noqa: E402

DOC = Path("docs/retrieval.md")
PLOT = Path("docs/retrieval.png")
BEGIN, END = "<!-- retrieval-bench:begin -->", "<!-- retrieval-bench:end -->"
SCORINGS = (("centroid", "centroid", 1), ("best sample", "samples", 1), ("top-3 samples", "samples", 3))


class CachedEmbedder(Embedder):
    """Each text is encoded once across the many configurations compared here (timings are taken apart)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._cache: dict[str, np.ndarray] = {}

    def encode(self, texts, *, progress=False):
        missing = list(dict.fromkeys(t for t in texts if t not in self._cache))
        if missing:
            for text, vector in zip(missing, super().encode(missing, progress=progress)):
                self._cache[text] = vector
        return np.stack([self._cache[t] for t in texts]) if texts else super().encode([])


def run(embedder, cards, queries, scoring: str, m: int, **kw) -> dict:
    index = AdapterIndex(embedder.dim, scoring=scoring, sample_top_m=m)
    return evaluate(Retriever(embedder, index), cards, queries, **kw)


def compare_scorings(embedder, cards, queries, **kw) -> dict:
    return {label: run(embedder, cards, queries, scoring, m, **kw) for label, scoring, m in SCORINGS}


def query_cost(cards, queries, n: int = 100) -> dict:
    """Milliseconds per query, uncached: embedding one prompt at a time and 32 at a time, and each search."""
    embedder = Embedder()
    texts = [q.inputs for q in queries[:n]]
    t0 = time.perf_counter()
    for t in texts:
        embedder.encode([t])
    t1 = time.perf_counter()
    vectors = embedder.encode(texts)  # (n, dim) in batches of 32
    t2 = time.perf_counter()
    out = {"embed_ms_batch1": 1000 * (t1 - t0) / n, "embed_ms_batch32": 1000 * (t2 - t1) / n}
    for label, scoring, m in SCORINGS:
        index = AdapterIndex(embedder.dim, scoring=scoring, sample_top_m=m)
        for card in cards:
            index.upsert(card.model_name, embedder.encode([s.inputs for s in card.sample]))
        t3 = time.perf_counter()
        for v in vectors:
            index.search(v[None, :], top_k=3)
        out[f"search_ms {label}"] = 1000 * (time.perf_counter() - t3) / n
    return {k: round(v, 2) for k, v in out.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("var/bench/retrieval"))
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--from-json", type=Path, help="only redraw the plot and the doc tables from a results.json")
    args = parser.parse_args()
    if args.from_json:
        results = json.loads(args.from_json.read_text())
        plot(results)
        write_doc(results)
        return 0
    command = command_line("cluster.bench.retrieval_bench")

    cards_path, queries_path = write_task_files(args.out, seed=args.seed)
    cards = load_cards(cards_path)
    queries = load_queries(queries_path, cards)
    results: dict = {"command": command, "tasks": len(cards), "queries": len(queries)}

    base = {"instruction": CachedEmbedder(), "no instruction": CachedEmbedder(instruction="")}
    results["all_tasks"] = {name: compare_scorings(e, cards, queries) for name, e in base.items()}
    results["exclude_own"] = run(base["instruction"], cards, queries, "centroid", 1, exclude_own=True)

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
        tuned = CachedEmbedder(str(model))
        train_seconds = time.perf_counter() - started
        results["finetune"] = {
            "train_adapters": sorted(train), "epochs": args.epochs, "train_seconds": round(train_seconds, 1),
            "pools": {pool: {"before": compare_scorings(base["instruction"], pool_cards, held_queries),
                             "after": compare_scorings(tuned, pool_cards, held_queries)}
                      for pool, pool_cards in (("all adapters", cards), ("held-out adapters", held_cards))},
        }
    results["cost"] = query_cost(cards, queries)

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    plot(results)
    write_doc(results)
    print(json.dumps({k: v for k, v in results.items() if k != "finetune"}, indent=1)[:4000])
    print(f"wrote {args.out / 'results.json'}, {PLOT}, {DOC}")
    return 0


def _row(label: str, r: dict) -> str:
    return f"| {label} | " + " | ".join(f"{r[f'top{k}']:.1f}" for k in KS) + " |"


def write_doc(results: dict) -> None:
    head = "| configuration | " + " | ".join(f"top-{k} %" for k in KS) + " |\n|---|" + "---:|" * len(KS)
    lines = [f"Made by `{results['command'].strip()}` ({results['tasks']} tasks in "
             f"{len({t.domain for t in TASKS})} domains, 20 card samples each, {results['queries']} queries).", "",
             "**All adapters, all queries (packaged all-MiniLM-L6-v2):**", "", head]
    for emb, by_scoring in results["all_tasks"].items():
        lines += [_row(f"{scoring}, {emb}", r) for scoring, r in by_scoring.items()]
    ft = results["finetune"]
    lines += ["", f"**Fine-tuned on {len(ft['train_adapters'])} adapters (40%), {ft['epochs']} epochs, "
              f"{ft['train_seconds']:.0f} s on this machine's CPU; queries of the other "
              f"{results['tasks'] - len(ft['train_adapters'])} tasks only (with the instruction):**", "", head]
    for pool, phases in ft["pools"].items():
        for phase, by_scoring in phases.items():
            lines += [_row(f"{scoring}, {phase}, candidates: {pool}", r) for scoring, r in by_scoring.items()]
    ex = results["exclude_own"]
    lines += ["", f"**Out-of-domain protocol** (`--exclude-own`, centroid, instruction): an adapter of the query's "
              f"domain is top-1 for {ex['top1']:.1f}% of queries and in the top-3 for {ex['top3']:.1f}%.", "",
              "**Cost per query** (ms, this machine's CPU, shared; 54 adapters in embedded Qdrant):", "",
              "| step | ms |", "|---|---:|"]
    lines += [f"| {k.replace('_', ' ')} | {v:.1f} |" for k, v in results["cost"].items()]
    text = DOC.read_text()
    pattern = re.compile(re.escape(BEGIN) + ".*?" + re.escape(END), re.S)
    if not pattern.search(text):
        raise SystemExit(f"{DOC} lacks the {BEGIN} ... {END} markers")
    DOC.write_text(pattern.sub(lambda _: BEGIN + "\n" + "\n".join(lines) + "\n" + END, text))


def plot(results: dict) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    bars = {f"{s}\n{e}": r for e, by in results["all_tasks"].items() for s, r in by.items()}
    _bars(axes[0], bars, "all 54 adapters, all queries")
    pools = results["finetune"]["pools"]["all adapters"]
    _bars(axes[1], {f"{s}\n{phase}": r for phase, by in
                    (("before", pools["before"]), ("after", pools["after"])) for s, r in by.items()},
          "queries of the 60% held-out tasks, before/after fine-tuning")
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
