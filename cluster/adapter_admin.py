"""Operator-side adapter actions: embed a card, then hand the version to the registry.

The registry validates, stages and flips pointers atomically; this adds the one thing it
does not do itself, the card embedding (it needs the embedder model)."""
from __future__ import annotations

from functools import cached_property
from pathlib import Path

from cluster.config import AppConfig
from services.schemas import AdapterCard


class AdapterAdmin:
    def __init__(self, registry, embedder_factory):
        self.registry = registry
        self._embedder_factory = embedder_factory

    @classmethod
    def from_config(cls, cfg: AppConfig) -> "AdapterAdmin":
        from transformers import AutoConfig

        from cluster.wiring import base_model_name, base_model_path, redis_client
        from services.registry.registry import AdapterRegistry
        from services.registry.store import AdapterStore
        from services.retrieval.embedder import Embedder

        registry = AdapterRegistry(
            redis_client(cfg), AdapterStore(cfg.adapter_store.path),
            base_config=AutoConfig.from_pretrained(base_model_path(cfg)), base_model=base_model_name(cfg),
            max_rank=cfg.composition.max_rank, allow_unsafe_pickle=cfg.adapter_store.allow_unsafe_pickle,
        )
        return cls(registry, lambda: Embedder(cfg.embedder.model_path, cfg.embedder.instruction,
                                              batch_size=cfg.embedder.batch_size))

    @cached_property
    def embedder(self):
        return self._embedder_factory()

    def add(self, name: str, path: str | Path, card: AdapterCard, *, tenant: str | None = None,
            visibility: str = "shared", activate: bool = True, actor: str = "operator"):
        embeddings = self.embedder.encode([s.inputs for s in card.sample])  # (samples, dim)
        return self.registry.add_version(name, Path(path), card, embeddings, tenant=tenant,
                                         visibility=visibility, activate=activate, actor=actor)
