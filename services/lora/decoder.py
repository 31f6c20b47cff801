"""The base model's forward over a SlotCache: ragged rows, per-row positions, grouped attention.

Transformers' cache keeps one shape for the whole batch (left padding, every row the same
length), which rules out rows joining and leaving between steps. This forward runs the model's
own modules (embeddings, norms, rotary embedding, the LoRA-wrapped projections, the MLP) but owns
the attention: each row writes its new keys and values at its own positions of its own slot and
attends to its own prefix, so rows of different lengths share one step with no padding in the
cache and no host sync.

Attention is two batched matmuls with the query heads grouped over their shared key head (no
copy of K and V per query head) and a float32 softmax; keys are written with index_put_. On CPU
the cache is float32 whatever the model's dtype: a bfloat16 batched matmul copies a strided
operand (the rows' prefixes, a slice of each slot) into a contiguous one first, which cost more
than the whole float32 product. `python -m cluster.bench.decode_ops` measures each choice against
its alternatives (scaled_dot_product_attention with a mask, scatter_, a bfloat16 cache).
"""
from __future__ import annotations

import torch
from torch import nn
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
        # (the values a bfloat16 model writes are exact in float32: only the sums gain precision)
        self.cache_dtype = torch.float32 if self.device.type == "cpu" else self.dtype

    def new_cache(self, rows: int = 4, length: int = 128) -> SlotCache:
        return SlotCache(len(self.model.model.layers), self.kv_heads, self.head_dim, dtype=self.cache_dtype,
                         device=self.device, rows=rows, length=length)

    def forward(self, cache: SlotCache, tokens: torch.Tensor, slots: list[int], starts: torch.Tensor,
                span: int) -> torch.Tensor:
        """Final hidden states (n, c, hidden) for tokens (n, c) of the rows in cache slots `slots`
        (ascending), row b's tokens at positions starts[b] .. starts[b] + c - 1 (starts (n,) long,
        on the device). `span` = max(starts) + c, the positions any row reads (a host int, so no
        sync). Rows with fewer real tokens are right-padded: the padding writes keys past the
        row's length, which its next tokens overwrite before anyone reads them. Contiguous slots
        attend through a view of the cache; scattered ones (a prompt chunk's rows after others
        left) gather their prefixes, a copy worth making for prompt chunks, not for a decode step."""
        n, c = tokens.shape
        cache.reserve(slots[-1] + 1, span)
        contiguous = slots[-1] - slots[0] == n - 1
        rows_at = slice(slots[0], slots[-1] + 1) if contiguous else torch.tensor(slots, device=self.device)
        positions = starts[:, None] + torch.arange(c, device=self.device)  # (n, c)
        keys_at = torch.arange(span, device=self.device)
        groups = self.heads // self.kv_heads
        allowed = keys_at[None, None, :] <= positions[:, :, None]  # (n, c, span): own prefix only
        blocked = ~allowed[:, None, None].expand(n, 1, groups, c, span).reshape(n, 1, groups * c, span)
        rows = torch.tensor(slots, device=self.device)[:, None, None]  # (n, 1, 1)
        kv_heads = torch.arange(self.kv_heads, device=self.device)[None, :, None]  # (1, kv, 1)
        write_at = (rows, kv_heads, positions[:, None, :])  # index (n, kv, c) into a cache tensor
        inner = self.model.model
        hidden = inner.embed_tokens(tokens)  # (n, c, hidden)
        cos, sin = inner.rotary_emb(hidden, positions)  # (n, c, head_dim) each
        for i, layer in enumerate(inner.layers):
            attn = layer.self_attn
            x = layer.input_layernorm(hidden)
            q = attn.q_proj(x).view(n, c, self.heads, self.head_dim).transpose(1, 2)  # (n, heads, c, d)
            k = attn.k_proj(x).view(n, c, self.kv_heads, self.head_dim).transpose(1, 2)  # (n, kv, c, d)
            v = attn.v_proj(x).view(n, c, self.kv_heads, self.head_dim).transpose(1, 2)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            cache.k[i].index_put_(write_at, k.to(cache.dtype))
            cache.v[i].index_put_(write_at, v.to(cache.dtype))
            keys, values = cache.k[i][rows_at, :, :span], cache.v[i][rows_at, :, :span]  # (n, kv, span, d)
            # heads h*groups+g share key head h
            grouped = q.reshape(n, self.kv_heads, groups * c, self.head_dim).to(cache.dtype)
            scores = (grouped @ keys.transpose(-1, -2)).float() * attn.scaling  # (n, kv, groups*c, span)
            weights = torch.softmax(scores.masked_fill_(blocked, float("-inf")), dim=-1).to(values.dtype)
            out = (weights @ values).to(hidden.dtype).view(n, self.heads, c, self.head_dim)  # (n, heads, c, d)
            hidden = hidden + attn.o_proj(out.transpose(1, 2).reshape(n, c, -1))
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        return inner.norm(hidden)
