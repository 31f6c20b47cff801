"""Embedder against plain transformers mean pooling (the oracle), instruction handling, errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModel, AutoTokenizer

from services.retrieval import DEFAULT_INSTRUCTION
from services.retrieval.embedder import Embedder, EmbedderLoadError, packaged_model_path


def mean_pooled(texts: list[str]) -> np.ndarray:
    """all-MiniLM-L6-v2's recipe written directly: masked mean of token states, L2-normalised."""
    tok = AutoTokenizer.from_pretrained(packaged_model_path())
    model = AutoModel.from_pretrained(packaged_model_path()).eval()
    batch = tok(texts, padding=True, truncation=True, max_length=256, return_tensors="pt")
    with torch.no_grad():
        states = model(**batch).last_hidden_state  # (n, tokens, dim)
    mask = batch["attention_mask"].unsqueeze(-1).float()  # (n, tokens, 1)
    pooled = (states * mask).sum(1) / mask.sum(1)  # (n, dim)
    return torch.nn.functional.normalize(pooled, dim=-1).numpy()


def test_encode_matches_mean_pooling_with_the_instruction_prefixed(embedder):
    texts = ["Reverse the word: lamp", "What is 3 plus 4? Please answer quickly, with a number only."]
    out = embedder.encode(texts)
    assert out.shape == (2, embedder.dim) and out.dtype == np.float32 and embedder.dim == 384
    np.testing.assert_allclose(out, mean_pooled([DEFAULT_INSTRUCTION + t for t in texts]), atol=1e-5)


def test_instruction_is_configurable_and_may_be_empty(embedder):
    bare = Embedder(instruction="")
    np.testing.assert_allclose(bare.encode(["hello"]), mean_pooled(["hello"]), atol=1e-5)
    assert not np.allclose(bare.encode(["hello"]), embedder.encode(["hello"]), atol=1e-3)


def test_batching_does_not_change_the_vectors(embedder):
    texts = [f"sentence number {i} about {w}" for i, w in enumerate(["cats", "rivers", "taxes", "music", "rain"])]
    small = Embedder(batch_size=2)
    np.testing.assert_allclose(small.encode(texts), embedder.encode(texts), atol=1e-5)


def test_empty_input_and_bad_arguments(embedder, tmp_path):
    assert embedder.encode([]).shape == (0, 384)
    with pytest.raises(TypeError, match="list of texts"):
        embedder.encode("one string")
    with pytest.raises(EmbedderLoadError, match="no config.json"):
        Embedder(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="batch_size"):
        Embedder(batch_size=0)
