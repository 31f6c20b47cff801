"""Adapter search cost and index memory from 48 to 10,000 adapters; writes JSON, docs/retrieval_scale.png.

Synthetic cards (random unit sample embeddings, 20 per adapter, 384-d: the search cost does not
depend on what the vectors mean) go into the embedded index. For each library size it times a
search of one query and of a batch of 32 (one call), centroid and per-sample scoring, in the
in-memory search the embedded index uses and, for comparison, in embedded Qdrant's own search;
it times registering one more adapter and reports memory. A Qdrant server is estimated on paper.

    python -m cluster.bench.retrieval_scale [--sizes 48 300 1000 3000 10000] [--out var/bench/retrieval_scale]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import time
import warnings
from pathlib import Path

# One BLAS thread, as Ray gives a retriever replica reserving under one CPU (set before numpy loads)
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import psutil  # noqa: E402

from cluster.bench.run_record import command_line  # noqa: E402
from services.retrieval.index import AdapterIndex  # noqa: E402

PLOT = Path("docs/retrieval_scale.png")
DOC = Path("docs/retrieval.md")
BEGIN, END = "<!-- retrieval-scale:begin -->", "<!-- retrieval-scale:end -->"
COLUMNS = ("centroid b1 ms", "centroid b32 ms/query", "samples b1 ms", "samples b32 ms/query",
           "embedded qdrant centroid b1 ms", "register s", "first centroid search after s", "build_s",
           "search matrices MiB", "index MiB (process)", "server estimate MiB")
DIM, SAMPLES = 384, 20
# embedded Qdrant filters every point in Python per query: past this many points a search takes seconds
QDRANT_SEARCH_MAX_POINTS = 25_000


def clocked(fn, repeats: int, *, warm_up: bool = True) -> tuple[float, float]:
    """(wall, CPU) milliseconds of one call, medians of `repeats` calls after a warm-up call (if `warm_up`).

    CPU time (this process, all its threads) is what the call would take on idle cores; on a
    machine shared with other work the wall time also counts waiting for a core.
    """
    if warm_up:
        fn()
    walls, cpus = [], []
    for _ in range(repeats):
        w0, c0 = time.perf_counter(), time.process_time()
        fn()
        walls.append(1000 * (time.perf_counter() - w0))
        cpus.append(1000 * (time.process_time() - c0))
    return statistics.median(walls), statistics.median(cpus)


def unit_rows(rng, n: int) -> np.ndarray:
    rows = rng.normal(size=(n, DIM)).astype(np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def measure(size: int, rng, repeats: int) -> dict:
    rss0 = psutil.Process().memory_info().rss
    index = AdapterIndex(DIM)
    started = time.perf_counter()
    for a in range(size):
        index.upsert(f"a{a}", unit_rows(rng, SAMPLES), tenant=f"t{a % 7}" if a % 5 == 0 else None)
    out = {"adapters": size, "points": size * (SAMPLES + 1), "build_s": round(time.perf_counter() - started, 1)}
    queries = unit_rows(rng, 32)
    for scoring in ("centroid", "samples"):
        out[f"{scoring} b1 ms"] = clocked(
            lambda: index.search(queries[:1], top_k=3, tenant="t1", scoring=scoring), repeats)[0]
        out[f"{scoring} b32 ms/query"] = clocked(
            lambda: index.search(queries, top_k=3, tenant="t1", scoring=scoring), max(3, repeats // 8))[0] / 32
    # registering one more adapter, and the first search after it (which rebuilds the search matrices)
    t0 = time.perf_counter()
    index.upsert("new", unit_rows(rng, SAMPLES))
    out["register s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    index.search(queries[:1], top_k=3)
    out["first centroid search after s"] = time.perf_counter() - t0
    index.search(queries[:1], top_k=3, scoring="samples")
    out["index MiB (process)"] = (psutil.Process().memory_info().rss - rss0) / 2**20
    out["search matrices MiB"] = index._matrix.nbytes() / 2**20
    out["server estimate MiB"] = server_estimate_mib(size)
    if out["points"] <= QDRANT_SEARCH_MAX_POINTS:  # embedded Qdrant's own search over the same collection
        qdrant = AdapterIndex(DIM, memory_search=False)
        qdrant.client, qdrant.collection = index.client, index.collection
        out["embedded qdrant centroid b1 ms"] = clocked(lambda: qdrant.search(queries[:1], top_k=3, tenant="t1"), 3)[0]
        out["embedded qdrant centroid b32 ms/query"] = clocked(
            lambda: qdrant.search(queries, top_k=3, tenant="t1"), 1)[0] / 32
    index.client.close()
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in out.items()}


def server_estimate_mib(size: int, m: int = 16) -> float:
    """A Qdrant server's RAM for the collection: float32 vectors, HNSW links (about 2m per point at
    level 0, 4-byte ids) and ~200 bytes of payload per point; not measured here (no server)."""
    points = size * (SAMPLES + 1)
    return points * (DIM * 4 + 2 * m * 4 + 200) / 2**20


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[48, 300, 1000, 3000, 10000])
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("var/bench/retrieval_scale"))
    parser.add_argument("--from-json", type=Path, help="only redraw the plot and the doc table from a results.json")
    args = parser.parse_args()
    if args.from_json:
        results = json.loads(args.from_json.read_text())
        plot(results["rows"])
        write_doc(results)
        return 0
    warnings.filterwarnings("ignore", message="Local mode is not recommended")
    rng = np.random.default_rng(args.seed)
    rows = []
    for size in args.sizes:
        rows.append(measure(size, rng, args.repeats))
        print(json.dumps(rows[-1]), flush=True)
    results = {"command": command_line("cluster.bench.retrieval_scale"), "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    plot(rows)
    write_doc(results)
    print(f"wrote {args.out / 'results.json'}, {PLOT}, {DOC}")
    return 0


def write_doc(results: dict) -> None:
    lines = [f"Made by `{results['command'].strip()}`; blank: not measured (embedded Qdrant's own search past "
             f"{QDRANT_SEARCH_MAX_POINTS:,} points takes seconds a query).", "",
             "| adapters | " + " | ".join(COLUMNS) + " |", "|---:|" + "---:|" * len(COLUMNS)]
    for r in results["rows"]:
        lines.append(f"| {r['adapters']:,} | " + " | ".join(
            "" if k not in r else f"{r[k]:.0f}" if r[k] >= 100 else f"{r[k]:.3g}" for k in COLUMNS) + " |")
    text = DOC.read_text()
    pattern = re.compile(re.escape(BEGIN) + ".*?" + re.escape(END), re.S)
    if not pattern.search(text):
        raise SystemExit(f"{DOC} lacks the {BEGIN} ... {END} markers")
    DOC.write_text(pattern.sub(lambda _: BEGIN + "\n" + "\n".join(lines) + "\n" + END, text))


def plot(rows: list[dict]) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.2))
    sizes = [r["adapters"] for r in rows]
    for key, style in (("centroid b1 ms", "o-"), ("centroid b32 ms/query", "o--"), ("samples b1 ms", "s-"),
                       ("samples b32 ms/query", "s--"), ("embedded qdrant centroid b1 ms", "x-")):
        pts = [(s, r[key]) for s, r in zip(sizes, rows) if key in r]
        ax.plot(*zip(*pts), style, label=key.replace("b1", "1 query").replace("b32", "batch of 32,"))
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("adapters (21 points each)")
    ax.set_ylabel("ms")
    ax.set_title("adapter search cost, embedded index, 1 thread", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(PLOT, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
