"""Tiny Llama base models and real PEFT adapter folders for the composition tests."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer
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


def write_peft_adapters(root: Path, specs: dict, first_seed: int) -> dict[str, Path]:
    """One adapter per name of specs {name: (rank, alpha, target modules, rslora)} on tiny_model()'s
    config, seeds first_seed, first_seed + 1, ... in the order of specs."""
    config = tiny_model().config
    return {name: write_peft_adapter(root / name, config, rank=r, alpha=alpha, target_modules=tm,
                                     seed=first_seed + i, use_rslora=rs)
            for i, (name, (r, alpha, tm, rs)) in enumerate(specs.items())}


class NoTokenizer:
    """The engine reads only the special token ids; tests that feed token ids need no text."""

    eos_token_id = pad_token_id = 0


def add_cat_adapter(peft_model, name, adapters, weights):
    """PEFT's "cat" combination: A = [w_i s_i A_i], B = [B_i], so delta = sum_i w_i s_i B_i A_i."""
    peft_model.add_weighted_adapter(adapters, weights, name, combination_type="cat")
    # The scalings are already inside A; PEFT copies use_rslora from the first adapter's config,
    # which would rescale the combination by sqrt(r), so pin its scaling to 1.
    for module in peft_model.modules():
        if isinstance(module, LoraLayer) and name in module.scaling:
            module.scaling[name] = 1.0


def add_fused_adapter(peft_model, name, adapters, weights):
    """A PEFT adapter holding sum_i w_i A_i and sum_i w_i s_i B_i (ranks zero-padded), scaling 1."""
    rank = max(peft_model.peft_config[a].r for a in adapters)
    modules = sorted(set().union(*(peft_model.peft_config[a].target_modules for a in adapters)))
    peft_model.add_adapter(name, LoraConfig(r=rank, lora_alpha=rank, target_modules=modules))
    for module in peft_model.modules():
        if isinstance(module, LoraLayer) and name in module.lora_A:
            a_avg = torch.zeros_like(module.lora_A[name].weight)  # (rank, in)
            b_avg = torch.zeros_like(module.lora_B[name].weight)  # (out, rank)
            for adapter, w in zip(adapters, weights):
                if adapter in module.lora_A:
                    r = peft_model.peft_config[adapter].r
                    a_avg[:r] += w * module.lora_A[adapter].weight
                    b_avg[:, :r] += w * module.scaling[adapter] * module.lora_B[adapter].weight
            module.lora_A[name].weight.data.copy_(a_avg)
            module.lora_B[name].weight.data.copy_(b_avg)
