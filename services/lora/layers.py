"""Wrap a causal LM's target linears once, so every forward adds the batch's LoRA deltas."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from services.lora.adapter_files import SUPPORTED_MODULES
from services.lora.backends import BACKENDS, choose_backend
from services.lora.batch_meta import LoraBatchMeta
from services.lora.pool import AdapterPool


@dataclass
class LoraContext:
    """What every wrapped layer reads during a forward; the engine sets `meta` per batch."""

    pool: AdapterPool
    meta: LoraBatchMeta | None = None
    backend: str | Callable = "auto"  # "auto" dispatches on shape; a name in BACKENDS; or a delta function

    def delta_fn(self, seq: int) -> Callable:
        if callable(self.backend):
            return self.backend
        return choose_backend(self.meta, seq) if self.backend == "auto" else BACKENDS[self.backend]


class LoraLinear(nn.Module):
    """base(x) plus, per row, the composition of that row's adapters for this layer."""

    def __init__(self, base: nn.Linear, layer_key: str, context: LoraContext):
        super().__init__()
        self.base, self.layer_key, self.context = base, layer_key, context

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x (batch, seq, in)
        y = self.base(x)
        meta = self.context.meta
        stack = self.context.pool.stacks.get(self.layer_key)
        if meta is None or stack is None or not meta.has_lora:
            return y
        delta = self.context.delta_fn(x.shape[1])(x.to(stack.a.dtype), stack.a, stack.b, meta, self.layer_key)
        return y + delta.to(y.dtype)


def target_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """"model.layers.3.self_attn.q_proj" -> the linear, for every module PEFT may target."""
    found = {name: module for name, module in model.named_modules()
             if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in SUPPORTED_MODULES
             and name.startswith("model.layers.")}
    if not found:
        raise ValueError("the model has no Llama-family target linears (model.layers.N.*_proj)")
    return found


def linear_shapes(model: nn.Module) -> dict[str, tuple[int, int]]:
    return {name: (linear.in_features, linear.out_features) for name, linear in target_linears(model).items()}


def wrap_model(model: nn.Module, context: LoraContext) -> None:
    """Replace each target linear by a LoraLinear, in place."""
    for name, linear in target_linears(model).items():
        parent_name, attr = name.rsplit(".", 1)
        setattr(model.get_submodule(parent_name), attr, LoraLinear(linear, name, context))
