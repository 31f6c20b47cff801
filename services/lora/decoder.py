"""The base model's forward over a SlotCache: ragged rows, per-row positions, PyTorch SDPA.

Transformers' cache keeps one shape for the whole batch (left padding, every row the same
length), which rules out rows joining and leaving between steps. This forward runs the model's
own modules (embeddings, norms, rotary embedding, the LoRA-wrapped projections, the MLP) but owns
the attention: each row writes its new keys and values at its own positions of its own slot and
attends to its own prefix, so rows of different lengths share one step with no padding in the
cache and no host sync.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from services.lora.kv_slots import SlotCache

# Families whose decoder layer is exactly: norm, q/k/v projections (biases allowed), rotary, full
# causal attention, o projection, residual, norm, gated MLP, residual.
SUPPORTED_MODEL_TYPES = {"llama", "mistral", "qwen2"}


class SlotDecoder:
    def __init__(self, model: nn.Module):
        config = model.config
        if config.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"model type {config.model_type!r} is not supported; one of {sorted(SUPPORTED_MODEL_TYPES)}")
        if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
            raise ValueError("sliding-window attention is not supported")
        self.model = model
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        param = next(model.parameters())
        self.dtype, self.device = param.dtype, param.device

    def new_cache(self, rows: int = 4, length: int = 128) -> SlotCache:
        return SlotCache(len(self.model.model.layers), self.kv_heads, self.head_dim, dtype=self.dtype,
                         device=self.device, rows=rows, length=length)

    def forward(self, cache: SlotCache, tokens: torch.Tensor, lo: int, starts: torch.Tensor,
                span: int) -> torch.Tensor:
        """Final hidden states (n, c, hidden) for tokens (n, c) of the rows in cache slots
        [lo, lo + n), row b's tokens at positions starts[b] .. starts[b] + c - 1 (starts (n,) long,
        on the device). `span` = max(starts) + c, the positions any row reads (a host int, so no
        sync). Rows with fewer real tokens are right-padded: the padding writes keys past the
        row's length, which its next tokens overwrite before anyone reads them."""
        n, c = tokens.shape
        cache.reserve(lo + n, span)
        offsets = torch.arange(c, device=self.device)
        positions = starts[:, None] + offsets  # (n, c)
        keys_at = torch.arange(span, device=self.device)
        allowed = (keys_at[None, None, :] <= positions[:, :, None])[:, None]  # (n, 1, c, span): own prefix only
        inner = self.model.model
        hidden = inner.embed_tokens(tokens)  # (n, c, hidden)
        cos, sin = inner.rotary_emb(hidden, positions)  # (n, c, head_dim) each
        write_at = positions[:, None, :, None].expand(n, self.kv_heads, c, self.head_dim)
        for i, layer in enumerate(inner.layers):
            attn = layer.self_attn
            x = layer.input_layernorm(hidden)
            q = attn.q_proj(x).view(n, c, self.heads, self.head_dim).transpose(1, 2)  # (n, heads, c, d)
            k = attn.k_proj(x).view(n, c, self.kv_heads, self.head_dim).transpose(1, 2)  # (n, kv, c, d)
            v = attn.v_proj(x).view(n, c, self.kv_heads, self.head_dim).transpose(1, 2)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            keys, values = cache.k[i][lo:lo + n], cache.v[i][lo:lo + n]  # (n, kv, length, d) views
            keys.scatter_(2, write_at, k)
            values.scatter_(2, write_at, v)
            out = F.scaled_dot_product_attention(q, keys[:, :, :span], values[:, :, :span], attn_mask=allowed,
                                                 scale=attn.scaling, enable_gqa=self.heads != self.kv_heads)
            hidden = hidden + attn.o_proj(out.transpose(1, 2).reshape(n, c, -1))
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        return inner.norm(hidden)
