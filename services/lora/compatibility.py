"""What composing an adapter with its neighbours does, measured on card samples before any request
asks (services/serving/policy.py decides with it).

For adapter A and its nearest active neighbours N1..Nk (card-centroid cosine), one batched forward
pass over A's card samples (input, target) scores every candidate composition by how well it
predicts the targets: the mean per-token log-probability and the share of target tokens that are
the greedy choice (accuracy: what a greedy answer gets right, token by token, given the right
prefix). The candidates, all with uniform weights (the paper's 1/k):

- own: the base model, A alone, and the mixture and the fusion of A with N1, with N1 and N2, ...
  These say how much of A's skill survives composing it with the neighbours ("retained"). A was
  trained on its card, so on these samples A alone is flattered: they guard against harmful
  mixes, they cannot show that a mix beats A on new inputs.
- leave-own-out: N1 alone, and the mixture and the fusion of N1..Nj (j >= 2), without A. None of
  them saw A's samples, so these are honest measurements of what selecting one neighbour, or
  mixing or fusing the family, does for a task of the family that no retrieved adapter trained
  on: the family evidence the policy leans on.

Cost: one forward of (2 + 2k + 2(k - 1) + 1) x samples rows per adapter (k = 2, 4 samples: 36 rows),
with targets cut to `max_target_tokens` and logits computed only at target positions.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from services.composition import Composition, CompositionMode

MAX_TARGET_TOKENS = 16  # the first tokens of a target decide a greedy answer; longer ones cost rows


@dataclass(frozen=True)
class CardTokens:
    """An adapter's card samples, tokenized: chat prompt ids and target ids, one list per sample."""

    prompts: list[list[int]]
    targets: list[list[int]]


@dataclass(frozen=True)
class Measure:
    accuracy: float  # share of target tokens that are the greedy choice, mean over samples
    logprob: float  # mean per-token log-probability of the targets, mean over samples

    def to_list(self) -> list[float]:
        return [round(self.accuracy, 4), round(self.logprob, 4)]


def signature(composition: Composition) -> str:
    """Uniform weights make the order of the adapters irrelevant: 'mixture:a@1+b@2'."""
    if composition.is_base:
        return "base"
    return f"{composition.mode.value}:{'+'.join(sorted(composition.adapters))}"


def candidates(adapter: str, neighbours: list[str]) -> dict[str, list[Composition]]:
    """{"own": [...], "loo": [...]}: the compositions measured on `adapter`'s card."""
    own = [Composition(), Composition.single(adapter)]
    loo = [Composition.single(neighbours[0])] if neighbours else []
    for j in range(1, len(neighbours) + 1):
        for mode in (CompositionMode.mixture, CompositionMode.fusion):
            own.append(Composition.of(mode, [adapter, *neighbours[:j]]))
            if j >= 2:
                loo.append(Composition.of(mode, neighbours[:j]))
    return {"own": own, "loo": loo}


@dataclass
class GainTable:
    """The measurements on one adapter version's card: signature -> Measure."""

    adapter: str  # name@version
    neighbours: list[str]  # name@version, nearest first
    samples: int
    measures: dict[str, Measure] = field(default_factory=dict)

    def get(self, composition: Composition) -> Measure | None:
        return self.measures.get(signature(composition))

    def transfer(self, mode: CompositionMode) -> float | None:
        """The share of the adapter's accuracy gain that its neighbours, composed in `mode` without
        it (the best such leave-own-out row), achieve on its card; None if unmeasured."""
        base, own = self.get(Composition()), self.get(Composition.single(self.adapter))
        rows = [m for sig, m in self.measures.items()
                if sig.startswith(f"{mode.value}:") and self.adapter not in sig.split(":", 1)[1].split("+")]
        if base is None or own is None or not rows:
            return None
        return retained(base.accuracy, own.accuracy, max(m.accuracy for m in rows))

    def to_dict(self) -> dict:
        return {"adapter": self.adapter, "neighbours": self.neighbours, "samples": self.samples,
                "measures": {k: m.to_list() for k, m in self.measures.items()}}

    @classmethod
    def from_dict(cls, data: dict) -> "GainTable":
        return cls(data["adapter"], list(data["neighbours"]), int(data["samples"]),
                   {k: Measure(*v) for k, v in data["measures"].items()})


def target_measures(engine, prompts: list[list[int]], targets: list[list[int]],
                    rows: list[Composition]) -> tuple[torch.Tensor, torch.Tensor]:
    """(accuracy, logprob), each (n,): per row, the share of target tokens that are the argmax and
    their mean log-probability after the prompt, row i composed as rows[i]. One forward."""
    seqs = [p + t for p, t in zip(prompts, targets)]
    length, longest = max(len(s) for s in seqs), max(len(t) for t in targets)
    ids = torch.full((len(seqs), length), engine.pad_id, dtype=torch.long)  # (n, length), left padded
    mask = torch.zeros((len(seqs), length), dtype=torch.long)
    for i, seq in enumerate(seqs):
        ids[i, length - len(seq):] = torch.tensor(seq)
        mask[i, length - len(seq):] = 1
    # Targets end every row: the logits before them are the last longest + 1 positions, less the last.
    logits = engine.forward_logits(ids, mask, rows, keep=longest + 1)[:, :-1].float()  # (n, longest, vocab)
    logprobs = torch.log_softmax(logits, dim=-1)
    accuracy, mean_lp = [], []
    for i, target in enumerate(targets):
        predicted = logprobs[i, longest - len(target):]  # (len(target), vocab)
        wanted = torch.tensor(target)
        accuracy.append((predicted.argmax(dim=-1).cpu() == wanted).float().mean())
        mean_lp.append(predicted.gather(1, wanted.to(predicted.device)[:, None]).mean().cpu())
    return torch.stack(accuracy), torch.stack(mean_lp)


def measure_gains(engine, adapter: str, neighbours: list[str], card: CardTokens,
                  max_target_tokens: int = MAX_TARGET_TOKENS) -> GainTable:
    """Every candidate composition of `adapter` and its neighbours (loaded pool keys, nearest
    first) on `adapter`'s card samples, in one batched forward."""
    kept = [(p, t[:max_target_tokens]) for p, t in zip(card.prompts, card.targets) if t]
    if not kept:
        raise ValueError(f"{adapter}: no card sample has a target to measure")
    comps = [c for group in candidates(adapter, neighbours).values() for c in group]
    prompts = [p for _ in comps for p, _ in kept]
    targets = [t for _ in comps for _, t in kept]
    rows = [c for c in comps for _ in kept]
    accuracy, logprob = target_measures(engine, prompts, targets, rows)
    n = len(kept)
    acc, lp = accuracy.view(len(comps), n).mean(dim=1).tolist(), logprob.view(len(comps), n).mean(dim=1).tolist()
    return GainTable(adapter, list(neighbours), n,
                     {signature(c): Measure(a, l) for c, a, l in zip(comps, acc, lp)})


def retained(base: float, own: float, mixed: float) -> float:
    """The share of an adapter's gain over the base model kept in the mixture. An adapter that
    does not beat the base model on its own card has no gain to lose: 1."""
    gain = own - base
    return 1.0 if gain <= 0 else (mixed - base) / gain
