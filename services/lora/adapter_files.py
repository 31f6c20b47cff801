"""Read and validate a PEFT LoRA adapter folder (adapter_config.json + adapter_model.safetensors).

Every check runs before anything is returned, and nothing outside the returned object is
touched, so a refused adapter leaves no trace.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from services.errors import InvalidRequest

CONFIG_FILE = "adapter_config.json"
SAFETENSORS_FILE = "adapter_model.safetensors"
PICKLE_FILE = "adapter_model.bin"

ATTENTION_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_MODULES = ("gate_proj", "up_proj", "down_proj")
SUPPORTED_MODULES = ATTENTION_MODULES + MLP_MODULES

# PEFT saves "base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight".
WEIGHT_KEY = re.compile(
    r"^(?:base_model\.model\.)?(?P<layer>model\.layers\.(?P<index>\d+)\.(?P<block>self_attn|mlp)\.(?P<module>\w+))"
    r"\.lora_(?P<side>[AB])\.weight$"
)
# Config features that change the math beyond plain B A x; refused rather than ignored.
UNSUPPORTED_FEATURES = {
    "use_dora": lambda v: bool(v),
    "fan_in_fan_out": lambda v: bool(v),
    "bias": lambda v: v not in (None, "none"),
    "modules_to_save": lambda v: bool(v),
    "rank_pattern": lambda v: bool(v),
    "alpha_pattern": lambda v: bool(v),
    "layers_to_transform": lambda v: v is not None,
}


# LoRA weights are O(1); finite values far beyond that overflow half precision on a device and
# swamp the base model's output for every row that uses the adapter. Refused like NaN.
MAX_ABS_WEIGHT = 1e4


class AdapterValidationError(InvalidRequest):
    """An adapter folder that cannot be used; the message names the file or field at fault."""


@dataclass(frozen=True)
class LoraAdapterWeights:
    """A validated adapter on CPU in float32."""

    name: str
    rank: int
    scaling: float  # lora_alpha / r, or lora_alpha / sqrt(r) with rslora
    target_modules: tuple[str, ...]  # e.g. ("q_proj", "v_proj")
    base_model: str | None  # adapter_config.json base_model_name_or_path
    a: dict[str, torch.Tensor]  # "model.layers.3.self_attn.q_proj" -> (r, in)
    b: dict[str, torch.Tensor]  # same key -> (out, r)


def module_shapes(base_config) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of each target module of a Llama-family config."""
    hidden = base_config.hidden_size
    heads = base_config.num_attention_heads
    kv_heads = getattr(base_config, "num_key_value_heads", None) or heads
    head_dim = getattr(base_config, "head_dim", None) or hidden // heads
    inter = base_config.intermediate_size
    return {
        "q_proj": (hidden, heads * head_dim),
        "k_proj": (hidden, kv_heads * head_dim),
        "v_proj": (hidden, kv_heads * head_dim),
        "o_proj": (heads * head_dim, hidden),
        "gate_proj": (hidden, inter),
        "up_proj": (hidden, inter),
        "down_proj": (inter, hidden),
    }


def check_adapter_name(name: str) -> str:
    if not name or name in (".", "..") or any(c in name for c in "/\\\0"):
        raise AdapterValidationError(f"adapter name {name!r} must be non-empty and contain no path separator")
    return name


def same_base_model(expected: str, declared: str) -> bool:
    """Hub ids and local folders name the same model by their last path component."""
    return expected == declared or last_path_component(expected) == last_path_component(declared)


def last_path_component(model: str) -> str:
    return model.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1].lower()


def weights_file(folder: Path, allow_unsafe_pickle: bool) -> Path:
    if (folder / SAFETENSORS_FILE).is_file():
        return folder / SAFETENSORS_FILE
    if (folder / PICKLE_FILE).is_file():
        if not allow_unsafe_pickle:
            raise AdapterValidationError(
                f"{folder / PICKLE_FILE}: pickle weights are refused (they can run code); "
                f"convert to {SAFETENSORS_FILE} or set the unsafe-pickle flag"
            )
        return folder / PICKLE_FILE
    raise AdapterValidationError(f"{folder}: no {SAFETENSORS_FILE} found")


def read_config(folder: Path) -> dict:
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise AdapterValidationError(f"{path}: file not found")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise AdapterValidationError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(config, dict):
        raise AdapterValidationError(f"{path}: expected a JSON object")
    if config.get("peft_type", "LORA") != "LORA":
        raise AdapterValidationError(f"{path}: peft_type {config.get('peft_type')!r} is not LORA")
    for field, unsupported in UNSUPPORTED_FEATURES.items():
        if unsupported(config.get(field)):
            raise AdapterValidationError(f"{path}: field {field}={config[field]!r} is not supported")
    return config


