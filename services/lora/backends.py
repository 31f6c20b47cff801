"""LoRA delta of one target linear for a heterogeneous batch: a plain-torch oracle and two fast paths.

Every backend computes, for row b with adapters (slot_j, w_j) and x of shape (seq, in),
with A_j (r, in) and B_j (out, r) already multiplied by the adapter's scaling (the pool stores
B_j transposed, as b_stack (slots, r, out)):
  mixture/selection: delta = sum_j w_j B_j A_j x
  fusion:            delta = (sum_j w_j B_j)(sum_j w_j A_j) x
Fusion is computed in rank space as sum_i w_i B_i (sum_j w_j A_j x), which is the same product
without materialising the averaged matrices. Ranks are zero-padded to the pool's rank, so adapters
of different ranks fuse by their leading rank components.
"""
from __future__ import annotations

import torch

from services.lora.batch_meta import EMPTY_SLOT, LoraBatchMeta

# A gathered float costs about this many multiply-adds (a copy is memory-bound, a GEMM is not);
# set from cluster/bench/composition.py on CPU.
GATHER_COPY_COST = 24.0


def compose_rank_space(xa: torch.Tensor, weights: torch.Tensor, meta: LoraBatchMeta) -> torch.Tensor:
    """Apply each row's weights to per-adapter rank activations.

    Semantics: xa (batch, seq, j, r) holds A_j x; returns h with h_j = w_j A_j x for mixture
    rows and h_j = w_j sum_i w_i A_i x for fusion rows, so that delta = sum_j B_j h_j.
    weights (batch, j); meta.fusion (batch,) bool marks the fusion rows."""
    h = xa * weights[:, None, :, None]  # (batch, seq, j, r)
    if not meta.any_fusion:
        return h
    fused = h.sum(dim=2, keepdim=True) * weights[:, None, :, None]  # (batch, seq, j, r)
    return torch.where(meta.fusion[:, None, None, None], fused, h)


def reference_delta(x, a_stack, b_stack, meta: LoraBatchMeta, layer_key: str) -> torch.Tensor:
    """Semantics: the module docstring, row by row with explicit matrices. The oracle; slow."""
    rows = []
    for b in range(x.shape[0]):
        pairs = [(int(s), meta.weights[b, j]) for j, s in enumerate(meta.slots[b]) if int(s) != EMPTY_SLOT]
        if not pairs:
            delta = torch.zeros(x.shape[1], b_stack.shape[2], dtype=x.dtype, device=x.device)  # (seq, out)
        elif bool(meta.fusion[b]):
            a_avg = sum(w * a_stack[s] for s, w in pairs)  # (r, in)
            b_avg = sum(w * b_stack[s].T for s, w in pairs)  # (out, r)
            delta = x[b] @ a_avg.T @ b_avg.T
        else:
            delta = sum(w * (x[b] @ a_stack[s].T @ b_stack[s]) for s, w in pairs)
        rows.append(delta)
    return torch.stack(rows)


def gather_delta(x, a_stack, b_stack, meta: LoraBatchMeta, layer_key: str) -> torch.Tensor:
    """Semantics: the module docstring. Gathers each row's k adapters: cost grows with k, not with
    the adapters in the batch; the gather copies batch*k*r*(in+out) numbers per call."""
    batch, seq, _ = x.shape
    k, r = meta.slots.shape[1], a_stack.shape[1]
    index = meta.slots.clamp(min=0)  # (batch, k); empty slots carry weight 0
    a_rows = a_stack[index].view(batch, k * r, -1)  # (batch, k*r, in)
    b_rows = b_stack[index].view(batch, k * r, -1)  # (batch, k*r, out)
    xa = torch.bmm(x, a_rows.transpose(1, 2)).view(batch, seq, k, r)  # (batch, seq, k, r)
    h = compose_rank_space(xa, meta.weights, meta)
    return torch.bmm(h.view(batch, seq, k * r), b_rows)  # (batch, seq, out)


def shrink_expand_delta(x, a_stack, b_stack, meta: LoraBatchMeta, layer_key: str) -> torch.Tensor:
    """Semantics: the module docstring. One GEMM against the stacked A of the batch's u distinct
    adapters (shrink), per-row weights in rank space, one GEMM against the stacked B (expand);
    cost grows with u, but nothing is copied per row and the stacks are reused across decode steps."""
    stacks = meta.layer_cache.get(layer_key)
    if stacks is None:
        u, r = meta.unique_slots.numel(), a_stack.shape[1]
        a_cat = a_stack[meta.unique_slots].view(u * r, -1)  # (u*r, in)
        b_cat = b_stack[meta.unique_slots].view(u * r, -1)  # (u*r, out)
        stacks = meta.layer_cache[layer_key] = (a_cat, b_cat)
    a_cat, b_cat = stacks
    batch, seq, _ = x.shape
    r = a_stack.shape[1]
    xa = (x @ a_cat.T).view(batch, seq, -1, r)  # (batch, seq, u, r)
    h = compose_rank_space(xa, meta.dense_weights, meta)
    return h.reshape(batch, seq, -1) @ b_cat  # (batch, seq, out)


def choose_backend(meta: LoraBatchMeta, seq: int):
    """The cheaper fast path for this shape, by counting multiply-adds and gathered numbers."""
    batch, k = meta.slots.shape
    u = meta.unique_slots.numel()
    gather_cost = batch * k * (GATHER_COPY_COST + seq)
    shrink_expand_cost = batch * seq * u
    return shrink_expand_delta if shrink_expand_cost <= gather_cost else gather_delta


BACKENDS = {"reference": reference_delta, "gather": gather_delta, "shrink_expand": shrink_expand_delta}
