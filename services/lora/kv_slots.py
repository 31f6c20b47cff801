"""Preallocated per-row KV memory for continuous batching.

Every running sequence owns one row slot of every layer's K and V tensors; its token at position
p lives at index p of that slot. Rows join and leave between steps without touching the others:
a finished row's slot is refilled by moving the last row into it, so the running rows always fill
slots [0, n) and a decode step reads one contiguous view. Capacity grows by doubling (rows or
length), so a burst costs a few copies, not one per token.
"""
from __future__ import annotations

import torch


class SlotCache:
    def __init__(self, layers: int, kv_heads: int, head_dim: int, *, dtype: torch.dtype, device,
                 rows: int = 4, length: int = 128):
        self.layers, self.kv_heads, self.head_dim = layers, kv_heads, head_dim
        self.dtype, self.device = dtype, device
        self.k: list[torch.Tensor] = []  # per layer (rows, kv_heads, length, head_dim)
        self.v: list[torch.Tensor] = []
        self._allocate(rows, length)

    @property
    def rows(self) -> int:
        return self.k[0].shape[0]

    @property
    def length(self) -> int:
        return self.k[0].shape[2]

    def _allocate(self, rows: int, length: int) -> None:
        shape = (rows, self.kv_heads, length, self.head_dim)
        new_k = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(self.layers)]
        new_v = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(self.layers)]
        for old, new in zip(self.k + self.v, new_k + new_v):
            r, _, n, _ = old.shape
            new[:r, :, :n] = old
        self.k, self.v = new_k, new_v

    def reserve(self, rows: int, length: int) -> None:
        """At least `rows` slots of at least `length` positions (contents kept)."""
        if rows <= self.rows and length <= self.length:
            return
        grow = lambda have, need: have if need <= have else max(need, 2 * have)  # noqa: E731
        self._allocate(grow(self.rows, rows), grow(self.length, length))

    def move(self, src: int, dst: int, length: int) -> None:
        """Copy the first `length` positions of slot src into slot dst."""
        for tensor in self.k + self.v:
            tensor[dst, :, :length] = tensor[src, :, :length]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)
