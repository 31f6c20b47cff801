"""The base model's linears through oneDNN with each weight reordered once into its blocked layout.

torch's CPU linear hands a plain row-major weight to its BLAS on every call. On this machine's
CPU (AMD EPYC, AVX-512) that BLAS is slow in float32, and in bfloat16 the call re-lays the weight
out for oneDNN each time. Packing once made the float32 LM head 2.4x and the MLP projections
1.2-1.5x faster, the bfloat16 LM head 1.4x and its MLP up to 1.5x at decode batches
(`python -m cluster.bench.decode_ops`, docs/engine.md). The packed weight replaces the module's
dense one (no second copy), except for an LM head tied to the input embeddings, whose dense
weight the embedding lookup still reads.
Bitwise equal in bfloat16; float32 sums in another order (differences of about 1e-6 relative).
"""
from __future__ import annotations

import torch
from torch import nn


def can_pack(device: torch.device, dtype: torch.dtype) -> bool:
    if device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    return dtype == torch.float32 or (dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported())


class PackedLinear(nn.Module):
    """y = x W^T + b for x (..., in); same results as the nn.Linear it was made from."""

    def __init__(self, linear: nn.Linear, batch_hint: int):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        with torch.no_grad():  # an opaque oneDNN tensor: (out, in) in a blocked layout chosen for batch_hint rows
            self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), batch_hint)
        self.bias = None if linear.bias is None else linear.bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def pack_linears(model: nn.Module, batch_hint: int) -> int:
    """Replace every nn.Linear of `model` (LoRA wrappers keep theirs as `.base`) by a PackedLinear,
    in place; returns how many. The caller checks can_pack first."""
    found = [(name, module) for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    for name, linear in found:
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, PackedLinear(linear, batch_hint))
    return len(found)
