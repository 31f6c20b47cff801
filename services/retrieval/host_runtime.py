"""The embedding runtime this host serves best when none is configured.

A CPU with AMX tiles runs bfloat16 matrix products in hardware: there the bfloat16 runtime
(bf16_encoder.py) is faster than both ONNX runtimes and closer to float32 than int8 (docs/retrieval.md,
"bfloat16 on AMX"), so it replaces whichever of the two the configuration or a tuning chose.
Elsewhere the choice stands. Read from /proc/cpuinfo, so that asking costs no torch import.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

BF16 = "bf16"


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str]:
    """The first processor's feature flags; empty where the file is unreadable (not Linux)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return set()
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    return set(line.partition(":")[2].split())


@lru_cache(maxsize=1)
def has_amx_bf16() -> bool:
    return {"amx_tile", "amx_bf16"} <= cpu_flags()


def host_backend(preferred: str, amx: bool | None = None) -> str:
    """`preferred` (the ONNX runtime the defaults or a tuning chose), or bf16 where the CPU has AMX.
    amx: None = ask this host."""
    return BF16 if (has_amx_bf16() if amx is None else amx) else preferred


@contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """torch's intra-op thread count set to `threads` inside the block (None: leave it). The count is
    the process's, so it is restored for the other callers of torch (a composer in the same process)."""
    import torch

    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
