"""`composition: auto`: per request, choose the composition of the retrieved adapters that the
measurements on their cards (services/lora/compatibility.py: gain tables) say works best.

1. Nothing retrieved, or the best score below `min_similarity`: no adapter fits, the base model.
2. The family evidence: on each retrieved adapter's card, the leave-own-out rows of its gain table
   say whether selecting one neighbour, mixing the neighbours or fusing them predicts that card's
   targets best, for a task none of them trained on. Averaged over the retrieved adapters' tables,
   the mode with the highest accuracy (log-probability breaks ties) is the family's mode; a mode
   must beat selection by more than `tie` to count.
3. Out of domain (the top score below `in_domain`, the similarity most card samples have to their
   own adapter): no retrieved adapter is the prompt's own, so lean on the family as the paper
   does: compose all the retrieved adapters with uniform weights, by mixture or fusion, whichever
   the family evidence measured better (no evidence: the paper's mixture).
4. In domain: the top-1 is likely the prompt's own adapter. If the family's mode is selection, or
   there is no evidence, the top-1 alone; also when the top-1's neighbours composed that way
   without it (leave-own-out, on its card) do less than `min_transfer` of its job: they do another
   job on the same inputs. Otherwise the widest composition of that mode measured on the top-1's
   card whose adapters were all retrieved and that keeps at least `min_retained` of the top-1's
   gain on its own card (this refuses mixes that break the top-1's skill).

`in_domain` is calibrated from the adapter cards (`calibrate`), never from evaluation queries:
each card sample is scored against its own adapter's centroid without that sample, and
`in_domain` is the IN_DOMAIN_QUANTILE of those similarities.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from services.composition import Composition, CompositionMode
from services.lora.compatibility import DEFAULT_MIN_RETAINED, GainTable, Measure

AUTO = "auto"
IN_DOMAIN_QUANTILE = 0.05  # one card sample in twenty is further from its own adapter than this
TIE = 0.02  # accuracy a composition must gain over selection in the family evidence to be chosen
# In domain, the top-1's neighbours composed without it must do at least this share of its job on
# its card: siblings that share the job (same labels, same format) can be mixed in; siblings that
# do another job on the same inputs (the demo zoo's uppercase and acronym) cannot.
MIN_TRANSFER = 0.5
MODES = (CompositionMode.selection, CompositionMode.mixture, CompositionMode.fusion)


@dataclass(frozen=True)
class PolicyThresholds:
    in_domain: float = 0.0  # 0: every prompt counts as in domain (no calibration yet)
    min_retained: float = DEFAULT_MIN_RETAINED
    min_transfer: float = MIN_TRANSFER
    tie: float = TIE
    samples: int = 0  # card samples the calibration used; 0 = the defaults above

    def to_dict(self) -> dict:
        return {"in_domain": round(self.in_domain, 4), "min_retained": self.min_retained,
                "min_transfer": self.min_transfer, "tie": self.tie,
                "samples": self.samples}


@dataclass
class Decision:
    """What `auto` chose for one prompt, and why (goes into the answer's `lora` metadata)."""

    mode: CompositionMode
    adapters: list[str]  # best first
    weights: list[float]
    reason: str
    dropped: list[dict] = field(default_factory=list)  # {"name", "why"}
    evidence: dict = field(default_factory=dict)  # family mode -> mean accuracy

    def explain(self) -> dict:
        out = {"policy": AUTO, "reason": self.reason, "dropped": self.dropped}
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


def family_mode(evidence: dict[CompositionMode, Measure], tie: float) -> CompositionMode | None:
    """The mode the family evidence favours; None without evidence."""
    if not evidence:
        return None
    sel = evidence[CompositionMode.selection]
    best = max((CompositionMode.mixture, CompositionMode.fusion),
               key=lambda m: (evidence[m].accuracy, evidence[m].logprob))
    ahead = evidence[best].accuracy - sel.accuracy
    if ahead > tie or (abs(ahead) <= tie and evidence[best].logprob > sel.logprob and ahead >= 0):
        return best
    return CompositionMode.selection


def composing_mode(evidence: dict[CompositionMode, Measure]) -> CompositionMode:
    """Mixture or fusion, whichever the family evidence measured better; no evidence: mixture."""
    if not evidence:
        return CompositionMode.mixture
    return max((CompositionMode.mixture, CompositionMode.fusion),
               key=lambda m: (evidence[m].accuracy, evidence[m].logprob))


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
    mode = family_mode(evidence, thresholds.tie)
    shown = {m.value: round(e.accuracy, 3) for m, e in evidence.items()}
    if top_score < thresholds.in_domain and len(names) > 1:
        mode = composing_mode(evidence)
        why = (f"compose the family: {mode.value} measured best of the compositions over {len(measured)} cards "
               f"({_show(shown)})" if evidence else "no family evidence: the paper's mixture")
        chosen = Composition.of(mode, names)
        return Decision(chosen.mode, list(chosen.adapters), list(chosen.weights),
                        f"out of domain (top score {top_score:.3f} < {thresholds.in_domain:.3f}): {why}",
                        evidence=shown)
    if mode in (None, CompositionMode.selection):
        why = "no family evidence" if mode is None else f"the family gains nothing from composing ({_show(shown)})"
        return Decision(CompositionMode.selection, [top], [1.0], f"in domain: top-1 alone; {why}", evidence=shown)
    own = tables(top)
    if own is None:
        return Decision(CompositionMode.selection, [top], [1.0],
                        "in domain: top-1 alone; its own card is not measured yet", evidence=shown)
    transfer = own.transfer(mode)
    if transfer is not None and transfer < thresholds.min_transfer:
        return Decision(CompositionMode.selection, [top], [1.0],
                        f"in domain: top-1 alone; its neighbours' {mode.value} does {transfer:.2f} "
                        f"< {thresholds.min_transfer:g} of its job on its card", evidence=shown)
    chosen, share, dropped = _widest_kept(own, top, names, mode, thresholds.min_retained)
    if chosen is None:
        return Decision(CompositionMode.selection, [top], [1.0],
                        f"in domain: top-1 alone; no {mode.value} keeps {thresholds.min_retained:g} of its gain",
                        dropped, shown)
    return Decision(chosen.mode, list(chosen.adapters), list(chosen.weights),
                    f"in domain: the family gains from {mode.value} ({_show(shown)}); "
                    f"{len(chosen.adapters)} adapters keep {share:.2f} of the top-1's gain",
                    dropped, shown)


def _widest_kept(own: GainTable, top: str, names: list[str], mode: CompositionMode,
                 min_retained: float) -> tuple[Composition | None, float, list[dict]]:
    """The widest composition of `mode` on the top-1's card, of retrieved adapters only, that keeps
    min_retained of the top-1's gain, with that share. Table keys are name@version; the served
    composition names adapters (the planner resolves the same versions)."""
    by_name = {key.rsplit("@", 1)[0]: key for key in own.neighbours}
    order = [by_name[n] for n in names[1:] if n in by_name]  # retrieved neighbours, retrieval order
    dropped = [{"name": n, "why": "not a measured neighbour of the top-1"} for n in names[1:] if n not in by_name]
    nearest = [k for k in own.neighbours if k in order]
    for j in range(len(nearest), 0, -1):
        # the own rows measure the top-1 with its nearest neighbours: only prefixes were measured
        if nearest[:j] != own.neighbours[:j]:
            continue
        candidate = Composition.of(mode, [own.adapter, *nearest[:j]])
        share = own.retained(candidate)
        if share is not None and share >= min_retained:
            served = Composition.of(mode, [top, *[k.rsplit("@", 1)[0] for k in nearest[:j]]])
            return served, share, dropped
        dropped.append({"name": "+".join(k.rsplit("@", 1)[0] for k in nearest[:j]),
                        "why": f"{mode.value} keeps {share if share is None else round(share, 3)} "
                               f"< {min_retained:g} of the top-1's gain"})
    return None, 0.0, dropped


def _show(shown: dict) -> str:
    return ", ".join(f"{m} {v:.2f}" for m, v in shown.items())


def calibrate(card_embeddings: dict[str, np.ndarray], min_retained: float = DEFAULT_MIN_RETAINED) -> PolicyThresholds:
    """Thresholds from the cards alone. card_embeddings: adapter -> (samples, dim) unit-norm rows."""
    own = []
    for emb in card_embeddings.values():  # (samples, dim)
        if len(emb) < 2:
            continue
        total = emb.sum(axis=0)  # (dim,)
        loo = np.stack([unit(total - e) for e in emb])  # (samples, dim): the centroid without the sample
        own += [float(s) for s in (emb * loo).sum(axis=1)]
    if not own:
        return PolicyThresholds(min_retained=min_retained)
    return PolicyThresholds(in_domain=float(np.quantile(own, IN_DOMAIN_QUANTILE)), min_retained=min_retained,
                            samples=sum(len(e) for e in card_embeddings.values()))


def unit(v: np.ndarray) -> np.ndarray:
    return v / max(float(np.linalg.norm(v)), 1e-12)
