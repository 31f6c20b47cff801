"""Embedder + index: adapter cards in, retrieval results for prompts out."""
from __future__ import annotations

import numpy as np

from services.retrieval.embedder import Embedder
from services.retrieval.index import AdapterIndex
from services.schemas import AdapterCard, RetrievalResult


class Retriever:
    def __init__(self, embedder: Embedder, index: AdapterIndex, lexical=None, lexical_weight: float = 1.0):
        """lexical: a services.retrieval.lexical.LexicalIndex of the same cards, or None (embedding only);
        lexical_weight is the embedding's share of the hybrid score."""
        if embedder.dim != index.dim:
            raise ValueError(f"embedder gives {embedder.dim}-d vectors, the index holds {index.dim}-d")
        self.embedder = embedder
        self.index = index
        self.lexical, self.lexical_weight = lexical, lexical_weight

    def add_card(self, card: AdapterCard, **index_fields) -> np.ndarray:
        """Index the card's adapter; returns the (samples, dim) embeddings indexed (the registry stores them)."""
        embeddings = self.embedder.encode([s.inputs for s in card.sample])  # (samples, dim)
        index_fields.setdefault("domain", card.domain)
        self.index.upsert(card.model_name, embeddings, **index_fields)
        return embeddings

    def search(self, vectors: np.ndarray, prompts: list[str], *, top_k: int = 3, **search_kwargs) -> list[RetrievalResult]:
        """Index search of the prompts' embeddings (prompts, dim), re-ranked by the hybrid score when
        a lexical index is set; `search_kwargs` are AdapterIndex.search keywords."""
        if self.lexical is None:
            return self.index.search(vectors, top_k=top_k, **search_kwargs)
        from services.retrieval.lexical import rerank_each, widen

        options = [{**search_kwargs, "top_k": top_k}] * len(prompts)
        candidates = self.index.search_batch(vectors, widen(options, self.lexical_weight))
        return rerank_each(candidates, prompts, self.lexical, self.lexical_weight, [top_k] * len(prompts))

    def retrieve(self, prompts: list[str], **search_kwargs) -> list[RetrievalResult]:
        """One result per prompt; `search_kwargs` are AdapterIndex.search keywords."""
        return self.search(self.embedder.encode(prompts), prompts, **search_kwargs)
