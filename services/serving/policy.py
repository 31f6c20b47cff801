"""`composition: auto`: per request, choose the composition of the retrieved adapters that the
measurements on their cards (services/lora/compatibility.py: gain tables) say works best.

1. Nothing retrieved, or the best score below `min_similarity`: no adapter fits, the base model.
2. The family evidence: on each retrieved adapter's card, the leave-own-out rows of its gain table
   say how well mixing or fusing the neighbours predicts that card's targets, for a task none of
   them trained on. Averaged over the retrieved adapters' tables, it picks the family's
   composition: the mixture (the paper's, and no evidence's), or fusion where fusion leads it by
   at least one card sample's worth (1 / samples of accuracy). Leads under that were chance on
   both zoos measured: over four folds of the real-task zoo, the mixture would have answered 6
   more of the 159 queries that a smaller lead sent to fusion (docs/results.md, "Where the gap is").
3. Out of domain (the top score below `in_domain`, the similarity most card samples have to their
   own adapter): no retrieved adapter is the prompt's own, so lean on the family as the paper
   does: compose all the retrieved adapters with uniform weights, the family's way.
4. In domain: compose all the retrieved adapters the family's way when the top-1's neighbours,
   composed so without it (leave-own-out, on its card), do at least `min_transfer` of its job:
   they share it (same labels, same format) and hedge the top-1. Otherwise (they do another job
   on the same inputs, as the demo zoo's siblings do), or with the top-1's card unmeasured, the
   top-1 alone.

Rule 4 does not ask a composition to keep the top-1's score on the top-1's own card: card
samples are often what the adapter trained on, so its own rows flatter it, and over the folds
of the real-task zoo such a test (keep 0.8 of the gain, from 4 samples) left in-domain mixing to
noise (docs/results.md, "Over folds").

`in_domain` is calibrated from the adapter cards (`calibrate`), never from evaluation queries:
each card sample is scored against its own adapter's centroid without that sample, and
`in_domain` is the IN_DOMAIN_QUANTILE of those similarities.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Callable

import numpy as np

from services.composition import Composition, CompositionMode
from services.lora.compatibility import GainTable, Measure

AUTO = "auto"
IN_DOMAIN_QUANTILE = 0.05  # one card sample in twenty is further from its own adapter than this
# In domain, the top-1's neighbours composed without it must do at least this share of its job on
# its card: siblings that share the job (same labels, same format) can be mixed in; siblings that
# do another job on the same inputs (the demo zoo's uppercase and acronym) cannot.
MIN_TRANSFER = 0.5
MODES = (CompositionMode.selection, CompositionMode.mixture, CompositionMode.fusion)


@dataclass(frozen=True)
class PolicyThresholds:
    in_domain: float = 0.0  # 0: every prompt counts as in domain (no calibration yet)
    min_transfer: float = MIN_TRANSFER
    samples: int = 0  # card samples the calibration used; 0 = the defaults above

    def to_dict(self) -> dict:
        return {"in_domain": round(self.in_domain, 4), "min_transfer": self.min_transfer, "samples": self.samples}

    @classmethod
    def from_dict(cls, raw: dict) -> "PolicyThresholds":
        """Stored thresholds; keys of earlier rules (min_retained, tie) are ignored."""
        return cls(**{f.name: raw[f.name] for f in fields(cls) if f.name in raw})


@dataclass
class Decision:
    """What `auto` chose for one prompt, and why (goes into the answer's `lora` metadata)."""

    mode: CompositionMode
    adapters: list[str]  # best first
    weights: list[float]
    reason: str
    evidence: dict = field(default_factory=dict)  # family mode -> mean accuracy

    def explain(self) -> dict:
        out = {"policy": AUTO, "reason": self.reason}
        if self.evidence:
            out["family"] = self.evidence
        return out


Tables = Callable[[str], GainTable | None]  # adapter name -> its active gain table, None if unmeasured


def family_evidence(tables: list[GainTable]) -> dict[CompositionMode, Measure]:
    """Per mode, the best leave-own-out measurement of that mode on each table's card, averaged
    over the tables that measured every mode."""
    per_mode: dict[CompositionMode, list[Measure]] = {m: [] for m in MODES}
    for table in tables:
        best = {}
        for sig, measure in table.measures.items():
            mode, _, members = sig.partition(":")
            if not members or table.adapter in members.split("+"):
                continue  # the base row and the own rows
            key = CompositionMode(mode)
            if key not in best or (measure.accuracy, measure.logprob) > (best[key].accuracy, best[key].logprob):
                best[key] = measure
        if len(best) == len(MODES):
            for mode, measure in best.items():
                per_mode[mode].append(measure)
    return {mode: Measure(float(np.mean([m.accuracy for m in ms])), float(np.mean([m.logprob for m in ms])))
            for mode, ms in per_mode.items() if ms}


def composing_mode(evidence: dict[CompositionMode, Measure], samples: int) -> tuple[CompositionMode, str]:
    """(mode, why): fusion where the family evidence has it ahead of the mixture by at least
    1 / samples of accuracy (samples: the fewest card samples a table measured), else the mixture."""
    if not evidence:
        return CompositionMode.mixture, "no family evidence: the paper's mixture"
    lead = evidence[CompositionMode.fusion].accuracy - evidence[CompositionMode.mixture].accuracy
    if lead >= 1.0 / samples - 1e-9:  # accuracies are means of shares: one sample in 4 may come out 0.2499...
        return CompositionMode.fusion, f"fusion leads the mixture by {lead:.2f}"
    if lead > 0:
        return CompositionMode.mixture, f"mixture: fusion's lead {lead:.2f} is under one card sample in {samples}"
    return CompositionMode.mixture, "mixture measured best"


def decide(hits: list[tuple[str, float]], tables: Tables, thresholds: PolicyThresholds,
           min_similarity: float) -> Decision:
    """hits: (adapter, retrieval score) best first, already limited to what the caller may use."""
    if not hits or hits[0][1] < min_similarity:
        top = f"{hits[0][1]:.3f}" if hits else "none"
        return Decision(CompositionMode.none, [], [], f"no adapter fits: top score {top} < {min_similarity:g}")
    names = [n for n, _ in hits]
    top, top_score = hits[0]
    measured = [t for t in (tables(n) for n in names) if t is not None]
    evidence = family_evidence(measured)
    mode, why = composing_mode(evidence, min((t.samples for t in measured), default=1))
    shown = {m.value: round(e.accuracy, 3) for m, e in evidence.items()}
    if len(names) == 1:
        return Decision(CompositionMode.selection, [top], [1.0], "one adapter retrieved", evidence=shown)
    if top_score < thresholds.in_domain:
        family = f"compose the family: {why} over {len(measured)} cards ({_show(shown)})" if evidence else why
        return _composed(mode, names, f"out of domain (top score {top_score:.3f} < {thresholds.in_domain:.3f}): {family}",
                         shown)
    own = tables(top)
    transfer = own.transfer(mode) if own is not None else None
    if transfer is None:
        return Decision(CompositionMode.selection, [top], [1.0],
                        "in domain: top-1 alone; its own card is not measured yet", evidence=shown)
    if transfer < thresholds.min_transfer:
        return Decision(CompositionMode.selection, [top], [1.0],
                        f"in domain: top-1 alone; its neighbours' {mode.value} does {transfer:.2f} "
                        f"< {thresholds.min_transfer:g} of its job on its card", evidence=shown)
    return _composed(mode, names, f"in domain: its neighbours' {mode.value} does {transfer:.2f} of the top-1's job "
                                  f"on its card: compose the family ({why}; {_show(shown)})", shown)


def _composed(mode: CompositionMode, names: list[str], reason: str, shown: dict) -> Decision:
    chosen = Composition.of(mode, names)
    return Decision(chosen.mode, list(chosen.adapters), list(chosen.weights), reason, evidence=shown)


def _show(shown: dict) -> str:
    return ", ".join(f"{m} {v:.2f}" for m, v in shown.items())


def calibrate(card_embeddings: dict[str, np.ndarray]) -> PolicyThresholds:
    """Thresholds from the cards alone. card_embeddings: adapter -> (samples, dim) unit-norm rows."""
    own = []
    for emb in card_embeddings.values():  # (samples, dim)
        if len(emb) < 2:
            continue
        total = emb.sum(axis=0)  # (dim,)
        loo = np.stack([unit(total - e) for e in emb])  # (samples, dim): the centroid without the sample
        own += [float(s) for s in (emb * loo).sum(axis=1)]
    if not own:
        return PolicyThresholds()
    return PolicyThresholds(in_domain=float(np.quantile(own, IN_DOMAIN_QUANTILE)),
                            samples=sum(len(e) for e in card_embeddings.values()))


def unit(v: np.ndarray) -> np.ndarray:
    return v / max(float(np.linalg.norm(v)), 1e-12)
