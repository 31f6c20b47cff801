"""The embedder in PyTorch with bfloat16 weights. On CPUs with AMX tiles (Sapphire Rapids and
later) oneDNN runs its matrix products there: 3.5x the float32 runtime's speed on batches, for
vectors within a cosine of 0.9999 of it (docs/retrieval.md, "bfloat16 on AMX"). Elsewhere
bfloat16 is emulated and slow, so the product picks this runtime only where the CPU has AMX
(host_runtime.py).

Groups are padded to a multiple of 16 tokens and may hold more padding than the ONNX runtime's:
oneDNN builds a kernel for each new shape, so fewer, larger shapes are cheaper at this speed.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from services.retrieval.batch_encoder import BatchEncoder
from services.retrieval.host_runtime import torch_threads


class Bf16Encoder(BatchEncoder):
    pad_slack = 0.4
    width_multiple = 16

    def __init__(self, model_path: str, max_seq_length: int, threads: int | None, cut: str = "head"):
        import torch
        from transformers import AutoModel

        from services.retrieval.mean_pooled import MeanPooled

        super().__init__(Path(model_path) / "tokenizer.json", max_seq_length, cut)
        self.threads = threads
        self.model = MeanPooled(AutoModel.from_pretrained(model_path, local_files_only=True).eval().to(torch.bfloat16))

    def _run(self, feed: dict[str, np.ndarray]) -> np.ndarray:
        import torch

        with torch_threads(self.threads), torch.inference_mode():
            return self.model(**{k: torch.from_numpy(v) for k, v in feed.items()}).numpy()  # (group, dim)
