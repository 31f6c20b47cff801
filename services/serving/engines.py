"""Which engine a composer runs (composition.engine) and building it from the configuration."""
from __future__ import annotations

import logging
import os
from pathlib import Path

from services.config import AppConfig, ConfigError, data_home
from services.wiring import base_model_path

log = logging.getLogger(__name__)


def vllm_python(cfg: AppConfig) -> Path | None:
    """vLLM's python: composition.vllm.python, else the installed default environment (None: none)."""
    from services.lora.vllm_env import VllmEnvError, installed_python, usable_python

    if cfg.composition.vllm.python:
        try:
            return usable_python(Path(cfg.composition.vllm.python))
        except VllmEnvError as err:
            raise ConfigError(f"composition.vllm.python: {err}") from err
    return installed_python()


def device_of(cfg: AppConfig) -> str:
    import torch

    device = cfg.base_model.device
    return ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device


def choose_engine(cfg: AppConfig) -> str:
    """"native" or "vllm"; auto is vllm where the model runs on CUDA and vLLM is installed (on CPU
    the native engine is several times faster: docs/engine.md)."""
    engine = cfg.composition.engine
    if engine != "auto":
        return engine
    return "vllm" if device_of(cfg).startswith("cuda") and vllm_python(cfg) is not None else "native"


def make_engine(cfg: AppConfig):
    """The configured engine, its base model loaded (vLLM: its process started and ready)."""
    comp = cfg.composition
    if choose_engine(cfg) == "vllm":
        return make_vllm_engine(cfg)
    from services.lora.engine import CompositionEngine

    return CompositionEngine.from_pretrained(
        base_model_path(cfg), device=cfg.base_model.device, dtype=cfg.base_model.dtype,
        max_adapters_per_row=comp.max_adapters_per_request, device_slots=comp.device_slots,
        cpu_slots=comp.cpu_slots, max_rank=comp.max_rank, max_batch_rows=comp.max_batch_size,
        prefill_tokens=comp.prefill_tokens, prefix_cache_mb=comp.prefix_cache_mb,
        allow_unsafe_pickle=cfg.adapter_store.allow_unsafe_pickle,
    )


def make_vllm_engine(cfg: AppConfig):
    import torch
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    from services.lora.composite import CompositeCache
    from services.lora.engine import native_bfloat16
    from services.lora.vllm_engine import VllmEngine, VllmSettings

    comp, vcfg = cfg.composition, cfg.composition.vllm
    python = vllm_python(cfg)
    if python is None:
        raise ConfigError("composition.engine=vllm but vLLM is not installed: run `python -m services.lora.vllm_env "
                          "install` (or set composition.vllm.python)")
    base, device = base_model_path(cfg), device_of(cfg)
    dtype = cfg.base_model.dtype
    if dtype == "auto":
        dtype = str(native_bfloat16(torch.device(device))).removeprefix("torch.")
    settings = VllmSettings(
        python=python, model=base, dtype=dtype, device="cpu" if device == "cpu" else "cuda",
        max_batch_rows=comp.max_batch_size, max_model_len=comp.max_prompt_tokens + comp.max_tokens_limit,
        max_loras=comp.device_slots, max_cpu_loras=max(comp.cpu_slots, comp.device_slots),
        max_lora_rank=vcfg.max_lora_rank, threads=comp.torch_threads or len(os.sched_getaffinity(0)),
        kv_cache_gib=vcfg.kv_cache_gib, gpu_memory_utilization=vcfg.gpu_memory_utilization,
        startup_timeout_s=vcfg.startup_timeout_s, log_path=data_home() / "logs" / f"vllm-{os.getpid()}.log")
    tokenizer = AutoTokenizer.from_pretrained(base)
    eos = GenerationConfig.from_pretrained(base).eos_token_id if (base / "generation_config.json").is_file() else None
    eos = eos if eos is not None else tokenizer.eos_token_id
    composites = CompositeCache(Path(vcfg.composite_cache_path or data_home() / "composites"),
                                vcfg.composite_cache_mb * 2**20, vcfg.weight_grid)
    config = AutoConfig.from_pretrained(base)
    return VllmEngine(settings, tokenizer, vocab_size=config.vocab_size, base_config=config, composites=composites,
                      max_adapters_per_row=comp.max_adapters_per_request, max_rank=comp.max_rank,
                      allow_unsafe_pickle=cfg.adapter_store.allow_unsafe_pickle,
                      eos_ids=set(eos) if isinstance(eos, (list, tuple)) else {eos})
