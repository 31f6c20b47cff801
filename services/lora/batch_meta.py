"""The per-forward description of which adapters each row uses: built once, shared by every layer."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from services.composition import Composition

EMPTY_SLOT = -1  # padding in `slots`: no adapter; its weight is 0


@dataclass
class LoraBatchMeta:
    slots: torch.Tensor  # (batch, k) long: device pool slot per row and position, EMPTY_SLOT = none
    weights: torch.Tensor  # (batch, k) float: 0 where the slot is empty
    fusion: torch.Tensor  # (batch,) bool: rows that average A and B instead of summing outputs
    any_fusion: bool  # fusion.any(), known on the host: every layer asks, and asking the device syncs
    unique_slots: torch.Tensor  # (u,) long: the distinct slots the batch uses
    dense_weights: torch.Tensor  # (batch, u) float: row b's weight on unique_slots[j], 0 if unused
    # Per-layer tensors a backend derives from the pool once and reuses on every decode step;
    # valid because slots in use by a batch are never rewritten.
    layer_cache: dict = field(default_factory=dict)

    @property
    def has_lora(self) -> bool:
        return self.unique_slots.numel() > 0

    def take(self, rows: torch.Tensor) -> "LoraBatchMeta":
        """The metadata of a batch whose row j is this batch's row rows[j] (rows (m,) long, on the
        device): a prompt chunk's tokens packed one per row. any_fusion stays the parent's (a
        superset: asking the device would sync); the per-layer stacks are shared."""
        return LoraBatchMeta(slots=self.slots[rows], weights=self.weights[rows], fusion=self.fusion[rows],
                             any_fusion=self.any_fusion, unique_slots=self.unique_slots,
                             dense_weights=self.dense_weights[rows], layer_cache=self.layer_cache)


def build_batch_meta(rows: list[Composition], slot_of: dict[str, int], *, dtype: torch.dtype,
                     device) -> LoraBatchMeta:
    """The batch's metadata from each row's composition and the pool slot of each adapter key."""
    k = max((len(row.adapters) for row in rows), default=0)
    slots = torch.full((len(rows), k), EMPTY_SLOT, dtype=torch.long)
    weights = torch.zeros((len(rows), k), dtype=dtype)
    for b, row in enumerate(rows):
        slots[b, : len(row.adapters)] = torch.tensor([slot_of[a] for a in row.adapters], dtype=torch.long)
        weights[b, : len(row.weights)] = torch.tensor(row.weights, dtype=dtype)
    unique = torch.unique(slots[slots != EMPTY_SLOT])  # (u,)
    dense = torch.zeros((len(rows), unique.numel()), dtype=dtype)
    for b, row in enumerate(rows):
        for adapter, weight in zip(row.adapters, row.weights):
            dense[b, int(torch.searchsorted(unique, slot_of[adapter]))] = weight
    fuses = [row.fuses for row in rows]
    return LoraBatchMeta(slots=slots.to(device), weights=weights.to(device),
                         fusion=torch.tensor(fuses, dtype=torch.bool).to(device), any_fusion=any(fuses),
                         unique_slots=unique.to(device), dense_weights=dense.to(device))
