"""Rendered k8s/ overlays for the manifest tests (rendered once per session)."""
from __future__ import annotations

import pytest

from kustomize_render import render
from ray_manifest import KUSTOMIZATIONS


@pytest.fixture(scope="session")
def rendered() -> dict[str, list[dict]]:
    """kustomization name -> its rendered objects."""
    return {name: render(path) for name, path in KUSTOMIZATIONS.items()}
