"""Fixtures: adapter folders to copy, an adapter store, and a registry over a real Redis."""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest
from registry_fixtures import BASE_MODEL, make_peft_adapter, tiny_config


@pytest.fixture(scope="session")
def adapter_templates(tmp_path_factory) -> dict[int, Path]:
    """A few distinct adapter folders made once; tests copy them before changing anything."""
    root = tmp_path_factory.mktemp("peft")
    return {seed: make_peft_adapter(root / f"seed{seed}", seed=seed) for seed in range(4)}


@pytest.fixture
def adapter_dir(adapter_templates, tmp_path):
    """adapter_dir(seed) -> a fresh copy of that template, free to change."""
    def copy(seed: int = 0, name: str = "src") -> Path:
        folder = Path(tempfile.mkdtemp(prefix=f"{name}-{seed}-", dir=tmp_path)) / name
        return Path(shutil.copytree(adapter_templates[seed], folder))

    return copy


@pytest.fixture
def store(tmp_path):
    from services.registry.store import AdapterStore

    return AdapterStore(tmp_path / "store")


@pytest.fixture
def make_registry(redis_client, store):
    from services.registry.registry import AdapterRegistry

    def make(**kwargs):
        return AdapterRegistry(redis_client, store, **{"base_config": tiny_config(), "base_model": BASE_MODEL,
                                                       **kwargs})

    return make


@pytest.fixture
def registry(make_registry):
    return make_registry()
