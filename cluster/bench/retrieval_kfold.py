"""Retrieval on real Flan tasks, k-fold over card samples: the packaged embedder against the tuned default path.

For the 48 tasks of the paper's mixed-task benchmark (cluster/data/flan_cards.json), each card's
20 samples are cut into k folds. Per fold, a model is tuned by `train_retriever` (the recipe the
registry-driven tuning runs, with its defaults unless flags say otherwise) on the other folds'
samples only, the index holds centroids of those samples, and the fold's samples are the queries.
Each configuration is scored through the product's Embedder (the default ONNX runtime) and index.

    nice -n 10 python -m cluster.bench.retrieval_kfold [--folds 4] [--run-folds 0,1,2,3] \
        [--configs untuned,default] [--out var/bench/retrieval_kfold]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import random
import tempfile
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from cluster.bench.run_record import command_line  # noqa: E402
from services.config import RetrieverTuningConfig  # noqa: E402
from services.retrieval.embedder import Embedder  # noqa: E402
from services.retrieval.evaluation import evaluate  # noqa: E402
from services.retrieval.finetune import Recipe, train_retriever  # noqa: E402
from services.retrieval.host_runtime import host_backend  # noqa: E402
from services.retrieval.index import AdapterIndex  # noqa: E402
from services.retrieval.lexical import LexicalIndex, choose_weight  # noqa: E402
from services.retrieval.retriever import Retriever  # noqa: E402
from services.retrieval.served import SERVING_FILE, Serving, served_retriever  # noqa: E402
from services.retrieval.tuning import choose_serving, serving_key, tune_cards  # noqa: E402
from services.schemas import AdapterCard, Query  # noqa: E402

CARDS = Path("cluster/data/flan_cards.json")
PLOT = Path("docs/retrieval_kfold.png")
# name (no commas: --configs is comma-separated) -> recipe changes from the defaults; "untuned" is the packaged model
CONFIGS = {
    "default": {},
    "random negatives": {"hard_negatives": False, "adapters_per_step": 16},
    "hard negatives 64 a step": {"adapters_per_step": 64},
    "student 2 layers 128 tokens": {"layers": 2, "max_seq_length": 128},
    "student 3 layers 128 tokens": {"layers": 3, "max_seq_length": 128},
    "student 2 layers 128 tokens lr 3e-4": {"layers": 2, "max_seq_length": 128, "learning_rate": 3e-4},
    "head cut": {"cut": "head"},
    "no early stopping 4 epochs": {"heldout_fraction": 0.0, "max_epochs": 4},
    # a step of 64 adapters x 4 samples at 256 tokens through 6 layers held 17 GB and was killed: 16 a step
    "full 6 layers lr 2e-4 16 a step 2 epochs": {"learning_rate": 2e-4, "max_epochs": 2, "adapters_per_step": 16},
    "full 6 layers 5 epochs": {"max_epochs": 5},
    "full 6 layers 128 tokens": {"max_seq_length": 128},
    "full 6 layers 128 tokens 5 epochs": {"max_seq_length": 128, "max_epochs": 5, "heldout_fraction": 0.0},
}
REGISTRY_TUNING = "registry tuning"  # the product's own tuning run, not a recipe variant
SCORINGS = (("centroid", "centroid", 1), ("best sample", "samples", 1), ("best 3 samples", "samples", 3))


def benchmark_tasks() -> list[dict]:
    return [t for t in json.loads(CARDS.read_text())["tasks"] if t["in_mixed_task_benchmark"]]


def fold_split(tasks: list[dict], folds: int, fold: int, seed: int = 0) -> tuple[list[AdapterCard], list[Query]]:
    """Cards of the samples outside `fold`, queries of the samples in it (the same shuffle for every fold)."""
    cards, queries = [], []
    for i, task in enumerate(tasks):
        order = list(range(len(task["samples"])))
        random.Random(seed * 1000 + i).shuffle(order)
        held = set(order[fold::folds])
        cards.append(AdapterCard(model_name=task["task"], domain=task["domain"],
                                 sample=[s for j, s in enumerate(task["samples"]) if j not in held]))
        queries += [Query(inputs=task["samples"][j]["inputs"], targets=task["samples"][j]["targets"], task=task["task"],
                          domain=task["domain"], metric="em") for j in sorted(held)]
    return cards, queries


def score(model: str | None, cards, queries) -> dict:
    """Each scoring on the default runtime (float32 ONNX), and centroid scoring on the int8 and bfloat16 runtimes."""
    embedder = Embedder(model, threads=2, cache_entries=100_000)  # each text encoded once for the scorings
    out = {label: evaluate(Retriever(embedder, AdapterIndex(embedder.dim, scoring=s, sample_top_m=m)),
                           cards, queries, scoring=s)
           for label, s, m in SCORINGS}
    int8 = Embedder(model, threads=2, backend="onnx-int8")
    out["centroid, int8"] = evaluate(Retriever(int8, AdapterIndex(int8.dim)), cards, queries)
    bf16 = Embedder(model, threads=2, backend="bf16")
    out["centroid, bf16"] = evaluate(Retriever(bf16, AdapterIndex(bf16.dim)), cards, queries)
    # the hybrid re-rank, its weight chosen on the cards alone (an inner split of the training samples)
    texts = {c.model_name: [s.inputs for s in c.sample] for c in cards}
    weight, inner = choose_weight(texts, {name: embedder.encode(t) for name, t in texts.items()})
    for label, w in (("hybrid", weight), ("lexical only", 0.0)):
        out[label] = evaluate(Retriever(embedder, AdapterIndex(embedder.dim), LexicalIndex(texts), w), cards, queries)
        out[label].update(weight=w, inner_top1_per_weight=inner)
    return out


def registry_tuning(cards, queries, out: Path, seed: int, refit_all: bool, reuse: bool = False) -> dict:
    """The default path after registration: what a tuning run does with these cards
    (tuning.tune_cards: split, train, score every serving, choose one, refit the recipe on every
    sample), then the fold's queries answered the way replicas serve the result over every card
    sample (served.served_retriever): the tuned model if kept, else the configured embedder. The
    candidate scored on the split (the gate model) is scored on the queries too. reuse: models kept
    by an earlier run in `out` are not trained again; their serving is chosen anew from the scores
    recorded with them (tuning.choose_serving, as it is now)."""
    gate = out / "gate" if refit_all else None
    if reuse and (out / "served" / SERVING_FILE).is_file():
        outcome = json.loads((out / "served" / SERVING_FILE).read_text())
        per_runtime = outcome["candidate_top1_per_runtime"]
        backend, scoring, weight = choose_serving(per_runtime)
        outcome.update(serving=Serving(backend, scoring, weight),
                       candidate_top1=per_runtime[backend][serving_key(scoring, weight < 1.0)]["top1"])
        print(f"reused the models in {out}: serving {outcome['serving']}", flush=True)
    else:
        outcome = tune_cards(cards, out / "served", refit_all=refit_all, seed=seed, gate_dir=gate, progress=print)
    kept = outcome["candidate_top1"] >= outcome["current_top1"] + RetrieverTuningConfig().min_gain  # as a run keeps
    model, serving = (out / "served", outcome["serving"]) if kept else (None, Serving())
    retriever, weight = served_retriever(model, cards, dataclasses.replace(serving, backend=host_backend(serving.backend)), threads=2)
    scores = {"served as tuned": evaluate(retriever, cards, queries), **score(str(out / "served"), cards, queries)}
    if gate is not None:
        scores.update({f"gate, {label}": v for label, v in score(str(gate), cards, queries).items()})
    s = outcome["serving"]
    tuning = {"kept": kept, "refit": refit_all, "candidate_top1": outcome["candidate_top1"],
              "current_top1": outcome["current_top1"], "backend": s.backend, "scoring": s.scoring,
              "hybrid_weight": s.hybrid_weight, "served_weight": weight, "heldout_samples": outcome["heldout_samples"],
              "candidate_top1_per_runtime": outcome["candidate_top1_per_runtime"]}
    return {"tuning": tuning, "scores": scores}


def run(args) -> dict:
    tasks = benchmark_tasks()
    results = {"command": command_line("cluster.bench.retrieval_kfold"), "folds": args.folds, "tasks": len(tasks), "configs": {}}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name in args.configs.split(","):
        per_fold = []
        for fold in (int(f) for f in args.run_folds.split(",")):
            cards, queries = fold_split(tasks, args.folds, fold)
            started = time.perf_counter(), time.process_time()
            entry = {"fold": fold}
            if name == "untuned":
                entry["scores"] = score(None, cards, queries)
            elif name == REGISTRY_TUNING:
                with tempfile.TemporaryDirectory() as tmp:
                    kept = Path(args.keep_models) / "registry-tuning" / f"fold{fold}" if args.keep_models else None
                    entry.update(registry_tuning(cards, queries, kept or Path(tmp), fold, not args.no_refit,
                                                 args.reuse_models))
            else:
                recipe = dataclasses.replace(Recipe(), **CONFIGS[name])
                with tempfile.TemporaryDirectory() as tmp:
                    kept = Path(args.keep_models) / name.replace(" ", "-") / f"fold{fold}" if args.keep_models else None
                    model = train_retriever(cards, kept or Path(tmp) / "model", recipe=recipe, seed=fold)
                    info = json.loads((model / "loraretriever_training.json").read_text())
                    entry["training"] = {k: info[k] for k in ("epoch_kept", "heldout_top1_before", "heldout_top1_after",
                                                              "heldout_top1_per_epoch", "seconds")}
                    entry["scores"] = score(str(model), cards, queries)
            entry["wall_s"] = round(time.perf_counter() - started[0], 1)
            entry["cpu_s"] = round(time.process_time() - started[1], 1)
            per_fold.append(entry)
            c = entry["scores"].get("served as tuned", entry["scores"]["centroid"])
            print(f"{name}, fold {fold}: top-1 {c['top1']}, top-3 {c['top3']} ({entry['wall_s']} s)", flush=True)
            results["configs"][name] = summarize(per_fold)
            (out / "results.json").write_text(json.dumps(results, indent=1))
    return results


def summarize(per_fold: list[dict]) -> dict:
    mean = {label: {k: round(float(np.mean([f["scores"][label][k] for f in per_fold])), 2)
                    for k in ("top1", "top3", "top5", "top8")} for label in per_fold[0]["scores"]}
    return {"mean": mean, "folds": per_fold}


def plot(results: dict, path: Path) -> None:
    """Top-1 and top-3 of each configuration: centroid, best sample, hybrid and (registry tuning) as served."""
    names = list(results["configs"])
    bars = [(label, k) for label in ("centroid", "best sample", "hybrid", "served as tuned") for k in ("top1", "top3")
            if any(label in results["configs"][n]["mean"] for n in names)]
    width = 0.8 / len(bars)
    fig, ax = plt.subplots(figsize=(max(6, 1.8 * len(names)), 4))
    x = np.arange(len(names))
    for i, (label, k) in enumerate(bars):
        vals = [results["configs"][n]["mean"].get(label, {}).get(k, np.nan) for n in names]
        at = x + (i - (len(bars) - 1) / 2) * width
        ax.bar(at, vals, width, label=f"{k}, {label}")
        for xi, v in zip(at, vals):
            if not np.isnan(v):
                ax.text(xi, v + 0.5, f"{v:.1f}", ha="center", fontsize=6)
    ax.axhline(85, color="gray", lw=0.8, ls="--")
    ax.axhline(98, color="gray", lw=0.8, ls=":")
    ax.set_xticks(x, names, rotation=15, ha="right", fontsize=7)
    ax.set_ylabel("% of held-out card samples")
    ax.set_ylim(40, 102)
    ax.set_title(f"48 Flan tasks, {results['folds']}-fold over card samples (folds run differ: see the table)", fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folds", type=int, default=4)
    parser.add_argument("--run-folds", default="0,1,2,3", help="which folds to run (comma-separated)")
    parser.add_argument("--keep-models", help="save each fold's tuned model under DIR/<config>/fold<k> (default: discarded)")
    parser.add_argument("--configs", default="untuned,default", help=f"comma-separated: untuned, {REGISTRY_TUNING}, {', '.join(CONFIGS)}")
    parser.add_argument("--no-refit", action="store_true", help=f"{REGISTRY_TUNING}: serve the split model (retriever_tuning.refit: false)")
    parser.add_argument("--reuse-models", action="store_true", help=f"{REGISTRY_TUNING}: models kept in --keep-models "
                        "by an earlier run are not trained again; their serving is chosen anew from their recorded scores")
    parser.add_argument("--out", default="var/bench/retrieval_kfold")
    parser.add_argument("--from-json", help="redraw the plot from a saved results.json")
    args = parser.parse_args()
    results = json.loads(Path(args.from_json).read_text()) if args.from_json else run(args)
    plot(results, PLOT)
    print(json.dumps({n: c["mean"] for n, c in results["configs"].items()}, indent=1))


if __name__ == "__main__":
    main()
