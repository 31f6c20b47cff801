"""New versions of demo adapters, for rollouts in tests and benchmarks."""
from __future__ import annotations

from pathlib import Path


def variant_adapter(src: Path, dest: Path, scale: float) -> Path:
    """A new version of an adapter: same config, lora_B scaled (new weights, new checksum)."""
    from safetensors.torch import load_file, save_file

    dest.mkdir(parents=True, exist_ok=True)
    (dest / "adapter_config.json").write_bytes((src / "adapter_config.json").read_bytes())
    tensors = {k: (v * scale if "lora_B" in k else v).contiguous()
               for k, v in load_file(src / "adapter_model.safetensors").items()}
    save_file(tensors, dest / "adapter_model.safetensors")
    return dest
