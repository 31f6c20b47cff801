"""Keys and values of prompt prefixes already read, reused by later rows with the same composition.

Chat traffic repeats its prefixes: the template's system turn is more than half of a short chat
prompt's tokens. A row whose prompt starts with blocks another row of the same composition has
read copies their keys and values into its slot instead of computing them again. The keys depend
on the adapters (LoRA may target k_proj and v_proj), so the composition (mode, adapter versions,
weights) is part of every key. Blocks form a chain: a block's key is its parent's key plus its
own BLOCK tokens, so a lookup hashes each prompt token once. Least recently used blocks go first
when the cache would exceed its byte budget.
"""
from __future__ import annotations

from collections import OrderedDict

import torch

from services.composition import Composition
from services.lora.kv_slots import SlotCache

BLOCK = 8  # tokens per cached block


def composition_key(composition: Composition) -> tuple:
    return composition.mode.value, tuple(composition.adapters), tuple(composition.weights)


class PrefixCache:
    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        # block key -> (k, v), each (layers, kv_heads, BLOCK, head_dim)
        self.blocks: OrderedDict[tuple, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self.bytes = 0
        self.counters = {"hit_tokens": 0, "miss_tokens": 0}

    def _chain(self, composition: Composition, prompt: list[int]):
        """(block index, block key) for every whole block that leaves at least the last prompt token
        to compute (its logits give the first sampled token)."""
        key: tuple = composition_key(composition)
        for j in range((len(prompt) - 1) // BLOCK):
            key = (key, tuple(prompt[j * BLOCK:(j + 1) * BLOCK]))
            yield j, key

    def restore(self, composition: Composition, prompt: list[int], cache: SlotCache, slot: int) -> int:
        """Copy the longest cached prefix of `prompt` into `slot`; returns its length in tokens."""
        found = 0
        for j, key in self._chain(composition, prompt):
            block = self.blocks.get(key)
            if block is None:
                break
            self.blocks.move_to_end(key)
            cache.reserve(slot + 1, (j + 1) * BLOCK)
            for layer in range(cache.layers):
                cache.k[layer][slot, :, j * BLOCK:(j + 1) * BLOCK] = block[0][layer]
                cache.v[layer][slot, :, j * BLOCK:(j + 1) * BLOCK] = block[1][layer]
            found = (j + 1) * BLOCK
        self.counters["hit_tokens"] += found
        self.counters["miss_tokens"] += len(prompt) - found
        return found

    def store(self, composition: Composition, prompt: list[int], cache: SlotCache, slot: int) -> None:
        """Keep the blocks of a prompt that `slot` has just read."""
        if self.max_bytes <= 0:
            return
        for j, key in self._chain(composition, prompt):
            if key in self.blocks:
                self.blocks.move_to_end(key)
                continue
            span = slice(j * BLOCK, (j + 1) * BLOCK)
            k = torch.stack([cache.k[layer][slot, :, span] for layer in range(cache.layers)])
            v = torch.stack([cache.v[layer][slot, :, span] for layer in range(cache.layers)])
            self.blocks[key] = (k, v)
            self.bytes += 2 * k.numel() * k.element_size()
        while self.bytes > self.max_bytes and self.blocks:
            k, v = self.blocks.popitem(last=False)[1]
            self.bytes -= 2 * k.numel() * k.element_size()

    def clear(self) -> None:
        self.blocks.clear()
        self.bytes = 0
