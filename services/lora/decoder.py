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
                span: int, real: torch.Tensor | None = None) -> torch.Tensor:
        """Final hidden states (n, c, hidden) for tokens (n, c) of the rows in cache slots `slots`
        (ascending), row b's tokens at positions starts[b] .. starts[b] + c - 1 (starts (n,) long,
        on the device). `span` = max(starts) + c, the positions any row reads (a host int, so no
        sync). Contiguous slots attend through a view of the cache; scattered ones (a prompt
        chunk's rows after others left) gather their prefixes, a copy worth making for prompt
        chunks, not for a decode step.

        real: None when every token is real; else the flat indices (t,) into (n * c) of the real
        ones (real_positions) when rows are right-padded. Then only those t tokens go through the
        model's layers, packed one per row (the LoRA metadata must be the matching
        LoraBatchMeta.take), padding writes no keys, and its outputs are zeros."""
        n, c = tokens.shape
        cache.reserve(slots[-1] + 1, span)
        contiguous = slots[-1] - slots[0] == n - 1
        rows_at = slice(slots[0], slots[-1] + 1) if contiguous else torch.tensor(slots, device=self.device)
        positions = starts[:, None] + torch.arange(c, device=self.device)  # (n, c)
        keys_at = torch.arange(span, device=self.device)
        groups = self.heads // self.kv_heads
        allowed = keys_at[None, None, :] <= positions[:, :, None]  # (n, c, span): own prefix only
        blocked = ~allowed[:, None, None].expand(n, 1, groups, c, span).reshape(n, 1, groups * c, span)
        slot_of = torch.tensor(slots, device=self.device)[:, None].expand(n, c)  # (n, c)
        kv_heads = torch.arange(self.kv_heads, device=self.device)[None, :, None]  # (1, kv, 1)
        if real is None:  # the layers see (n, c, hidden)
            ids, at, token_slot, m, s = tokens, positions, slot_of, n, c
        else:  # the layers see (t, 1, hidden): one real token per row
            ids, at, token_slot = (t.reshape(-1)[real][:, None] for t in (tokens, positions, slot_of))
            m, s = real.numel(), 1
        write_at = (token_slot[:, None, :], kv_heads, at[:, None, :])  # index (m, kv, s) into a cache tensor
        inner = self.model.model
        hidden = inner.embed_tokens(ids)  # (m, s, hidden)
        cos, sin = inner.rotary_emb(hidden, at)  # (m, s, head_dim) each
        for i, layer in enumerate(inner.layers):
            attn = layer.self_attn
            x = layer.input_layernorm(hidden)
            q = attn.q_proj(x).view(m, s, self.heads, self.head_dim).transpose(1, 2)  # (m, heads, s, d)
            k = attn.k_proj(x).view(m, s, self.kv_heads, self.head_dim).transpose(1, 2)  # (m, kv, s, d)
            v = attn.v_proj(x).view(m, s, self.kv_heads, self.head_dim).transpose(1, 2)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            cache.k[i].index_put_(write_at, k.to(cache.dtype))
            cache.v[i].index_put_(write_at, v.to(cache.dtype))
            if real is not None:  # back to rows for attention: (n, heads, c, d), padding zero
                q = self._unpack(q[:, :, 0], real, n, c).transpose(1, 2)
            keys, values = cache.k[i][rows_at, :, :span], cache.v[i][rows_at, :, :span]  # (n, kv, span, d)
            # heads h*groups+g share key head h
            grouped = q.reshape(n, self.kv_heads, groups * c, self.head_dim).to(cache.dtype)
            scores = (grouped @ keys.transpose(-1, -2)).float() * attn.scaling  # (n, kv, groups*c, span)
            weights = torch.softmax(scores.masked_fill_(blocked, float("-inf")), dim=-1).to(values.dtype)
            out = (weights @ values).to(hidden.dtype).view(n, self.heads, c, self.head_dim)  # (n, heads, c, d)
            out = out.transpose(1, 2).reshape(n, c, -1)  # (n, c, heads * d)
            if real is not None:
                out = out.reshape(n * c, -1)[real][:, None]  # (t, 1, heads * d)
            hidden = hidden + attn.o_proj(out)
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        hidden = inner.norm(hidden)
        return hidden if real is None else self._unpack(hidden[:, 0], real, n, c)

    @staticmethod
    def _unpack(packed: torch.Tensor, real: torch.Tensor, n: int, c: int) -> torch.Tensor:
        """packed (t, ...) real tokens -> (n, c, ...) rows, zeros at the padding."""
        rows = packed.new_zeros((n * c, *packed.shape[1:]))
        rows[real] = packed
        return rows.view(n, c, *packed.shape[1:])


def real_positions(lengths: list[int], width: int, device) -> torch.Tensor | None:
    """Flat indices (t,) into (len(lengths) * width) of each row's first lengths[b] positions;
    None when no row is padded."""
    if sum(lengths) == len(lengths) * width:
        return None
    mask = torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]  # (n, width)
    return mask.reshape(-1).nonzero().squeeze(1).to(device)
