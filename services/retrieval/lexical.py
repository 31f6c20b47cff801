"""Lexical adapter scores, and their blend with the embedding's: a hybrid re-rank of the index's candidates.

Card samples of one task share its template ("How would the sentiment of this sentence be
perceived? OPTIONS: ..."), and a prompt of that task repeats it; character n-grams of the words
(TF-IDF, sublinear counts) see the template where a sentence embedding blurs it. Each adapter
scores the cosine of the prompt's TF-IDF vector with the unit mean of its samples' (the centroid,
as the embedding side), and the hybrid score is

    weight * embedding cosine + (1 - weight) * lexical cosine

over the index's best `candidates` adapters by embedding (docs/retrieval.md, "Tuning on real Flan
tasks", has the measurements). The weight is chosen on the cards themselves (`choose_weight`):
part of each card's samples held out and scored against the rest, never on prompts.
"""
from __future__ import annotations

import random
from collections.abc import Mapping, Sequence

import numpy as np
from scipy import sparse
from sklearn.feature_extraction.text import TfidfVectorizer

from services.schemas import RetrievalResult

# With a lexical share in the score, this many adapters by embedding cosine are re-ranked (a prompt's
# own adapter is among the best 32 of 48 Flan tasks by embedding for 949 of 960 held-out card samples,
# docs/retrieval.md).
HYBRID_CANDIDATES = 32
NGRAMS = (1, 3)  # character n-grams inside word boundaries (1-3: the best mean on the cards' own inner split, docs/retrieval.md)
WEIGHTS = tuple(round(0.1 * i, 1) for i in range(11))  # the grid choose_weight searches


class LexicalIndex:
    """Per adapter, the unit centroid of its card samples' TF-IDF vectors; the vocabulary and IDF come from all cards."""

    def __init__(self, cards: dict[str, list[str]]):
        if not cards or any(not texts for texts in cards.values()):
            raise ValueError("a lexical index needs at least one adapter, each with at least one sample")
        self.names = list(cards)
        self.position = {name: i for i, name in enumerate(self.names)}
        self.vectorizer = TfidfVectorizer(analyzer="char_wb", ngram_range=NGRAMS, sublinear_tf=True, dtype=np.float32)
        self.vectorizer.fit([t for texts in cards.values() for t in texts])
        rows = []
        for texts in cards.values():
            mean = np.asarray(self.vectorizer.transform(texts).mean(axis=0)).ravel()  # rows are unit (l2 norm)
            rows.append(mean / max(np.linalg.norm(mean), 1e-12))
        self.centroids = sparse.csr_matrix(np.stack(rows))  # (adapters, vocabulary)

    def scores(self, prompts: list[str]) -> np.ndarray:
        """(prompts, adapters) cosines, adapters in self.names order; 0 for a prompt with no known n-gram."""
        return (self.vectorizer.transform(prompts) @ self.centroids.T).toarray()


def blend(embedding: np.ndarray, lexical: np.ndarray, weight: float) -> np.ndarray:
    """The hybrid score of each (prompt, adapter): weight * embedding + (1 - weight) * lexical."""
    return weight * embedding + (1.0 - weight) * lexical


def rerank(results: list[RetrievalResult], prompts: list[str], lexical: LexicalIndex, weight: float,
           top_k: int) -> list[RetrievalResult]:
    """Re-order each prompt's candidates (the index's results by embedding cosine) by the hybrid score,
    keeping `top_k`; an adapter the lexical index lacks scores 0 on the lexical side."""
    lex = lexical.scores(prompts)  # (prompts, adapters)
    out = []
    for result, row in zip(results, lex):
        scored = [(blend(a.score, row[lexical.position[a.name]] if a.name in lexical.position else 0.0, weight), a)
                  for a in result.adapters]
        scored.sort(key=lambda pair: -pair[0])
        out.append(RetrievalResult(adapters=[a.model_copy(update={"score": float(s)}) for s, a in scored[:top_k]]))
    return out


def widen(options: Sequence[Mapping], weight: float) -> list[dict]:
    """Index search options that fetch the hybrid's candidates: top_k raised to HYBRID_CANDIDATES,
    unless the embedding has the whole weight (then its own order is final)."""
    if weight >= 1.0:
        return [dict(o) for o in options]
    return [{**o, "top_k": max(int(o.get("top_k", 3)), HYBRID_CANDIDATES)} for o in options]


def rerank_each(results: list[RetrievalResult], prompts: list[str], lexical: LexicalIndex | None, weight: float,
                top_ks: Sequence[int]) -> list[RetrievalResult]:
    """Each prompt's (widened) results re-ordered by the hybrid score when the lexical side has a
    share, and cut to that prompt's own top_k."""
    if lexical is not None and weight < 1.0:
        results = rerank(results, prompts, lexical, weight, max(top_ks))
    return [RetrievalResult(adapters=r.adapters[:k]) for r, k in zip(results, top_ks)]


def choose_weight(cards: dict[str, list[str]], embeddings: dict[str, np.ndarray], *, heldout_fraction: float = 0.25,
                  seed: int = 0, scoring: str = "centroid") -> tuple[float, dict[float, float]]:
    """The grid weight with the best held-out top-1 on the cards alone, and each weight's top-1 (%).

    Per card with 3 or more samples, `heldout_fraction` of them (at least 1) is held out and scored
    against every adapter's rest: on the embedding side (unit rows of `embeddings[name]`, (samples,
    dim)) by the index's `scoring` (the rest's centroid, or its best sample), on the lexical side by
    the rest's centroid. Ties go to the larger embedding weight."""
    rng = random.Random(seed)
    train_text, train_vec, held = {}, [], []  # held: (card position, text, embedding row)
    for c, (name, texts) in enumerate(cards.items()):
        order = list(range(len(texts)))
        rng.shuffle(order)
        n_out = min(max(1, round(heldout_fraction * len(texts))), len(texts) - 2) if len(texts) >= 3 else 0
        vectors = embeddings[name] / np.linalg.norm(embeddings[name], axis=1, keepdims=True)  # (samples, dim)
        held += [(c, texts[i], vectors[i]) for i in order[:n_out]]
        train_text[name] = [texts[i] for i in order[n_out:]]
        train_vec.append(vectors[order[n_out:]])  # (rest, dim)
    if not held:
        raise ValueError("no card has 3 or more samples to hold out")
    owner = np.array([c for c, _, _ in held])
    queries = np.stack([v for _, _, v in held])  # (held-out samples, dim)
    if scoring == "samples":
        emb = np.stack([(queries @ rest.T).max(axis=1) for rest in train_vec], axis=1)  # (held-out samples, adapters)
    else:
        centroids = np.stack([rest.mean(axis=0) / np.linalg.norm(rest.mean(axis=0)) for rest in train_vec])
        emb = queries @ centroids.T  # (held-out samples, adapters)
    lex = LexicalIndex(train_text).scores([t for _, t, _ in held])
    top1 = {w: round(100.0 * float(np.mean(blend(emb, lex, w).argmax(axis=1) == owner)), 2) for w in WEIGHTS}
    best = max(sorted(top1, reverse=True), key=lambda w: top1[w])  # first maximum from weight 1.0 down
    return best, top1
