"""Operator-side adapter actions: embed a card, then hand the version to the registry.

The registry validates, stages and flips pointers atomically; this adds the one thing it
does not do itself, the card embedding (it needs the embedder model)."""
from __future__ import annotations

from functools import cached_property
from pathlib import Path

from services.config import AppConfig
from services.schemas import AdapterCard


class AdapterAdmin:
    def __init__(self, registry, embedder_factory):
        self.registry = registry
        self._embedder_factory = embedder_factory

    @classmethod
    def from_config(cls, cfg: AppConfig) -> "AdapterAdmin":
        from services.wiring import make_registry
        from services.retrieval.embedder import embedder_from_config

        return cls(make_registry(cfg), lambda: embedder_from_config(cfg.embedder))

    @cached_property
    def embedder(self):
        return self._embedder_factory()

    def add(self, name: str, path: str | Path, card: AdapterCard, *, tenant: str | None = None,
            visibility: str = "shared", activate: bool = True, actor: str = "operator"):
        embeddings = self.embedder.encode([s.inputs for s in card.sample])  # (samples, dim)
        return self.registry.add_version(name, path, card, embeddings, tenant=tenant,
                                         visibility=visibility, activate=activate, actor=actor)
