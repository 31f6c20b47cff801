"""The per-forward description of which adapters each row uses: built once, shared by every layer."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from services.schemas import CompositionMode

EMPTY_SLOT = -1  # padding in `slots`: no adapter; its weight is 0


class CompositionError(ValueError):
    """A row's adapters, weights or mode cannot be composed."""


@dataclass
class RowComposition:
    """One row as the caller describes it: pool slots best first, one weight each, a mode."""

    slots: list[int]
    weights: list[float]
    mode: CompositionMode


@dataclass
class LoraBatchMeta:
    slots: torch.Tensor  # (batch, k) long: device pool slot per row and position, EMPTY_SLOT = none
    weights: torch.Tensor  # (batch, k) float: 0 where the slot is empty
    fusion: torch.Tensor  # (batch,) bool: rows that average A and B instead of summing outputs
    unique_slots: torch.Tensor  # (u,) long: the distinct slots the batch uses
    dense_weights: torch.Tensor  # (batch, u) float: row b's weight on unique_slots[j], 0 if unused
    # Per-layer tensors a backend derives from the pool once and reuses on every decode step;
    # valid because slots in use by a batch are never rewritten.
    layer_cache: dict = field(default_factory=dict)

    @property
    def has_lora(self) -> bool:
        return self.unique_slots.numel() > 0

    @property
    def has_fusion(self) -> bool:
        return bool(self.fusion.any())


def effective_row(row: RowComposition) -> tuple[list[int], list[float]]:
    """The slots and weights a mode really applies: selection keeps the top-1 at weight 1."""
    if len(row.slots) != len(row.weights):
        raise CompositionError(f"{len(row.slots)} adapters but {len(row.weights)} weights")
    if row.mode is CompositionMode.none or not row.slots:
        return [], []
    if row.mode is CompositionMode.selection:
        return row.slots[:1], [1.0]
    if len(set(row.slots)) != len(row.slots):
        raise CompositionError("an adapter appears twice in one row")
    return list(row.slots), [float(w) for w in row.weights]


def build_batch_meta(rows: list[RowComposition], *, dtype: torch.dtype, device) -> LoraBatchMeta:
    effective = [effective_row(row) for row in rows]
    k = max((len(slots) for slots, _ in effective), default=0)
    slots = torch.full((len(rows), k), EMPTY_SLOT, dtype=torch.long)
    weights = torch.zeros((len(rows), k), dtype=dtype)
    for b, (row_slots, row_weights) in enumerate(effective):
        slots[b, : len(row_slots)] = torch.tensor(row_slots, dtype=torch.long)
        weights[b, : len(row_weights)] = torch.tensor(row_weights, dtype=dtype)
    unique = torch.unique(slots[slots != EMPTY_SLOT])  # (u,)
    dense = torch.zeros((len(rows), unique.numel()), dtype=dtype)
    for b, (row_slots, row_weights) in enumerate(effective):
        for slot, weight in zip(row_slots, row_weights):
            dense[b, int(torch.searchsorted(unique, slot))] = weight
    fusion = torch.tensor([row.mode is CompositionMode.fusion for row in rows], dtype=torch.bool)
    return LoraBatchMeta(slots=slots.to(device), weights=weights.to(device), fusion=fusion.to(device),
                         unique_slots=unique.to(device), dense_weights=dense.to(device))
