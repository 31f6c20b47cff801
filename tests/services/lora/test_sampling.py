"""Batched sampling (services/lora/sampling.py) against an oracle written differently: the nucleus
by sorting the vocabulary, the draw's distribution by counting many draws."""
from __future__ import annotations

import pytest
import torch

from services.lora.sampling import draw_tokens, nucleus_floor


def sorted_nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """(R, V) bool: the smallest prefix of the tokens sorted by probability whose mass reaches top_p."""
    values, order = probs.sort(-1, descending=True)
    keep = (values.cumsum(-1) - values) < top_p
    keep[:, 0] = True
    return torch.zeros_like(keep).scatter(1, order, keep)


@pytest.mark.parametrize("vocab", [4, 50, 49152])
@pytest.mark.parametrize("temperature, top_p", [(1.4, 0.435), (0.7, 0.9), (1.0, 0.95), (3.0, 0.1), (1.0, 1e-6),
                                                (0.1, 0.5)])
def test_nucleus_equals_the_sorted_prefix(vocab, temperature, top_p):
    torch.manual_seed(vocab)
    probs = torch.softmax(torch.randn(6, vocab) * 3 / temperature, -1)  # (6, V), no ties
    kept = probs.view(torch.int32) >= nucleus_floor(probs, torch.full((6,), top_p))
    assert torch.equal(kept, sorted_nucleus(probs, top_p))


def test_tokens_tied_with_the_last_kept_one_are_kept_and_zero_top_p_keeps_the_top():
    probs = torch.tensor([[0.1, 0.3, 0.3, 0.3], [0.25, 0.25, 0.25, 0.25], [0.0, 0.5, 0.2, 0.3]])
    floor = nucleus_floor(probs, torch.tensor([0.2, 0.3, 0.0]))
    assert (probs.view(torch.int32) >= floor).tolist() == [[False, True, True, True], [True] * 4,
                                                           [False, True, False, False]]


def test_draws_follow_the_renormalised_nucleus_and_never_take_zero_mass_tokens():
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -float("inf")])
    rows, top_p, temperature = 6000, 0.8, 0.9
    probs = torch.softmax(logits / temperature, -1)
    keep = sorted_nucleus(probs[None], top_p)[0]
    expected = torch.where(keep, probs, 0) / probs[keep].sum()
    tokens = draw_tokens(logits.expand(rows, -1), [temperature] * rows, [top_p] * rows,
                         [torch.Generator().manual_seed(i) for i in range(rows)])
    counts = torch.bincount(torch.tensor(tokens), minlength=len(logits)).double() / rows
    assert counts[~keep].sum() == 0  # nothing outside the nucleus, nothing of zero mass
    assert counts.tolist() == pytest.approx(expected.tolist(), abs=0.025)  # about 4 standard deviations


def test_each_rows_draw_depends_on_its_own_generator_alone_and_tiny_temperature_is_greedy():
    torch.manual_seed(0)
    logits = torch.randn(3, 1000)

    def draw(rows, seeds, temperatures=(1.0, 1.0, 1.0)):
        return draw_tokens(logits[rows], [temperatures[r] for r in rows], [0.9] * len(rows),
                           [torch.Generator().manual_seed(s) for s in seeds])

    together = draw([0, 1, 2], [5, 6, 7])
    assert draw([1], [6]) == [together[1]] and draw([2, 0], [7, 5]) == [together[2], together[0]]
    assert draw([0, 1, 2], [5, 6, 7], (1.0, 1e-39, 0.0)) == [together[0], int(logits[1].argmax()),
                                                            int(logits[2].argmax())]
    greedy_generator = torch.Generator().manual_seed(3)
    state = greedy_generator.get_state()
    assert draw_tokens(logits[:1], [0.0], [0.5], [greedy_generator]) == [int(logits[0].argmax())]
    assert torch.equal(greedy_generator.get_state(), state)  # a greedy row draws nothing