def config_scaling(config: dict, config_path: Path, max_rank: int) -> tuple[int, float]:
    rank, alpha = config.get("r"), config.get("lora_alpha", config.get("r"))
    if not isinstance(rank, int) or isinstance(rank, bool) or not 1 <= rank <= max_rank:
        raise AdapterValidationError(f"{config_path}: field r={rank!r} must be an integer from 1 to {max_rank}")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha):
        raise AdapterValidationError(f"{config_path}: field lora_alpha={alpha!r} must be a finite number")
    scaling = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    return rank, float(scaling)


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path), device="cpu")
        tensors = torch.load(path, map_location="cpu", weights_only=True)
    except (SafetensorError, OSError, RuntimeError, ValueError, EOFError) as err:
        raise AdapterValidationError(f"{path}: corrupted or truncated weights file ({err})") from err
    if not isinstance(tensors, dict) or not all(isinstance(t, torch.Tensor) for t in tensors.values()):
        raise AdapterValidationError(f"{path}: expected a flat mapping of names to tensors")
    return tensors


def split_lora_tensors(tensors: dict[str, torch.Tensor], path: Path, base_config, rank: int
                       ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Check every tensor's name, layer, shape and values; return float32 A and B by layer key."""
    shapes = module_shapes(base_config)
    a, b = {}, {}
    for key, tensor in tensors.items():
        match = WEIGHT_KEY.match(key)
        if match is None:
            raise AdapterValidationError(f"{path}: tensor {key!r} is not a LoRA weight of a Llama-family layer")
        module, layer = match["module"], match["layer"]
        if module not in SUPPORTED_MODULES:
            raise AdapterValidationError(f"{path}: tensor {key!r} targets unsupported module {module!r}")
        if int(match["index"]) >= base_config.num_hidden_layers:
            raise AdapterValidationError(
                f"{path}: tensor {key!r} names layer {match['index']}; the base model has "
                f"{base_config.num_hidden_layers} layers")
        in_features, out_features = shapes[module]
        expected = (rank, in_features) if match["side"] == "A" else (out_features, rank)
        if tuple(tensor.shape) != expected:
            raise AdapterValidationError(
                f"{path}: tensor {key!r} has shape {tuple(tensor.shape)}, expected {expected} (r={rank})")
        if not tensor.is_floating_point():
            raise AdapterValidationError(f"{path}: tensor {key!r} has non-float dtype {tensor.dtype}")
        tensor = tensor.to(torch.float32)
        if not torch.isfinite(tensor).all():
            raise AdapterValidationError(f"{path}: tensor {key!r} holds NaN or infinite values")
        if tensor.numel() and (peak := tensor.abs().max().item()) > MAX_ABS_WEIGHT:
            raise AdapterValidationError(
                f"{path}: tensor {key!r} holds a value of magnitude {peak:.3g}; LoRA weights above "
                f"{MAX_ABS_WEIGHT:g} are refused")
        (a if match["side"] == "A" else b)[layer] = tensor.contiguous()
    if not a:
        raise AdapterValidationError(f"{path}: holds no LoRA weights")
    unpaired = sorted(set(a) ^ set(b))
    if unpaired:
        raise AdapterValidationError(f"{path}: layer {unpaired[0]!r} lacks its lora_A or lora_B weight")
    return a, b


def read_adapter(path, *, base_config, base_model: str | None = None, max_rank: int = 64,
                 allow_unsafe_pickle: bool = False, name: str | None = None) -> LoraAdapterWeights:
    """Read a PEFT LoRA folder and check it fits `base_config`; raises AdapterValidationError."""
    folder = Path(path)
    name = check_adapter_name(folder.name if name is None else name)
    if not folder.is_dir():
        raise AdapterValidationError(f"{folder}: not a directory")
    config = read_config(folder)
    config_path = folder / CONFIG_FILE
    declared_base = config.get("base_model_name_or_path")
    if base_model and declared_base and not same_base_model(base_model, declared_base):
        raise AdapterValidationError(
            f"{config_path}: base_model_name_or_path {declared_base!r} does not match the served base model "
            f"{base_model!r}")
    rank, scaling = config_scaling(config, config_path, max_rank)
    weights_path = weights_file(folder, allow_unsafe_pickle)
    a, b = split_lora_tensors(load_tensors(weights_path), weights_path, base_config, rank)
    modules = tuple(m for m in SUPPORTED_MODULES if any(k.endswith("." + m) for k in a))
    return LoraAdapterWeights(name=name, rank=rank, scaling=scaling, target_modules=modules,
                              base_model=declared_base, a=a, b=b)


def adapter_checksum(path) -> str:
    """sha256 over adapter_config.json then the weights file (safetensors, else .bin)."""
    folder = Path(path)
    weights = folder / SAFETENSORS_FILE if (folder / SAFETENSORS_FILE).is_file() else folder / PICKLE_FILE
    digest = hashlib.sha256()
    for file in (folder / CONFIG_FILE, weights):
        if not file.is_file():
            raise AdapterValidationError(f"{file}: file not found")
        with file.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()
