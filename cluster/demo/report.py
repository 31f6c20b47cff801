"""Markdown tables and bar plot of `eval generate --json` results (in-domain, out-of-domain, held-out tasks)."""
from __future__ import annotations

from pathlib import Path

SYSTEM_LABELS = {
    "base": "base model",
    "perfect": "perfect selection",
    "selection": "selection (top-1)",
    "mixture": "mixture",
    "fusion": "fusion",
    "auto": "auto (adaptive)",
}


def _domains(result: dict) -> list[str]:
    return sorted(next(iter(result["systems"].values()))["domains"])


def setting_name(result: dict) -> str:
    settings = result.get("settings", {})
    if settings.get("held_out"):
        return "held-out tasks"
    return "out-of-domain" if settings.get("exclude_own") else "in-domain"


def markdown_table(*results: dict) -> str:
    """One row per (setting, system), one column per domain of any setting ('-' where a setting has
    none of it), then the overall score."""
    domains = list(dict.fromkeys(d for result in results for d in _domains(result)))
    lines = ["| setting | system | " + " | ".join(domains) + " | overall |", "|---" * (len(domains) + 3) + "|"]
    for result in results:
        for name, rep in result["systems"].items():
            cells = [f"{rep['domains'][d]['score']:.1f}" if d in rep["domains"] else "-" for d in domains]
            cells.append(f"**{rep['overall']['score']:.1f}**")
            lines.append(f"| {setting_name(result)} | {SYSTEM_LABELS.get(name, name)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def decision_table(*results: dict) -> str:
    """What the auto policy decided in each setting, with its calibrated threshold and the cost of
    its gain tables."""
    lines = ["| setting | selected | mixed | fused (mean adapters composed) | base model | in-domain threshold "
             "| gain tables (s per adapter) |", "|---" * 7 + "|"]
    for result in results:
        auto, policy = result["systems"].get("auto"), result.get("policy")
        if auto is None or policy is None:
            continue
        d, th = auto["decisions"], policy["thresholds"]
        lines.append(f"| {setting_name(result)} | {d['selection']} | {d['mixture']} | {d['fusion']} "
                     f"({d['mixed_adapters_mean']}) | {d['none']} | {th['in_domain']} "
                     f"| {policy['tables']} ({policy['seconds_per_adapter']}) |")
    return "\n".join(lines)


def adapter_table(manifest: dict) -> str:
    """Each finished adapter's score on its held-out queries next to the base model's."""
    lines = ["| adapter | domain | metric | base model | adapter | training (s) |", "|---|---|---|---|---|---|"]
    for name, entry in manifest.get("adapters", {}).items():
        lines.append(f"| {name} | {entry['domain']} | {entry['metric']} | {entry['base_score']:.1f} | "
                     f"**{entry['adapter_score']:.1f}** | {entry['train_seconds']:.0f} |")
    return "\n".join(lines)


def plot(results: list[dict], png: Path) -> None:
    """Grouped bars: per domain and overall, one bar per system; one panel per setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(len(results), 1, figsize=(11, 3.6 * len(results)), squeeze=False)
    for ax, result in zip(axes[:, 0], results):
        title, domains = setting_name(result), _domains(result) + ["overall"]
        systems = list(result["systems"])
        width = 0.8 / len(systems)
        x = np.arange(len(domains))
        for i, name in enumerate(systems):
            rep = result["systems"][name]
            values = [rep["domains"][d]["score"] for d in domains[:-1]] + [rep["overall"]["score"]]
            ax.bar(x + (i - (len(systems) - 1) / 2) * width, values, width, label=SYSTEM_LABELS.get(name, name))
        ax.set_xticks(x, domains)
        ax.set_ylim(0, 100)
        ax.set_ylabel("score (EM / BLEU / ROUGE-L)")
        ax.set_title(title)
        ax.legend(fontsize=8, ncol=len(systems), loc="upper left")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
