"""A row's composition as ONE LoRA adapter, written as a PEFT folder: how an engine that applies a
single adapter per request (vLLM) serves mixture and fusion exactly.

Semantics (per target layer; A_j (r_j, in), B_j (out, r_j), s_j the adapter's scaling, w_j its weight;
a layer an adapter does not target counts as A_j = 0, B_j = 0):
  mixture: rank sum_j r_j,  A' = [A_1; ...; A_k],  B' = [w_1 s_1 B_1, ..., w_k s_k B_k]
           so B' A' x = sum_j w_j s_j B_j A_j x (PEFT's add_weighted_adapter(combination_type="cat")
           builds the same product);
  fusion:  rank max_j r_j, A' = sum_j w_j A_j,  B' = sum_j w_j s_j B_j  (ranks zero-padded), the
           native engine's fusion (services/lora/backends.py) written out as matrices.
The composite's lora_alpha equals its rank: scaling 1, every s_j is already inside B'.

Composites are content-addressed: the name hashes the mode, the adapter versions (name@version
keys: a new version is a new key, hence a new name) and the weights rounded to a grid, and the
folder is made with those rounded weights, so one name always means the same tensors.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import save_file

from services.composition import Composition
from services.lora.adapter_files import CONFIG_FILE, SAFETENSORS_FILE, SUPPORTED_MODULES, LoraAdapterWeights

log = logging.getLogger(__name__)

# Weights are rounded to multiples of this before hashing and before building: 1/256 moves a weight
# by at most 0.002 (below bfloat16's relative step), and uniform weights (1/k) always land on one name.
DEFAULT_WEIGHT_GRID = 1 / 256


@dataclass(frozen=True)
class CompositeLora:
    """One adapter equal to a composition; scaling 1."""

    rank: int
    a: dict[str, torch.Tensor]  # layer key -> (rank, in)
    b: dict[str, torch.Tensor]  # layer key -> (out, rank)
    target_modules: tuple[str, ...]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.a.values(), *self.b.values()))


def grid_weights(weights, grid: float) -> tuple[float, ...]:
    """Each weight rounded to the nearest multiple of grid."""
    return tuple(round(w / grid) * grid for w in weights)


def composite_rank(composition: Composition, ranks: dict[str, int]) -> int:
    """The rank of the composite of `composition`: sum of ranks (mixture), the largest (fusion), or
    the adapter's own (selection)."""
    rs = [ranks[key] for key in composition.adapters]
    return max(rs) if composition.fuses or len(rs) == 1 else sum(rs)


def build_composite(composition: Composition, adapters: list[LoraAdapterWeights],
                    weights: tuple[float, ...] | None = None) -> CompositeLora:
    """The composite of `adapters` (in the composition's order) under `weights` (default: the
    composition's). float32 on CPU."""
    weights = composition.weights if weights is None else weights
    layers = sorted(set().union(*(adapter.a for adapter in adapters)))
    fuse = composition.fuses
    rank = max(a.rank for a in adapters) if fuse else sum(a.rank for a in adapters)
    a_out, b_out = {}, {}
    for layer in layers:
        in_features = next(ad.a[layer].shape[1] for ad in adapters if layer in ad.a)  # in
        out_features = next(ad.b[layer].shape[0] for ad in adapters if layer in ad.b)  # out
        a_new = torch.zeros(rank, in_features)  # (rank, in)
        b_new = torch.zeros(out_features, rank)  # (out, rank)
        offset = 0
        for adapter, w in zip(adapters, weights):
            cols = slice(0, adapter.rank) if fuse else slice(offset, offset + adapter.rank)
            if layer in adapter.a:
                if fuse:
                    a_new[cols] += w * adapter.a[layer]
                else:
                    a_new[cols] = adapter.a[layer]
                b_new[:, cols] += w * adapter.scaling * adapter.b[layer]
            offset += adapter.rank
        a_out[layer], b_out[layer] = a_new, b_new
    modules = tuple(m for m in SUPPORTED_MODULES if any(m in adapter.target_modules for adapter in adapters))
    return CompositeLora(rank, a_out, b_out, modules)


def write_peft_folder(folder: Path, composite: CompositeLora, base_model: str | None) -> None:
    """adapter_config.json and adapter_model.safetensors in PEFT's layout and tensor names."""
    folder.mkdir(parents=True, exist_ok=True)
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": composite.rank, "lora_alpha": composite.rank,
              "target_modules": list(composite.target_modules), "lora_dropout": 0.0, "bias": "none",
              "base_model_name_or_path": base_model, "use_rslora": False, "use_dora": False,
              "fan_in_fan_out": False, "modules_to_save": None, "rank_pattern": {}, "alpha_pattern": {}}
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=1))
    tensors = {}
    for layer in composite.a:
        tensors[f"base_model.model.{layer}.lora_A.weight"] = composite.a[layer]
        tensors[f"base_model.model.{layer}.lora_B.weight"] = composite.b[layer]
    save_file(tensors, str(folder / SAFETENSORS_FILE))


