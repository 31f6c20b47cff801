"""Lexical scores, the hybrid re-rank and the weight choice, against plain-Python and numpy oracles."""
from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest

from services.retrieval.index import AdapterIndex
from services.retrieval.lexical import NGRAMS, WEIGHTS, LexicalIndex, choose_weight
from services.retrieval.retriever import Retriever

CARDS = {
    "sentiment": ["How would the sentiment of this sentence be perceived? it was great",
                  "How would the sentiment of this review be perceived? dull and slow", "Is this review positive? yes"],
    "translate": ["Translate to German: the cat sleeps", "Translate to German: my friend reads a book"],
    "question": ["Answer the question: who wrote Hamlet?", "Answer the question: where is Lima?",
                 "Answer this question: what is 2+2?"],
}


def ngrams(text: str) -> Counter:
    """Character n-grams inside each space-padded, lower-cased word; a padded word no longer than n
    counts once, whole, for all such n together."""
    grams = Counter()
    for word in text.lower().split():
        padded = f" {word} "
        grams.update(padded[i:i + n] for n in range(NGRAMS[0], min(NGRAMS[1], len(padded) - 1) + 1)
                     for i in range(len(padded) - n + 1))
        if len(padded) <= NGRAMS[1]:
            grams[padded] += 1
    return grams


def oracle_scores(cards: dict[str, list[str]], prompts: list[str]) -> np.ndarray:
    """TF-IDF (1 + log tf, smoothed idf, unit rows), unit centroid per adapter, cosine, in dicts."""
    docs = [ngrams(t) for texts in cards.values() for t in texts]
    df = Counter(g for d in docs for g in d)
    idf = {g: math.log((1 + len(docs)) / (1 + c)) + 1 for g, c in df.items()}

    def vector(text):
        v = {g: (1 + math.log(c)) * idf[g] for g, c in ngrams(text).items() if g in idf}
        norm = math.sqrt(sum(x * x for x in v.values())) or 1.0
        return {g: x / norm for g, x in v.items()}

    centroids = []
    for texts in cards.values():
        total = Counter()
        for t in texts:
            total.update(vector(t))
        norm = math.sqrt(sum(x * x for x in total.values()))
        centroids.append({g: x / norm for g, x in total.items()})
    return np.array([[sum(x * c.get(g, 0.0) for g, x in vector(p).items()) for c in centroids] for p in prompts])


PROMPTS = ["Translate to German: the dog runs", "How would the sentiment of this tweet be perceived? meh",
           "Answer the question: who painted it?", ""]


def test_lexical_scores_match_the_oracle():
    scores = LexicalIndex(CARDS).scores(PROMPTS)
    np.testing.assert_allclose(scores, oracle_scores(CARDS, PROMPTS), atol=1e-5)
    assert scores.argmax(axis=1)[:3].tolist() == [1, 0, 2] and not scores[3].any()  # no n-gram: all 0


def test_hybrid_rerank_matches_a_full_numpy_ranking(embedder):
    index = AdapterIndex(embedder.dim)
    unit = {name: (v := embedder.encode(texts)) / np.linalg.norm(v, axis=1, keepdims=True) for name, texts in CARDS.items()}
    for name, vectors in unit.items():
        index.upsert(name, vectors)
    weight = 0.3
    retriever = Retriever(embedder, index, LexicalIndex(CARDS), weight)
    results = retriever.retrieve(PROMPTS, top_k=3)

    centroids = np.stack([v.mean(0) / np.linalg.norm(v.mean(0)) for v in unit.values()])  # (adapters, dim)
    queries = embedder.encode(PROMPTS)
    hybrid = weight * (queries / np.linalg.norm(queries, axis=1, keepdims=True)) @ centroids.T \
        + (1 - weight) * oracle_scores(CARDS, PROMPTS)  # (prompts, adapters)
    names = list(CARDS)
    for result, row in zip(results, hybrid):
        order = np.argsort(-row)
        assert [a.name for a in result.adapters] == [names[i] for i in order]
        np.testing.assert_allclose([a.score for a in result.adapters], row[order], atol=1e-4)


def test_the_weight_follows_whichever_side_separates_the_cards():
    rng = np.random.default_rng(0)
    texts = {name: [f"{name} template sample number {i}" for i in range(8)] for name in ("alpha", "bravo", "charlie")}
    noise = {name: rng.normal(size=(8, 16)) for name in texts}  # embeddings that carry no task
    weight, top1 = choose_weight(texts, noise)
    assert set(top1) == set(WEIGHTS) and top1[0.0] == 100.0 and weight < 1.0 and top1[weight] == max(top1.values())

    same = {name: [f"the same words {i}" for i in range(8)] for name in texts}  # texts that carry no task
    clusters = {name: rng.normal(size=16) * 5 + rng.normal(size=(8, 16)) * 0.1 for name in texts}
    weight, top1 = choose_weight(same, clusters)
    assert top1[1.0] == 100.0 and weight == 1.0  # ties go to the embedding


def test_the_weight_is_chosen_under_the_index_scoring():
    """Card a's samples lie on two directions, card b's between them: a held-out sample is told apart
    by the best sample (its nearest card sample), not by the centroid (a's centroid is b's direction)."""
    rng = np.random.default_rng(1)
    e1, e2 = np.eye(16)[0], np.eye(16)[1]
    embeddings = {"a": np.stack([e1 if i % 2 else e2 for i in range(8)]) + rng.normal(size=(8, 16)) * 0.01,
                  "b": np.stack([(e1 + e2) / np.sqrt(2)] * 8) + rng.normal(size=(8, 16)) * 0.01}
    same = {name: [f"the same words {i}" for i in range(8)] for name in embeddings}  # no lexical cue
    _, samples = choose_weight(same, embeddings, scoring="samples")
    _, centroid = choose_weight(same, embeddings)
    assert samples[1.0] == 100.0 and centroid[1.0] <= 75.0


def test_choose_weight_needs_a_card_to_hold_out():
    with pytest.raises(ValueError, match="3 or more"):
        choose_weight({"a": ["x y", "y z"], "b": ["p q", "q r"]}, {"a": np.eye(2), "b": np.eye(2)})
