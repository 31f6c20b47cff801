"""A transformer's token states mean-pooled over the attention mask and L2-normalised, as one
module: the graph the ONNX export traces and the model the bfloat16 runtime runs."""
from __future__ import annotations

import torch


class MeanPooled(torch.nn.Module):
    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, token_type_ids):
        # pooled in float32 whatever the model's dtype: a bfloat16 sum over 128 tokens keeps 3 digits
        states = self.model(input_ids=input_ids, attention_mask=attention_mask,
                            token_type_ids=token_type_ids).last_hidden_state.float()  # (n, tokens, dim)
        mask = attention_mask.unsqueeze(-1).to(states.dtype)  # (n, tokens, 1)
        pooled = (states * mask).sum(1) / mask.sum(1).clamp(min=1e-9)  # (n, dim)
        return torch.nn.functional.normalize(pooled, dim=-1)
