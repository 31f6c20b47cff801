"""Quality gate cost per staged version.

    python -m cluster.bench.gate [--zoo DIR] [--adapters NAME ...] [--threads 2] [--repeat 2] [--out docs]

For every finished adapter of the zoo (the demo zoo at ~/.cache/loraretriever/demo by default),
stages a new version (lora_B scaled by 0.9) next to the active one and runs the product's gate
(services.rollout.quality_gate.run_gate) on the task's held-out queries: the new version, the
active version and the base model answer them concurrently through the composer's own service
(ComposerService: adapter pool, continuous batcher, batched engine, as a composer replica runs it,
without the Ray hop). The first run of each adapter is a warm-up (adapter loads); the figure is
the mean of --repeat runs after it.

Writes OUT/gate_cost.json (the exact command, per-adapter seconds and scores) and
OUT/gate_cost.png (seconds per version, per adapter)."""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from cluster.bench.run_record import command_line
from cluster.demo.variants import variant_adapter


def composer_service(base: Path, store: Path, threads: int):
    import torch

    from services.lora.engine import CompositionEngine
    from services.serving.composer_service import ComposerService

    torch.set_num_threads(threads)
    engine = CompositionEngine.from_pretrained(base, device="cpu", dtype="float32", max_adapters_per_row=4,
                                               device_slots=8, cpu_slots=16, max_rank=64)
    return ComposerService(engine, store, max_prompt_tokens=2048)


def answers_through(service):
    """The gate's answers(prompts, key) over a ComposerService, as the cluster's compose call."""
    from services.rollout.quality_gate import composer_answers

    async def compose(job) -> dict:
        result = None
        async for item in service.generate(job):
            result = item
        return {"text": result.text}

    return composer_answers(compose, max_tokens=24)


async def measure(args, zoo, store: Path) -> list[dict]:
    from services.rollout.quality_gate import GateSamples, run_gate
    from services.schemas import CardSample

    service = composer_service(zoo.base, store, args.threads)
    answers = answers_through(service)
    rows = []
    for name in args.adapters or list(zoo.adapters):
        queries = [q for q in zoo.queries if q.task == name]
        evaluation = GateSamples(metric=queries[0].metric,
                                 samples=[CardSample(inputs=q.inputs, targets=q.targets) for q in queries])
        runs = []
        for _ in range(1 + args.repeat):
            started = time.perf_counter()
            report = await run_gate(answers, name=name, version="v2", active_version="v1", evaluation=evaluation,
                                    source="held_out", margin=2.0, max_samples=len(queries))
            runs.append(time.perf_counter() - started)
        rows.append({"adapter": name, "metric": report.metric, "samples": report.samples, "warmup_s": round(runs[0], 3),
                     "seconds": round(sum(runs[1:]) / args.repeat, 3), "runs_s": [round(r, 3) for r in runs[1:]],
                     "score": report.score, "active_score": report.active_score, "base_score": report.base_score,
                     "passed": report.passed})
        print(json.dumps(rows[-1]))
    return rows


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(4, len(rows) * 0.8), 3.2))
    ax.bar([r["adapter"] for r in rows], [r["seconds"] for r in rows], color="#4c72b0")
    ax.set_ylabel("gate seconds per version")
    ax.set_title(title, fontsize=9)
    ax.tick_params(axis="x", rotation=45)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    from cluster.demo.zoo import default_root, load_zoo

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", default=str(default_root()), help="zoo root (default: the demo zoo)")
    parser.add_argument("--adapters", nargs="+", help="only these finished adapters (default: all)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--repeat", type=int, default=2, help="measured runs per adapter after the warm-up")
    parser.add_argument("--out", default="docs", help="folder for gate_cost.json and gate_cost.png")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    zoo = load_zoo(args.zoo)
    if not zoo.adapters:
        raise SystemExit(f"{args.zoo}: no finished adapters (`loraretriever demo build`)")
    unknown = sorted(set(args.adapters or ()) - set(zoo.adapters))
    if unknown:
        raise SystemExit(f"{args.zoo}: no finished adapter {', '.join(unknown)}")
    with tempfile.TemporaryDirectory(prefix="lr-gate-bench-") as tmp:
        store = Path(tmp)
        for name, folder in zoo.adapters.items():
            shutil.copytree(folder, store / name / "v1")
            variant_adapter(folder, store / name / "v2", 0.9)
        rows = asyncio.run(measure(args, zoo, store))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    record = {"command": command_line("cluster.bench.gate"), "zoo": str(args.zoo), "base": zoo.manifest.get("base_name"),
              "threads": args.threads, "adapters": rows,
              "mean_seconds_per_version": round(sum(r["seconds"] for r in rows) / len(rows), 3)}
    (out / "gate_cost.json").write_text(json.dumps(record, indent=1) + "\n")
    plot(rows, out / "gate_cost.png", f"quality gate per version, {record['base']} ({len(rows)} adapter(s), "
         f"{args.threads} threads)")
    print(f"mean {record['mean_seconds_per_version']} s per version; wrote {out}/gate_cost.json and gate_cost.png")


if __name__ == "__main__":
    main()
