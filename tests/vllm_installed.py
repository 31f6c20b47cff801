"""Tests of the vLLM engine need vLLM's own environment (python -m services.lora.vllm_env install):
they skip where it is absent, and fail on CI, which installs it (.ci/run)."""
from __future__ import annotations

import os

import pytest


def vllm_or_skip() -> None:
    from services.lora.vllm_env import installed_python

    if installed_python() is None:
        message = "vLLM is not installed (python -m services.lora.vllm_env install)"
        if os.environ.get("CI"):
            pytest.fail(message + "; CI installs it in .ci/run")
        pytest.skip(message)
