"""The registry-driven retriever tuning's own split and scoring on the Flan cards' 48 mixed-benchmark
tasks: held-out top-1 of the configured embedder and of the candidate `train_candidate` trains.

    python -m cluster.bench.retriever_tuning --epochs 2 --out docs/retriever_tuning.json
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from services.retrieval.tuning import split_cards, train_candidate
from services.schemas import AdapterCard

CARDS = Path(__file__).resolve().parents[1] / "data" / "flan_cards.json"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--heldout-fraction", type=float, default=0.25)
    parser.add_argument("--out", default="docs/retriever_tuning.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    tasks = json.loads(CARDS.read_text())["tasks"]
    cards = [AdapterCard(model_name=t["task"], sample=t["samples"], domain=t["domain"])
             for t in tasks if t["in_mixed_task_benchmark"]]
    train, held = split_cards(cards, args.heldout_fraction, seed=0)
    cpu0, wall0 = time.process_time(), time.time()
    with tempfile.TemporaryDirectory() as tmp:
        result = train_candidate(train, held, Path(tmp) / "model", current_model=None, epochs=args.epochs,
                                 hybrid=True, progress=print)  # the configured embedder as it serves by default
    out = {"adapters": len(cards), "heldout_samples": sum(len(c.sample) for c in held), "epochs": args.epochs,
           "current_top1": result.current_top1, "candidate_top1": result.candidate_top1, "scoring": result.scoring,
           "backend": result.backend,
           "candidate_top1_per_runtime": result.details["candidate_top1_per_runtime"],
           "cpu_s": round(time.process_time() - cpu0, 1), "wall_s": round(time.time() - wall0, 1)}
    print(json.dumps(out))
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
