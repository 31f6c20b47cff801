"""The embedder's cache of recent prompts: same vectors as encoding, bounded, counted, safe to share."""
from __future__ import annotations

import numpy as np
import pytest

from services.retrieval.embedder import Embedder
from services.retrieval.embedding_cache import EmbeddingCache

TEXTS = ["Reverse the word: lamp", "What is 3 plus 4?", "Translate to German: the teacher works"]


@pytest.fixture(scope="module")
def cached():
    return Embedder(backend="onnx", cache_entries=4)


@pytest.fixture(scope="module")
def plain():
    return Embedder(backend="onnx")


def test_cached_vectors_equal_fresh_encodings_in_the_callers_order(cached, plain):
    first = cached.encode(TEXTS)
    again = cached.encode(TEXTS[::-1] + [TEXTS[0]])  # all from the cache, another order, one twice
    np.testing.assert_allclose(first, plain.encode(TEXTS), atol=1e-6)
    np.testing.assert_array_equal(again, np.stack([first[2], first[1], first[0], first[0]]))


def test_only_missing_texts_reach_the_model_and_a_repeat_within_a_batch_once(monkeypatch):
    embedder = Embedder(backend="onnx", cache_entries=8)
    seen = []
    real = embedder._encode
    monkeypatch.setattr(embedder, "_encode", lambda texts, progress: seen.append(texts) or real(texts, progress))
    embedder.encode(TEXTS[:2])
    embedder.encode(TEXTS + [TEXTS[2]])
    assert [len(batch) for batch in seen] == [2, 1]  # the second call embeds the third text, once
    assert seen[1] == [embedder.instruction + TEXTS[2]]
    assert embedder.cache.stats() == {"hits": 2, "misses": 4, "size": 3, "entries": 8}


def test_the_cache_holds_at_most_its_entries_least_recently_used_out():
    cache = EmbeddingCache(2)
    vectors = np.eye(3, dtype=np.float32)  # (3, 3)
    _, keys = cache.lookup(["a", "b", "c"])
    cache.store(keys[:2], vectors[:2])
    cache.lookup(["a"])  # a is now the most recent
    cache.store(keys[2:], vectors[2:])  # evicts b
    found, _ = cache.lookup(["a", "b", "c"])
    assert found[1] is None
    np.testing.assert_array_equal(found[0], vectors[0])
    np.testing.assert_array_equal(found[2], vectors[2])
    assert cache.stats()["size"] == 2


def test_callers_cannot_alter_a_cached_vector(cached):
    out = cached.encode(TEXTS[:1])
    out[0] = 0.0  # the result is the caller's own array
    assert np.linalg.norm(cached.encode(TEXTS[:1])[0]) == pytest.approx(1.0, abs=1e-5)
    found, _ = cached.cache.lookup(TEXTS[:1])
    with pytest.raises(ValueError):
        found[0][0] = 1.0


def test_off_by_default_and_refuses_a_negative_size():
    assert Embedder(backend="onnx").cache.entries == 0
    with pytest.raises(ValueError, match="at least 0"):
        EmbeddingCache(-1)
