"""Do two adapters work together? Measured on their own cards, before any request mixes them.

For adapter i and its card samples (input, target): gain_i is how much more likely the target is
under i than under the base model (mean log-probability per target token), and mixed_gain_ij the
same under the equal-weight mixture of i and j. retained_ij = mixed_gain_ij / gain_i is the share
of i's own gain that survives j being mixed in: 1 = no interference, 0.5 = half lost, below 0 =
worse than the base model. The pair's score is min(retained_ij, retained_ji): mixing must not
break either adapter. All rows of a pair (base, i alone, the mixture, on both cards) run as one
batched forward pass.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from services.composition import Composition, CompositionMode

# A pair counts as compatible when each adapter keeps at least this share of its own gain.
DEFAULT_MIN_RETAINED = 0.8


@dataclass(frozen=True)
class CardTokens:
    """An adapter's card samples, tokenized: chat prompt ids and target ids, one list per sample."""

    prompts: list[list[int]]
    targets: list[list[int]]


@dataclass(frozen=True)
class PairScore:
    retained_ab: float  # share of a's gain on a's card kept when b is mixed in
    retained_ba: float  # share of b's gain on b's card kept when a is mixed in

    @property
    def score(self) -> float:
        return min(self.retained_ab, self.retained_ba)


def target_logprobs(engine, prompts: list[list[int]], targets: list[list[int]],
                    rows: list[Composition]) -> torch.Tensor:
    """(n,) mean log-probability per token of each target after its prompt, row i composed as rows[i]."""
    seqs = [p + t for p, t in zip(prompts, targets)]
    length = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), length), engine.pad_id, dtype=torch.long)  # (n, length), left padded
    mask = torch.zeros((len(seqs), length), dtype=torch.long)
    for i, seq in enumerate(seqs):
        ids[i, length - len(seq):] = torch.tensor(seq)
        mask[i, length - len(seq):] = 1
    logprobs = torch.log_softmax(engine.forward_logits(ids, mask, rows).float(), dim=-1)  # (n, length, vocab)
    out = []
    for i, target in enumerate(targets):
        positions = torch.arange(length - len(target), length)  # where the target tokens sit
        predicted = logprobs[i, positions - 1]  # (len(target), vocab): the logits before each token
        out.append(predicted.gather(1, torch.tensor(target)[:, None]).mean())
    return torch.stack(out)


def pair_score(engine, key_a: str, card_a: CardTokens, key_b: str, card_b: CardTokens) -> PairScore:
    """Both directions of one pair in one forward pass (keys are loaded pool keys)."""
    mix = Composition.of(CompositionMode.mixture, [key_a, key_b], [0.5, 0.5])
    prompts, targets, rows = [], [], []
    for own, card in ((key_a, card_a), (key_b, card_b)):
        for composition in (Composition(), Composition.single(own), mix):
            prompts += card.prompts
            targets += card.targets
            rows += [composition] * len(card.prompts)
    lp = target_logprobs(engine, prompts, targets, rows)
    n_a, n_b = len(card_a.prompts), len(card_b.prompts)
    base_a, own_a, mix_a = lp[:3 * n_a].view(3, n_a).mean(dim=1).tolist()
    base_b, own_b, mix_b = lp[3 * n_a:].view(3, n_b).mean(dim=1).tolist()
    return PairScore(retained(base_a, own_a, mix_a), retained(base_b, own_b, mix_b))


def retained(base: float, own: float, mixed: float) -> float:
    """The share of an adapter's gain over the base model kept in the mixture. An adapter that
    does not beat the base model on its own card has no gain to lose: 1."""
    gain = own - base
    return 1.0 if gain <= 0 else (mixed - base) / gain
