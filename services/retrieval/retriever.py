"""Embedder + index: adapter cards in, retrieval results for prompts out."""
from __future__ import annotations

import numpy as np

from services.retrieval.embedder import Embedder
from services.retrieval.index import AdapterIndex
from services.schemas import AdapterCard, RetrievalResult


class Retriever:
    def __init__(self, embedder: Embedder, index: AdapterIndex):
        if embedder.dim != index.dim:
            raise ValueError(f"embedder gives {embedder.dim}-d vectors, the index holds {index.dim}-d")
        self.embedder = embedder
        self.index = index

    def add_card(self, card: AdapterCard, **index_fields) -> np.ndarray:
        """Index the card's adapter; returns the (samples, dim) embeddings indexed (the registry stores them)."""
        embeddings = self.embedder.encode([s.inputs for s in card.sample])  # (samples, dim)
        index_fields.setdefault("domain", card.domain)
        self.index.upsert(card.model_name, embeddings, **index_fields)
        return embeddings

    def retrieve(self, prompts: list[str], **search_kwargs) -> list[RetrievalResult]:
        """One result per prompt; `search_kwargs` are AdapterIndex.search keywords."""
        return self.index.search(self.embedder.encode(prompts), **search_kwargs)
