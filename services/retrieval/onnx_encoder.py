"""A sentence-transformers mean-pooling model run by ONNX Runtime: exported once, cached, optionally int8.

The export traces the PyTorch model with its pooling and L2 normalisation inside the graph, so
the runtime only tokenizes and runs one session. Exports are cached under the data home, keyed
by a hash of the model folder's files, so replicas and tests reuse them; a write goes to a
temporary file renamed into place, so concurrent exporters never expose a half-written model.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np

from services.retrieval.batch_encoder import INPUTS, BatchEncoder

# Bump when the exported graph or the quantization recipe changes: old cache entries are ignored.
EXPORT_VERSION = "1"


class OnnxExportError(ValueError):
    """A model folder the ONNX path cannot serve (not a mean-pooled, normalised BERT-style model)."""


def model_digest(model_path: str) -> str:
    """Content hash of every file of the model folder (a retrained model in the same folder gets a new key)."""
    h = hashlib.sha256(EXPORT_VERSION.encode())
    for f in sorted(p for p in Path(model_path).rglob("*") if p.is_file()):
        h.update(str(f.relative_to(model_path)).encode())
        with f.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:16]


def check_mean_pooled(model_path: str) -> None:
    """The graph hard-codes mean pooling and normalisation: refuse folders that say otherwise."""
    modules = json.loads((Path(model_path) / "modules.json").read_text()) if (Path(model_path) / "modules.json").is_file() else []
    kinds = [m.get("type", "").rsplit(".", 1)[-1] for m in modules]
    pooling = next((m for m in modules if m.get("type", "").endswith("Pooling")), None)
    config = json.loads((Path(model_path) / pooling["path"] / "config.json").read_text()) if pooling else {}
    # sentence-transformers 6 writes pooling_mode: "mean"; older folders pooling_mode_mean_tokens: true
    mean = config.get("pooling_mode") in ("mean", ["mean"]) or (
        "pooling_mode" not in config and config.get("pooling_mode_mean_tokens", False)
        and not any(v for k, v in config.items() if k.startswith("pooling_mode_") and k != "pooling_mode_mean_tokens"))
    if kinds[:1] != ["Transformer"] or not mean or "Normalize" not in kinds or len(kinds) != 3:
        raise OnnxExportError(f"{model_path}: the onnx, onnx-int8 and bf16 backends serve Transformer + mean Pooling + Normalize models "
                              f"only (found {kinds or 'no modules.json'}); use embedder.backend: torch")


def export_onnx(model_path: str, out: Path) -> None:
    """Trace the model, mean pooling and normalisation into `out` (float32, dynamic batch and length)."""
    import torch
    from transformers import AutoModel

    from services.retrieval.mean_pooled import MeanPooled

    model = MeanPooled(AutoModel.from_pretrained(model_path, local_files_only=True).eval())
    example = torch.ones((2, 8), dtype=torch.long)
    axes = {name: {0: "batch", 1: "tokens"} for name in INPUTS}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about shape-dependent Python branches: shapes stay dynamic
        torch.onnx.export(model, (example, example, torch.zeros_like(example)), str(out), input_names=list(INPUTS),
                          output_names=["embedding"], dynamic_axes={**axes, "embedding": {0: "batch"}},
                          opset_version=17, dynamo=False)


def quantize_int8(src: Path, out: Path) -> None:
    """Dynamic int8 (per-channel weights, activations quantized per call) of every weight MatMul.

    The feed-forward output projections too: left float32 they kept every sentence's cosine to the
    float model above 0.99, quantized they let a few fall to about 0.98, and they are a third of the
    model's multiply-adds (1.4x faster in all). What retrieval keeps is the ranking: a tuned model
    served in int8 is checked against its float32 self at tuning (services/retrieval/tuning.py).
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(src), str(out), weight_type=QuantType.QInt8, per_channel=True, op_types_to_quantize=["MatMul"])


def cached_onnx_model(model_path: str, int8: bool, cache_dir: Path) -> Path:
    """The exported (and quantized) model file, made on first use and reused after."""
    folder = cache_dir / f"{Path(model_path).name}-{model_digest(model_path)}"
    fp32, q8 = folder / "model.onnx", folder / "model-int8-all.onnx"  # every MatMul (earlier caches: some)
    target = q8 if int8 else fp32
    if target.is_file():
        return target
    check_mean_pooled(model_path)
    folder.mkdir(parents=True, exist_ok=True)
    if not fp32.is_file():
        _write_atomically(fp32, lambda tmp: export_onnx(model_path, tmp))
    if int8 and not q8.is_file():
        _write_atomically(q8, lambda tmp: quantize_int8(fp32, tmp))
    return target


def _write_atomically(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".onnx", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o644)  # mkstemp makes it private; other users' replicas read the cache too
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


class OnnxEncoder(BatchEncoder):
    """Runs the exported graph by ONNX Runtime; rows come out L2-normalised."""

    def __init__(self, model_file: Path, tokenizer_file: Path, max_seq_length: int, threads: int | None,
                 cut: str = "head"):
        import onnxruntime as ort

        super().__init__(tokenizer_file, max_seq_length, cut)
        options = ort.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(model_file), options, providers=["CPUExecutionProvider"])

    def _run(self, feed: dict[str, np.ndarray]) -> np.ndarray:
        return self.session.run(None, feed)[0]  # (group, dim)
