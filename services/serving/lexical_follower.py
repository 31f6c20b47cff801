"""The lexical side of the hybrid retrieval score (services/retrieval/lexical.py), kept in step with the registry.

Like the vector index, it is derived state: rebuilt from the active adapters' cards whenever the
registry's generation moves, by each retriever replica for itself. With no weight configured, the
weight is chosen on those cards (`choose_weight`, with the card embeddings the registry stores),
so a registration changes it without an operator command. A registry that cannot be read keeps
the last build serving."""
from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

from services.retrieval.lexical import LexicalIndex, choose_weight, rerank_each, widen
from services.schemas import RetrievalResult

log = logging.getLogger(__name__)


class LexicalFollower:
    def __init__(self, registry, weight: float | None = None):
        """weight: the embedding's share of the hybrid score; None chooses it on the registry's cards."""
        self.registry, self.configured_weight = registry, weight
        # (index, embedding weight), replaced as one: a refresh in another thread never shows half of it
        self.state: tuple[LexicalIndex | None, float] = (None, 1.0)  # embedding only until a build
        self.generation = -1
        self.inner_top1: dict[float, float] = {}

    def refresh(self) -> None:
        """Rebuild when the registry's generation moved (one Redis read otherwise)."""
        try:
            generation = self.registry.generation()
            if generation != self.generation:
                self._build(self.registry.snapshot())
                self.generation = generation
        except Exception as err:
            log.warning("lexical retrieval index not refreshed: %s", err)

    def _build(self, records) -> None:
        live = [r for r in records if r.active_version is not None]
        cards = {r.name: [s.inputs for s in r.versions[r.active_version].card.sample] for r in live}
        cards = {name: texts for name, texts in cards.items() if texts}
        if not cards:
            self.state = (None, 1.0)
            return
        weight = self.configured_weight
        if weight is None:
            try:
                vectors = {r.name: self.registry.card_embeddings(r.name, r.active_version) for r in live if r.name in cards}
                weight, self.inner_top1 = choose_weight(cards, vectors)
            except ValueError:  # no card has 3 samples to hold out: the embedding alone, as before
                weight, self.inner_top1 = 1.0, {}
        self.state = (LexicalIndex(cards), weight)
        log.info("lexical retrieval index: %d adapters, embedding weight %.1f", len(cards), weight)

    def widen(self, options: Sequence[Mapping], weight: float | None = None) -> list[dict]:
        """Search options fetching the hybrid's candidates (lexical.widen); weight: the serving
        model's own embedding share (a tuned model's, chosen at its tuning), None: this follower's."""
        return widen(options, self.state[1] if weight is None else weight)

    def rerank(self, results: list[RetrievalResult], prompts: list[str], options: Sequence[Mapping],
               weight: float | None = None) -> list[RetrievalResult]:
        """Each prompt's widened results re-ordered by the hybrid score (when built, and the weight
        leaves the lexical side a share) and cut to its own top_k."""
        lexical, own = self.state
        return rerank_each(results, prompts, lexical, own if weight is None else weight,
                           [int(o.get("top_k", 3)) for o in options])

    def status(self) -> dict:
        lexical, weight = self.state
        return {"adapters": len(lexical.names) if lexical else 0, "embedding_weight": weight,
                "inner_top1_per_weight": {str(k): v for k, v in self.inner_top1.items()}}
