"""The hybrid score's lexical side follows the registry: built from the active cards at the first
refresh, rebuilt when an adapter is retired, its weight chosen on the cards; search options are
widened to the hybrid's candidates and each result cut back to its own top_k. Real registry
(redis-server, tiny zoo registered through the admin path), real embedder and embedded index."""
from __future__ import annotations

import numpy as np
import pytest
from registered_zoo import register_tiny_zoo

from services.retrieval.index import AdapterIndex
from services.retrieval.lexical import LexicalIndex, blend
from services.retrieval.lexical import HYBRID_CANDIDATES
from services.serving.index_sync import IndexSync
from services.serving.lexical_follower import LexicalFollower


@pytest.fixture
def registered(tiny_zoo, redis_server, tmp_path):
    admin, client, _ = register_tiny_zoo(tiny_zoo, redis_server, tmp_path / "store", db=9)
    yield admin
    client.flushdb()


def test_follows_the_registry_and_reranks_by_the_hybrid_score(registered, tiny_zoo):
    registry, embedder = registered.registry, registered.embedder
    follower = LexicalFollower(registry)
    follower.refresh()
    lexical, weight = follower.state
    cards = {c.model_name: [s.inputs for s in c.sample] for c in tiny_zoo.cards}
    assert sorted(lexical.names) == sorted(cards)
    assert 0.0 <= weight <= 1.0 and follower.inner_top1[weight] == max(follower.inner_top1.values())

    index = IndexSync(registry, AdapterIndex(embedder.dim)).refresh(force=True)
    prompts = [q.inputs for q in tiny_zoo.queries[:6]]
    options = [{"top_k": 1}, {"top_k": 2}] * 3
    wide = follower.widen(options)
    # widened only when the lexical side has a share of the score
    assert [o["top_k"] for o in wide] == ([HYBRID_CANDIDATES] * 6 if weight < 1.0 else [1, 2] * 3)
    vectors = embedder.encode(prompts)  # (prompts, dim)
    results = follower.rerank(index.search_batch(vectors, wide), prompts, options)
    assert [len(r.adapters) for r in results] == [1, 2] * 3

    # the oracle: every adapter scored in numpy, embedding centroids from the registry's card embeddings
    names = lexical.names
    centroids = np.stack([(v := registry.card_embeddings(n)).mean(0) / np.linalg.norm(v.mean(0)) for n in names])
    emb = (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)) @ centroids.T
    hybrid = blend(emb, LexicalIndex({n: cards[n] for n in names}).scores(prompts), weight)  # (prompts, adapters)
    for result, row, o in zip(results, hybrid, options):
        assert [a.name for a in result.adapters] == [names[i] for i in np.argsort(-row)[:o["top_k"]]]

    gone = names[0]
    registry.retire(gone)
    generation = follower.generation
    follower.refresh()
    assert follower.generation != generation and gone not in follower.state[0].names


def test_a_configured_weight_is_kept_and_weight_one_leaves_the_embedding_order(registered):
    follower = LexicalFollower(registered.registry, weight=1.0)
    follower.refresh()
    assert follower.state[1] == 1.0 and follower.inner_top1 == {}
    index = IndexSync(registered.registry, AdapterIndex(registered.embedder.dim)).refresh(force=True)
    vectors = registered.embedder.encode(["What is 2 plus 2?"])
    assert follower.widen([{"top_k": 2}]) == [{"top_k": 2}]  # nothing to re-rank: no wider search
    # a tuned model's own weight (chosen at its tuning) overrides the follower's for its batches
    assert follower.widen([{"top_k": 2}], 0.6) == [{"top_k": HYBRID_CANDIDATES}]
    wide = index.search_batch(vectors, [{"top_k": 5}])
    assert follower.rerank(wide, ["What is 2 plus 2?"], [{"top_k": 2}])[0].adapters == wide[0].adapters[:2]
