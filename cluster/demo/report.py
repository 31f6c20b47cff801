"""Markdown table and bar plot of two `eval generate --json` results (in-domain, out-of-domain)."""
from __future__ import annotations

from pathlib import Path

SYSTEM_LABELS = {
    "base": "base model",
    "perfect": "perfect selection",
    "selection": "selection (top-1)",
    "mixture": "mixture",
    "fusion": "fusion",
}


def _domains(result: dict) -> list[str]:
    return sorted(next(iter(result["systems"].values()))["domains"])


def setting_name(result: dict) -> str:
    return "out-of-domain" if result.get("settings", {}).get("exclude_own") else "in-domain"


def markdown_table(*results: dict) -> str:
    """One row per (setting, system), one column per domain, then the overall score."""
    domains = _domains(results[0])
    lines = ["| setting | system | " + " | ".join(domains) + " | overall |", "|---" * (len(domains) + 3) + "|"]
    for result in results:
        for name, rep in result["systems"].items():
            cells = [f"{rep['domains'][d]['score']:.1f}" for d in domains] + [f"**{rep['overall']['score']:.1f}**"]
            lines.append(f"| {setting_name(result)} | {SYSTEM_LABELS.get(name, name)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def adapter_table(manifest: dict) -> str:
    """Each finished adapter's score on its held-out queries next to the base model's."""
    lines = ["| adapter | domain | metric | base model | adapter | training (s) |", "|---|---|---|---|---|---|"]
    for name, entry in manifest.get("adapters", {}).items():
        lines.append(f"| {name} | {entry['domain']} | {entry['metric']} | {entry['base_score']:.1f} | "
                     f"**{entry['adapter_score']:.1f}** | {entry['train_seconds']:.0f} |")
    return "\n".join(lines)


def plot(in_domain: dict, out_of_domain: dict | None, png: Path) -> None:
    """Grouped bars: per domain and overall, one bar per system; one panel per setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    settings = [("in-domain", in_domain)] + ([("out-of-domain (own adapter excluded)", out_of_domain)] if out_of_domain else [])
    domains = _domains(in_domain) + ["overall"]
    fig, axes = plt.subplots(len(settings), 1, figsize=(11, 3.6 * len(settings)), squeeze=False)
    for ax, (title, result) in zip(axes[:, 0], settings):
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
