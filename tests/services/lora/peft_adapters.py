"""Tiny Llama base models and real PEFT adapter folders for the composition tests."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

BASE_MODEL = "tiny-llama-test"


def tiny_config(vocab_size: int = 256) -> LlamaConfig:
    return LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=vocab_size, max_position_embeddings=256,
                       pad_token_id=0, bos_token_id=1, eos_token_id=2)


def tiny_model(seed: int = 0, vocab_size: int = 256) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_config(vocab_size)).eval()
    model.config.name_or_path = BASE_MODEL
    return model


def write_peft_adapter(folder: Path, base_config, *, rank: int, alpha: float, target_modules, seed: int,
                       use_rslora: bool = False) -> Path:
    """Save a real PEFT LoRA adapter with random A and B (B non-zero, so it changes outputs)."""
    torch.manual_seed(seed)
    base = LlamaForCausalLM(base_config)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(target_modules), use_rslora=use_rslora,
                        init_lora_weights=False)
    peft_model = get_peft_model(base, config)
    peft_model.save_pretrained(folder)
    # A model built from a config has no hub id; record the one a trained adapter would carry.
    config_path = Path(folder) / "adapter_config.json"
    saved = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**saved, "base_model_name_or_path": BASE_MODEL}, indent=2))
    return Path(folder)
