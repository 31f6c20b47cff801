"""Helpers for the registry tests: real PEFT adapter folders from a tiny Llama, state dumps."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import redis

BASE_MODEL = "tiny-llama"


def tiny_config():
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=128)


def make_peft_adapter(folder: Path, *, seed: int, rank: int = 4, modules=("q_proj", "v_proj")) -> Path:
    """save_pretrained of a LoRA on a tiny LlamaForCausalLM; B is random so seeds differ in content."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = get_peft_model(LlamaForCausalLM(tiny_config()),
                           LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(modules),
                                      init_lora_weights=False))
    model.save_pretrained(folder)
    set_config_field(folder, "base_model_name_or_path", BASE_MODEL)
    return folder


def set_config_field(folder: Path, field: str, value) -> None:
    path = folder / "adapter_config.json"
    config = json.loads(path.read_text())
    config[field] = value
    path.write_text(json.dumps(config))


def card(name: str, domain: str = "math", samples: int = 2):
    from services.schemas import AdapterCard, CardSample

    return AdapterCard(model_name=name, domain=domain,
                       sample=[CardSample(inputs=f"{name} sample {i}", targets="t") for i in range(samples)])


def embeddings(samples: int = 2, dim: int = 8, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((samples, dim)).astype(np.float32)  # (samples, dim)


def redis_state(url: str) -> dict[bytes, bytes]:
    """Every key's serialized value (DUMP), so two states compare byte for byte."""
    client = redis.Redis.from_url(url)
    try:
        return {key: client.dump(key) for key in sorted(client.keys("*"))}
    finally:
        client.close()


def tree_state(root: Path) -> dict[str, str]:
    """Every path under root with a content hash (folders as 'dir')."""
    if not root.exists():
        return {}
    return {str(p.relative_to(root)): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*"))}
