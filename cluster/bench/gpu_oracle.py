"""The engine on a CUDA device against its CPU float32 run (itself tested against PEFT).

    python -m cluster.bench.gpu_oracle [--zoo DIR] [--queries 32] [--out docs]

For each composition (base, selection, mixture of 3, fusion of 3) the demo zoo's held-out queries
run through the engine on the CPU in float32 (the oracle: tests/services/lora check it against
PEFT) and on CUDA in float32 and bfloat16. Compared: every prompt token's logprob (max absolute
difference; float32 must stay under 1e-3, bfloat16 under 0.15) and the greedy answers (share of
identical token sequences). Writes OUT/gpu_oracle.json; exits 1 if a tolerance is broken, 2
without a CUDA device.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

TOLERANCE = {"float32": 1e-3, "bfloat16": 0.15}
MIX = 3


def compositions(queries: list[dict], names: list[str]):
    """Per mode, each query's composition: its own adapter first, then the next ones by name."""
    from services.composition import Composition, CompositionMode

    def around(task: str) -> list[str]:
        start = names.index(task)
        return [names[(start + i) % len(names)] for i in range(MIX)]

    uniform = [1.0 / MIX] * MIX
    return {
        "base": [Composition() for _ in queries],
        "selection": [Composition.single(q["task"]) for q in queries],
        "mixture": [Composition.of(CompositionMode.mixture, around(q["task"]), uniform) for q in queries],
        "fusion": [Composition.of(CompositionMode.fusion, around(q["task"]), uniform) for q in queries],
    }


def run(zoo: Path, queries: list[dict], device: str, dtype: str, names: list[str]) -> dict[str, list]:
    from services.evaluation.generation import chat_prompt_ids
    from services.lora.engine import CompositionEngine
    from services.lora.generation import GenerationRequest

    engine = CompositionEngine.from_pretrained(zoo / "base", device=device, dtype=dtype, max_adapters_per_row=MIX)
    for name in names:
        engine.load_adapter(name, zoo / "adapters" / name)
    prompts = [chat_prompt_ids(engine.tokenizer, q["inputs"]) for q in queries]
    out = {}
    for mode, rows in compositions(queries, names).items():
        results = engine.generate([GenerationRequest(prompt_ids=p, composition=c, max_tokens=24, logprobs=0,
                                                     prompt_logprobs=True) for p, c in zip(prompts, rows)])
        out[mode] = [([e["logprob"] for e in r.prompt_logprobs[1:]], r.token_ids) for r in results]
    return out


def compare(oracle: dict[str, list], other: dict[str, list]) -> dict[str, dict]:
    report = {}
    for mode, rows in oracle.items():
        diffs = [abs(a - b) for (lp, _), (lq, _) in zip(rows, other[mode]) for a, b in zip(lp, lq)]
        same = sum(t == u for (_, t), (_, u) in zip(rows, other[mode]))
        report[mode] = {"max_logprob_diff": max(diffs), "same_answers": same / len(rows)}
    return report


def main(argv=None) -> int:
    import torch

    from cluster.bench.run_record import command_line
    from services.config import data_home

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", type=Path, default=None, help="demo zoo (default: the data home's)")
    parser.add_argument("--queries", type=int, default=32)
    parser.add_argument("--out", type=Path, default=Path("docs"))
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_oracle: no CUDA device is visible to torch; run it on a GPU machine", file=sys.stderr)
        return 2
    zoo = args.zoo or data_home() / "demo"
    if not (zoo / "queries.json").is_file():
        print(f"gpu_oracle: no demo zoo at {zoo}; build one with `loraretriever demo build`", file=sys.stderr)
        return 2
    queries = json.loads((zoo / "queries.json").read_text())[: args.queries]
    names = sorted(p.name for p in (zoo / "adapters").iterdir())
    queries = [q for q in queries if q["task"] in names]
    oracle = run(zoo, queries, "cpu", "float32", names)
    report = {"command": command_line("cluster.bench.gpu_oracle", argv), "device": torch.cuda.get_device_name(),
              "queries": len(queries), "tolerance": TOLERANCE, "runs": {}}
    broken = []
    for dtype, tolerance in TOLERANCE.items():
        report["runs"][dtype] = compare(oracle, run(zoo, queries, "cuda", dtype, names))
        broken += [f"{dtype} {mode}" for mode, r in report["runs"][dtype].items() if r["max_logprob_diff"] > tolerance]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_oracle.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    if broken:
        print(f"gpu_oracle: tolerance broken for {', '.join(broken)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
