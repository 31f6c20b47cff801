"""`composition: auto`: per request, decide how much to compose from what retrieval and the
adapters' compatibility scores say.

1. Nothing retrieved, or the best score below `min_similarity`: no adapter fits, the base model.
2. The top-1 clearly fits (its margin over the runner-up at least `margin`): the top-1 alone.
3. Otherwise the top-1 plus each retrieved adapter compatible with it (compatibility score at
   least `min_retained`, services/lora/compatibility.py), weighted by a softmax of the retrieval
   scores at `temperature`. An adapter with no score yet counts as incompatible: mixing is opt-in.

`margin` and `temperature` are calibrated from the adapter cards (`calibrate`), never from
evaluation queries: each card sample is scored as a query against every adapter's centroid (its
own adapter's centroid without that sample), and `margin` is the MARGIN_QUANTILE of the margins
by which card samples pick their own adapter, so that inputs like the cards' own are answered by
their adapter alone; `temperature` makes a runner-up exactly `margin` behind get half the top-1's
weight.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from services.composition import CompositionMode, softmax
from services.lora.compatibility import DEFAULT_MIN_RETAINED

AUTO = "auto"
MARGIN_QUANTILE = 0.1  # one card sample in ten that picks its own adapter may still be mixed


@dataclass(frozen=True)
class PolicyThresholds:
    margin: float = 0.05
    temperature: float = 0.05 / math.log(2)
    min_retained: float = DEFAULT_MIN_RETAINED
    samples: int = 0  # card samples the calibration used; 0 = the defaults above

    def to_dict(self) -> dict:
        return {"margin": round(self.margin, 4), "temperature": round(self.temperature, 4),
                "min_retained": self.min_retained, "samples": self.samples}


@dataclass
class Decision:
    """What `auto` chose for one prompt, and why (goes into the answer's `lora` metadata)."""

    mode: CompositionMode
    adapters: list[str]  # best first
    weights: list[float]
    reason: str
    dropped: list[dict] = field(default_factory=list)  # {"name", "compatibility", "why"}

    def explain(self) -> dict:
        return {"policy": AUTO, "reason": self.reason, "dropped": self.dropped}


Compat = Callable[[str, str], float | None]  # (top-1, other) -> compatibility score, None if unknown


def decide(hits: list[tuple[str, float]], compat: Compat, thresholds: PolicyThresholds,
           min_similarity: float) -> Decision:
    """hits: (adapter, retrieval score) best first, already limited to what the caller may use."""
    if not hits or hits[0][1] < min_similarity:
        top = f"{hits[0][1]:.3f}" if hits else "none"
        return Decision(CompositionMode.none, [], [], f"no adapter fits: top score {top} < {min_similarity:g}")
    top, top_score = hits[0]
    margin = top_score - hits[1][1] if len(hits) > 1 else math.inf
    if margin >= thresholds.margin:
        return Decision(CompositionMode.selection, [top], [1.0],
                        f"clear top-1: margin {margin:.3f} >= {thresholds.margin:.3f}")
    kept, dropped = [(top, top_score)], []
    for name, score in hits[1:]:
        value = compat(top, name)
        if value is None:
            dropped.append({"name": name, "compatibility": None, "why": "no compatibility score with the top-1"})
        elif value < thresholds.min_retained:
            dropped.append({"name": name, "compatibility": round(value, 3),
                            "why": f"incompatible with the top-1: {value:.3f} < {thresholds.min_retained:g}"})
        else:
            kept.append((name, score))
    if len(kept) == 1:
        return Decision(CompositionMode.selection, [top], [1.0],
                        f"close runner-up (margin {margin:.3f}) but none compatible: top-1 alone", dropped)
    weights = softmax([s for _, s in kept], thresholds.temperature)
    return Decision(CompositionMode.mixture, [n for n, _ in kept], weights,
                    f"close scores (margin {margin:.3f} < {thresholds.margin:.3f}): mix the compatible", dropped)


def calibrate(card_embeddings: dict[str, np.ndarray], min_retained: float = DEFAULT_MIN_RETAINED) -> PolicyThresholds:
    """Thresholds from the cards alone. card_embeddings: adapter -> (samples, dim) unit-norm rows."""
    names = sorted(card_embeddings)
    if len(names) < 2:
        return PolicyThresholds(min_retained=min_retained)
    sums = {n: card_embeddings[n].sum(axis=0) for n in names}  # (dim,)
    counts = {n: len(card_embeddings[n]) for n in names}
    centroids = np.stack([unit(sums[n] / counts[n]) for n in names])  # (adapters, dim)
    margins = []
    for i, name in enumerate(names):
        emb = card_embeddings[name]  # (samples, dim)
        scores = emb @ centroids.T  # (samples, adapters)
        if counts[name] > 1:  # the own centroid without the sample itself
            loo = np.stack([unit((sums[name] - e) / (counts[name] - 1)) for e in emb])  # (samples, dim)
            scores[:, i] = (emb * loo).sum(axis=1)
        others = np.delete(scores, i, axis=1).max(axis=1)
        margins += [float(m) for m in scores[:, i] - others if m > 0]  # samples that pick their own adapter
    if not margins:
        return PolicyThresholds(min_retained=min_retained)
    margin = max(float(np.quantile(margins, MARGIN_QUANTILE)), 1e-3)
    return PolicyThresholds(margin=margin, temperature=margin / math.log(2), min_retained=min_retained,
                            samples=sum(counts.values()))


def unit(v: np.ndarray) -> np.ndarray:
    return v / max(float(np.linalg.norm(v)), 1e-12)
