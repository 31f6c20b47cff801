"""Which embedding runtime a host serves by default: bf16 on CPUs with AMX, else the chosen ONNX runtime."""
from __future__ import annotations

import pytest

from services.config import EmbedderConfig, replica_threads
from services.retrieval import host_runtime
from services.retrieval.embedder import embedder_from_config
from services.retrieval.host_runtime import cpu_flags, host_backend

SAPPHIRE_RAPIDS = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 amx_bf16 amx_tile amx_int8\n"
EPYC = "processor\t: 0\nflags\t\t: fpu sse2 avx2 fma\nprocessor\t: 1\nflags\t\t: fpu sse2 avx2 fma amx_tile amx_bf16\n"


def test_cpu_flags_are_the_first_processors(tmp_path):
    (tmp_path / "spr").write_text(SAPPHIRE_RAPIDS)
    (tmp_path / "epyc").write_text(EPYC)
    assert {"amx_tile", "amx_bf16", "avx2"} <= cpu_flags(tmp_path / "spr")
    assert "amx_tile" not in cpu_flags(tmp_path / "epyc")
    assert cpu_flags(tmp_path / "missing") == set()  # not Linux: no flags, so no AMX


@pytest.mark.parametrize("preferred", ["onnx", "onnx-int8"])
def test_amx_replaces_the_onnx_runtime_with_bf16_and_nothing_else_does(preferred):
    assert host_backend(preferred, amx=True) == "bf16"
    assert host_backend(preferred, amx=False) == preferred


@pytest.mark.parametrize("amx,expected", [(True, "bf16"), (False, "onnx")])
def test_the_configured_embedder_takes_the_hosts_runtime_unless_one_is_set(monkeypatch, amx, expected):
    monkeypatch.setattr(host_runtime, "has_amx_bf16", lambda: amx)
    assert embedder_from_config(EmbedderConfig()).backend == expected
    assert embedder_from_config(EmbedderConfig(backend="onnx-int8")).backend == "onnx-int8"  # a setting stands


def test_config_accepts_bf16_and_refuses_unknown_runtimes():
    assert EmbedderConfig(backend="bf16").backend == "bf16"
    with pytest.raises(ValueError, match="backend"):
        EmbedderConfig(backend="fp8")


@pytest.mark.parametrize("num_cpus,threads", [(0.1, 1), (0.5, 1), (1, 1), (2, 2), (3.5, 3)])
def test_a_replica_encodes_on_the_whole_cpus_it_reserved(num_cpus, threads):
    assert replica_threads(num_cpus) == threads
