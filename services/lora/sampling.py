"""Batched random sampling for one step's rows: temperature, nucleus (top-p), and one draw per row
from the row's own seeded generator, with one host transfer for the whole batch.

Nucleus sampling keeps the most probable tokens whose mass reaches top_p. Sorting the vocabulary
to find them cost 4.8 ms a row at 49k tokens on one CPU core (and multinomial 1.3 ms more), which
made a step of 45 sampled rows take 0.27 s. Here, non-negative float32 values order as their bit
patterns, so a histogram of the probabilities' top 16 bits, weighted by probability, finds the
bucket in which the mass reaches top_p, and only that bucket's tokens (a few hundred at most in
practice) are ordered; the draw inverts the kept mass's running sum with one uniform number.
"""
from __future__ import annotations

import torch

# A temperature below this is greedy: logits / T must stay finite (an infinite one makes the softmax
# NaN), and at 1e-20 a token beats one whose logit is lower by a float32 step (1e-7 at least) by a
# factor of exp(1e13), so sampling would be greedy anyway (bar exact ties).
GREEDY_BELOW = 1e-20
TINY = torch.finfo(torch.float32).tiny
LOW_BITS = 16
LOW_MASK = (1 << LOW_BITS) - 1
BUCKETS = (0x3F800000 >> LOW_BITS) + 1  # bit patterns of float32 values in [0, 1], by their top 16 bits


def nucleus_floor(probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """The least probable token each row keeps, as a float32 bit pattern: a row keeps the tokens
    whose bits are >= it, the smallest set of most probable tokens whose mass reaches top_p (with
    every token as probable as the last one kept). probs (R, V) float32 rows summing to 1;
    top_p (R,) in (0, 1]. Returns (R, 1) int32."""
    rows = probs.shape[0]
    bits = probs.view(torch.int32)  # (R, V), in the same order as probs
    offsets = torch.arange(rows, device=probs.device, dtype=torch.int32)[:, None] * BUCKETS  # (R, 1)
    bucket = (bits >> LOW_BITS).add_(offsets)  # (R, V): the row's bucket, numbered across rows
    mass = torch.zeros(rows * BUCKETS, device=probs.device).index_add_(
        0, bucket.flatten(), probs.flatten()).view(rows, BUCKETS)  # (R, BUCKETS)
    from_top = mass.flip(-1).cumsum(-1).flip(-1)  # (R, BUCKETS): mass in a bucket and those above it
    above = torch.cat([from_top[:, 1:], torch.zeros_like(from_top[:, :1])], -1)  # (R, BUCKETS): above it
    # a top_p that is 0 in float32 keeps the top token; one above the rounded total keeps every token
    top_p = torch.minimum(top_p.clamp(min=TINY), from_top[:, 0])
    edge = (from_top >= top_p[:, None]).sum(-1) - 1  # (R,) the bucket where the mass reaches top_p
    need = top_p - above.gather(1, edge[:, None])[:, 0]  # (R,) > 0: still wanted from the edge bucket
    # (N,) the tokens of each row's edge bucket, ordered by row, then most probable first
    row, col = (bucket == edge.to(torch.int32)[:, None] + offsets).nonzero(as_tuple=True)
    low = (bits[row, col] & LOW_MASK).long()
    order = torch.argsort(row << LOW_BITS | (LOW_MASK - low))
    row, col, low = row[order], col[order], low[order]
    p = probs[row, col].double()  # (N,)
    before = p.cumsum(0) - p  # (N,) mass ahead of each token, counted from the first row's
    counts = torch.bincount(row, minlength=rows)
    row_start = (counts.cumsum(0) - counts)[row]  # (N,) index of its row's first token
    kept = before - before[row_start] < need[row]  # the first of a row is always kept
    floor_low = torch.full((rows,), LOW_MASK + 1, device=probs.device, dtype=torch.long)
    floor_low.scatter_reduce_(0, row, torch.where(kept, low, LOW_MASK + 1), "amin")
    return ((edge.long() << LOW_BITS) | floor_low).to(torch.int32)[:, None]


def draw_tokens(logits: torch.Tensor, temperatures: list[float], top_ps: list[float],
                generators: list[torch.Generator]) -> list[int]:
    """One token per row. logits (R, V) as each row's sampler shaped them; a temperature below
    GREEDY_BELOW is greedy (the argmax, no softmax); otherwise softmax(logits / T), cut to the
    nucleus where top_p < 1, and one uniform number from the row's generator picks the token (a
    row's draw does not depend on the other rows)."""
    logits = logits.float()
    drawn = [i for i, t in enumerate(temperatures) if t >= GREEDY_BELOW]
    if len(drawn) == len(temperatures):
        return _draw(logits, temperatures, top_ps, generators).tolist()
    tokens = logits.argmax(-1)  # (R,): the greedy rows' tokens
    if drawn:
        tokens[drawn] = _draw(logits[drawn], [temperatures[i] for i in drawn], [top_ps[i] for i in drawn],
                              [generators[i] for i in drawn])
    return tokens.tolist()


def _draw(logits: torch.Tensor, temperatures: list[float], top_ps: list[float],
          generators: list[torch.Generator]) -> torch.Tensor:
    """draw_tokens for rows that all sample: tokens (R,) from logits (R, V) float32."""
    device = logits.device
    probs = torch.softmax(logits / torch.tensor(temperatures, device=device)[:, None], dim=-1)  # (R, V)
    cut = [i for i, p in enumerate(top_ps) if p < 1]
    if cut:
        part = probs if len(cut) == len(top_ps) else probs[cut]  # (C, V)
        floor = nucleus_floor(part, torch.tensor([top_ps[i] for i in cut], device=device))  # (C, 1)
        part.masked_fill_(part.view(torch.int32) < floor, 0.0)
        if part is not probs:
            probs[cut] = part
    cdf = probs.cumsum(-1)  # (R, V)
    total = cdf[:, -1:].contiguous()  # (R, 1)
    uniform = torch.cat([torch.rand(1, generator=g, device=device) for g in generators])[:, None]  # (R, 1)
    target = uniform * total
    # the first token whose running mass exceeds the target; a target rounded up to the total
    # takes the last token with mass (tokens of zero mass are never drawn)
    token = torch.where(target < total, torch.searchsorted(cdf, target, right=True),
                        torch.searchsorted(cdf, total))  # (R, 1)
    return token[:, 0]