def composite_name(composition: Composition, grid: float) -> str:
    """The content address of a composition: mode, adapter versions in order, weights on the grid."""
    steps = [round(w / grid) for w in composition.weights]
    blob = json.dumps({"mode": composition.mode.value, "adapters": list(composition.adapters), "steps": steps,
                       "grid": grid}, sort_keys=True)
    return f"{composition.mode.value[:3]}-{hashlib.sha256(blob.encode()).hexdigest()[:24]}"


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.iterdir() if f.is_file())


class CompositeCache:
    """Composite adapter folders under `root`, at most `max_bytes` of them, least recently used
    evicted first (never one a running request holds). Content-addressed, so folders left by an
    earlier process are reused as they are."""

    def __init__(self, root: Path, max_bytes: int, grid: float = DEFAULT_WEIGHT_GRID,
                 base_model: str | None = None):
        if not 0 < grid <= 1:
            raise ValueError(f"weight grid {grid} must be in (0, 1]")
        self.root, self.max_bytes, self.grid, self.base_model = Path(root), max_bytes, grid, base_model
        self.root.mkdir(parents=True, exist_ok=True)
        self.entries: OrderedDict[str, int] = OrderedDict()  # name -> bytes, least recently used first
        for folder in sorted(self.root.iterdir(), key=lambda p: p.stat().st_mtime):
            if folder.is_dir() and (folder / SAFETENSORS_FILE).is_file():
                self.entries[folder.name] = folder_bytes(folder)
            elif folder.is_dir():  # a build cut short by a crash
                shutil.rmtree(folder, ignore_errors=True)
        self.in_use: dict[str, int] = {}
        self.counters = {"composite_hits": 0, "composite_misses": 0, "composite_evictions": 0,
                         "composite_build_seconds": 0.0, "composite_last_build_seconds": 0.0}
        self.lock = threading.Lock()

    def path(self, name: str) -> Path:
        return self.root / name

    def acquire(self, composition: Composition,
                read: Callable[[str], LoraAdapterWeights]) -> tuple[str, Path]:
        """The composite's (name, folder), built now on a miss from `read(key)` of each adapter;
        held until `release(name)`."""
        name = composite_name(composition, self.grid)
        with self.lock:
            hit = name in self.entries and self.path(name).is_dir()
            if hit:
                self.entries.move_to_end(name)
                self.counters["composite_hits"] += 1
            self.in_use[name] = self.in_use.get(name, 0) + 1
        if not hit:
            try:
                self._build(name, composition, read)
            except BaseException:
                self.release(name)
                raise
        return name, self.path(name)

    def _build(self, name: str, composition: Composition, read) -> None:
        started = time.perf_counter()
        composite = build_composite(composition, [read(key) for key in composition.adapters],
                                    grid_weights(composition.weights, self.grid))
        scratch = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=self.root))
        try:
            write_peft_folder(scratch, composite, self.base_model)
            if self.path(name).exists():  # made meanwhile by another process sharing the cache: same content
                shutil.rmtree(scratch)
            else:
                os.replace(scratch, self.path(name))
        except BaseException:
            shutil.rmtree(scratch, ignore_errors=True)
            raise
        seconds = time.perf_counter() - started
        with self.lock:
            self.entries[name] = folder_bytes(self.path(name))
            self.entries.move_to_end(name)
            self.counters["composite_misses"] += 1
            self.counters["composite_build_seconds"] += seconds
            self.counters["composite_last_build_seconds"] = seconds
            self._trim()
        log.info("built composite %s (%s of %d adapters, rank %d) in %.3f s", name, composition.mode.value,
                 len(composition.adapters), composite.rank, seconds)

    def release(self, name: str) -> None:
        with self.lock:
            left = self.in_use.get(name, 0) - 1
            if left > 0:
                self.in_use[name] = left
            else:
                self.in_use.pop(name, None)
            self._trim()

    def _trim(self) -> None:
        """Evict least recently used folders nobody holds until the cache fits (caller holds the lock)."""
        total = sum(self.entries.values())
        for name in list(self.entries):
            if total <= self.max_bytes:
                return
            if name in self.in_use:
                continue
            total -= self.entries.pop(name)
            shutil.rmtree(self.path(name), ignore_errors=True)
            self.counters["composite_evictions"] += 1

    def stats(self) -> dict:
        with self.lock:
            return {**self.counters, "composites_cached": len(self.entries),
                    "composite_cache_bytes": sum(self.entries.values())}
