"""Adapters in two tiers: validated float32 weights on CPU, and a fixed number of device slots.

The device tier holds, per wrapped layer, one stacked A (slots, r, in) and one stacked B
transposed (slots, r, out) with the adapter's scaling folded into B and ranks zero-padded to the largest
rank resident so far; a forward indexes these by slot. Device slots are reused least recently
used first, never while pinned or in use by a running batch.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from services.lora.adapter_files import LoraAdapterWeights

log = logging.getLogger(__name__)


class AdapterNotLoaded(KeyError):
    """An adapter key the engine was never given (or was unloaded)."""

    def __str__(self) -> str:
        return f"adapter {self.args[0]!r} is not loaded"


class AdapterPoolFull(RuntimeError):
    """A batch needs more distinct adapters than the device slots that are free to take them."""


@dataclass
class LayerStack:
    a: torch.Tensor  # (slots, r, in)
    b: torch.Tensor  # (slots, r, out): B transposed, scaling folded in; rows of a slot are contiguous


class AdapterPool:
    def __init__(self, layer_shapes: dict[str, tuple[int, int]], *, device, dtype, device_slots: int,
                 cpu_slots: int, reload: Callable[[str, Path], LoraAdapterWeights]):
        if device_slots < 1 or cpu_slots < 1:
            raise ValueError("device_slots and cpu_slots must be at least 1")
        self.layer_shapes = layer_shapes  # layer key -> (in_features, out_features)
        self.device, self.dtype = device, dtype
        self.device_slots, self.cpu_slots = device_slots, cpu_slots
        self.reload = reload  # re-reads an adapter the CPU tier let go of
        self.rank = 0  # padded rank of every stack
        self.writes = 0  # slot writes so far: tensors derived from the stacks are stale when it moves
        self.stacks: dict[str, LayerStack] = {}  # only layers some resident adapter targets
        self.paths: dict[str, Path] = {}  # every loaded key -> its folder
        self.cpu: OrderedDict[str, LoraAdapterWeights] = OrderedDict()  # least recently used first
        self.slot_of: OrderedDict[str, int] = OrderedDict()  # resident key -> slot, LRU first
        self.pinned: set[str] = set()
        self.in_use: dict[str, int] = {}  # key -> running batches using it
        self.counters = {"hits": 0, "misses": 0, "loads": 0, "evictions": 0, "cpu_evictions": 0,
                         "disk_reloads": 0, "load_seconds": 0.0}
        self.lock = threading.RLock()

    # Every public method takes self.lock (an RLock: they call each other); the `_` helpers below
    # them assume the caller holds it. The lock guards bookkeeping only and is never held across
    # a forward pass: the engine's device_lock (taken first, never inside this one) does that.

    # -- CPU tier ---------------------------------------------------------
    def add(self, key: str, weights: LoraAdapterWeights, path: Path) -> None:
        """Register an adapter (replacing one of the same key that no batch uses)."""
        with self.lock:
            if key in self.paths:
                self.remove(key)
            self.paths[key] = Path(path)
            self.cpu[key] = weights
            self._trim_cpu_tier()

    def remove(self, key: str) -> None:
        with self.lock:
            if key not in self.paths:
                raise AdapterNotLoaded(key)
            if self.in_use.get(key):
                raise RuntimeError(f"adapter {key!r} is in use by a running batch")
            self.slot_of.pop(key, None)
            self.cpu.pop(key, None)
            self.pinned.discard(key)
            del self.paths[key]

    def contains(self, key: str) -> bool:
        return key in self.paths

    def _trim_cpu_tier(self) -> None:
        """Let go of the least recently used CPU copies beyond cpu_slots; they stay loaded and are
        re-read from their folder when next needed."""
        while len(self.cpu) > self.cpu_slots:
            key = next(iter(self.cpu))
            del self.cpu[key]
            self.counters["cpu_evictions"] += 1

    def _cpu_weights(self, key: str) -> LoraAdapterWeights:
        if key in self.cpu:
            self.cpu.move_to_end(key)
            return self.cpu[key]
        weights = self.reload(key, self.paths[key])
        self.counters["disk_reloads"] += 1
        self.cpu[key] = weights
        self._trim_cpu_tier()
        return weights

    def ensure_in_memory(self, key: str) -> None:
        """Have the adapter on the device or in the CPU tier, re-reading it from its folder now if
        both let go of it (raises what the read raises: a re-read inside a forward would fail the
        whole batch)."""
        with self.lock:
            if key not in self.slot_of and key not in self.cpu:
                self._cpu_weights(key)

    # -- device tier ------------------------------------------------------
    def pin(self, key: str) -> None:
        """Keep an adapter on the device until unpinned; loads it now."""
        with self.lock:
            self.acquire([key])
            self.pinned.add(key)
            self.release([key])

    def unpin(self, key: str) -> None:
        with self.lock:
            if key not in self.paths:
                raise AdapterNotLoaded(key)
            self.pinned.discard(key)

    def resident(self) -> list[str]:
        with self.lock:
            return list(self.slot_of)

    def acquire(self, keys: list[str]) -> dict[str, int]:
        """Make every key resident and mark it in use; returns key -> slot.

        Checks first that the keys fit, so a refused batch evicts nothing."""
        with self.lock:
            keys = list(dict.fromkeys(keys))
            for key in keys:
                if key not in self.paths:
                    raise AdapterNotLoaded(key)
            missing = [k for k in keys if k not in self.slot_of]
            free = self.device_slots - len(self.slot_of)
            evictable = [k for k in self.slot_of if k not in self.pinned and not self.in_use.get(k) and k not in keys]
            if len(missing) > free + len(evictable):
                raise AdapterPoolFull(
                    f"the batch needs {len(missing)} more adapters on the device; {free} slots are free and "
                    f"{len(evictable)} can be evicted (device_slots={self.device_slots})")
            self.counters["hits"] += len(keys) - len(missing)
            self.counters["misses"] += len(missing)
            for key in missing:
                self._load_to_device(key, evictable)
            for key in keys:
                self.slot_of.move_to_end(key)
                self.in_use[key] = self.in_use.get(key, 0) + 1
            return {key: self.slot_of[key] for key in keys}

    def release(self, keys: list[str]) -> None:
        with self.lock:
            for key in dict.fromkeys(keys):
                self.in_use[key] -= 1
                if not self.in_use[key]:
                    del self.in_use[key]

    # Stacks are made and written in inference mode, whichever mode the caller runs in: a stack made
    # under forward_logits' inference mode could otherwise not be written by a later generate.
    @torch.inference_mode()
    def _load_to_device(self, key: str, evictable: list[str]) -> None:
        started = time.perf_counter()
        taken = set(self.slot_of.values())
        free = [s for s in range(self.device_slots) if s not in taken]
        if free:
            slot = free[0]
        else:
            victim = evictable.pop(0)  # least recently used first: slot_of is in LRU order
            slot = self.slot_of.pop(victim)
            self.counters["evictions"] += 1
            log.debug("evicted adapter %s from device slot %d", victim, slot)
        weights = self._cpu_weights(key)
        self._write_slot(slot, weights)
        self.slot_of[key] = slot
        self.counters["loads"] += 1
        self.counters["load_seconds"] += time.perf_counter() - started

    def _write_slot(self, slot: int, weights: LoraAdapterWeights) -> None:
        self.writes += 1
        if weights.rank > self.rank:
            self._grow_rank(weights.rank)
        for layer in weights.a:
            if layer not in self.stacks:
                in_features, out_features = self.layer_shapes[layer]
                self.stacks[layer] = LayerStack(
                    a=torch.zeros(self.device_slots, self.rank, in_features, dtype=self.dtype, device=self.device),
                    b=torch.zeros(self.device_slots, self.rank, out_features, dtype=self.dtype, device=self.device))
        for layer, stack in self.stacks.items():
            stack.a[slot].zero_()
            stack.b[slot].zero_()
            if layer in weights.a:
                r = weights.rank
                stack.a[slot, :r] = weights.a[layer].to(self.device, self.dtype)
                stack.b[slot, :r] = (weights.b[layer].T * weights.scaling).to(self.device, self.dtype)

    def _grow_rank(self, rank: int) -> None:
        """Zero-pad every stack to a larger rank; padded components contribute nothing."""
        for stack in self.stacks.values():
            pad = rank - self.rank
            stack.a = torch.nn.functional.pad(stack.a, (0, 0, 0, pad))
            stack.b = torch.nn.functional.pad(stack.b, (0, 0, 0, pad))
        self.rank = rank

    def stats(self) -> dict:
        with self.lock:
            return {**self.counters, "resident": len(self.slot_of), "device_slots": self.device_slots,
                    "cpu_resident": len(self.cpu), "loaded": len(self.paths), "pinned": len(self.pinned),
                    "rank": self.rank}
