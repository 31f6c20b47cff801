"""`auto` against the fixed modes over several folds of a real-task zoo.

One fold's 75 held-out queries move a mode by 1.3 points a query, and the modes of the real-task
zoo differ by a few queries, so whether `auto` wins is read over folds, not from one. Input: the
JSON results of `loraretriever eval generate` (in-domain and `--exclude-own`), each named
`FOLD:LABEL:PATH`; LABEL names the auto variant the file holds (e.g. its gain-table samples), the
fixed modes of a fold are read from any of its files. Prints a table (per fold, setting and mean),
saves it as JSON and plots it.

    python -m cluster.bench.policy_folds 0:4:f0_in.json 0:4:f0_out.json 1:4:f1_in.json ... --out DIR
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from cluster.bench.run_record import command_line  # noqa: E402

FIXED = ("selection", "mixture", "fusion")


def read_results(specs: list[str]) -> dict[tuple[str, int, str], float]:
    """(system, fold, setting) -> overall score; auto rows are named 'auto (LABEL)'."""
    scores = {}
    for spec in specs:
        fold, label, path = spec.split(":", 2)
        result = json.loads(Path(path).read_text())
        setting = "out" if result["settings"]["exclude_own"] else "in"
        for system, report in result["systems"].items():
            if system in FIXED or system == "auto":
                name = f"auto ({label})" if system == "auto" else system
                scores[(name, int(fold), setting)] = report["overall"]["score"]
    return scores


def table(scores: dict[tuple[str, int, str], float]) -> dict:
    """Per system: its score per (fold, setting) and its mean per setting over folds (None unless
    it was measured on every fold); and per (fold, setting) the best fixed mode's score."""
    folds = sorted({f for _, f, _ in scores})
    cells = [(f, s) for s in ("in", "out") for f in folds]
    systems = sorted({n for n, _, _ in scores}, key=lambda n: (n.startswith("auto"), n))
    rows = {}
    for name in systems:
        per = {f"{s}{f}": scores.get((name, f, s)) for f, s in cells}
        means = {}
        for s in ("in", "out"):
            got = [scores[(name, f, s)] for f in folds if (name, f, s) in scores]
            means[f"mean {s}"] = round(sum(got) / len(got), 2) if len(got) == len(folds) else None
        rows[name] = {**per, **means}
    best = {}
    for f, s in cells:
        fixed = {n: scores[(n, f, s)] for n in FIXED if (n, f, s) in scores}
        if fixed:
            best[f"{s}{f}"] = max(fixed.values())
    return {"folds": folds, "rows": rows, "best_fixed": best}


def markdown(summary: dict) -> str:
    keys = list(next(iter(summary["rows"].values())))
    lines = ["| system | " + " | ".join(keys) + " |", "|---|" + "---:|" * len(keys)]
    for name, row in summary["rows"].items():
        lines.append(f"| {name} | " + " | ".join("-" if row[k] is None else f"{row[k]:.1f}" for k in keys) + " |")
    return "\n".join(lines)


def column_label(key: str) -> str:
    """'in0' -> 'in-domain' over 'fold 0'; 'mean out' -> 'out-of-domain' over 'mean'."""
    setting = "out-of-domain" if "out" in key else "in-domain"
    return f"{setting}\nmean" if key.startswith("mean") else f"{setting}\nfold {key.lstrip('inout')}"


def plot(summary: dict, path: Path) -> None:
    keys = list(next(iter(summary["rows"].values())))  # per fold and setting, then the means
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(keys)), 3.6))
    names = list(summary["rows"])
    width = 0.8 / len(names)
    for j, name in enumerate(names):
        values = [summary["rows"][name].get(k) for k in keys]
        ax.bar([i + j * width for i in range(len(keys))], [v or 0 for v in values], width, label=name)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(keys))], [column_label(k) for k in keys], fontsize=7)
    ax.set_ylabel("score (exact match, %)")
    ax.set_title("auto against the fixed modes, per fold of held-out card samples")
    ax.legend(fontsize=7, ncol=len(names), loc="upper center", bbox_to_anchor=(0.5, -0.1))
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", nargs="+", metavar="FOLD:LABEL:PATH")
    parser.add_argument("--out", type=Path, required=True, help="folder for policy_folds.json and .png")
    args = parser.parse_args(argv)
    for spec in args.results:
        if spec.count(":") < 2 or not spec.split(":", 1)[0].isdigit():
            parser.error(f"{spec!r}: expected FOLD:LABEL:PATH, e.g. 0:4 samples:flan_in.json")
        if not Path(spec.split(":", 2)[2]).is_file():
            parser.error(f"{spec!r}: no such file")
    summary = table(read_results(args.results))
    summary["command"] = command_line("cluster.bench.policy_folds", argv)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "policy_folds.json").write_text(json.dumps(summary, indent=1))
    plot(summary, args.out / "policy_folds.png")
    print(markdown(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
