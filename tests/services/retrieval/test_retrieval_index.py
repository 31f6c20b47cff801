"""AdapterIndex against a numpy oracle: scores, filters, replacement, removal, batched search, bad input.

Every behaviour is checked on both search paths: the in-memory search of the embedded index and
Qdrant's own search (the path a Qdrant server takes), run here on embedded Qdrant."""
from __future__ import annotations

import numpy as np
import pytest

from services.retrieval.index import AdapterIndex, IndexInputError

DIM = 16


def unit(rows: np.ndarray) -> np.ndarray:
    return rows / np.linalg.norm(rows, axis=-1, keepdims=True)


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture
def cards(rng):
    """Five adapters of 2 to 6 random sample embeddings each."""
    return {f"a{i}": rng.normal(size=(2 + i, DIM)).astype(np.float32) for i in range(5)}


@pytest.fixture(params=[True, False], ids=["in-memory", "qdrant"])
def make(request):
    """AdapterIndex constructor for one search path."""
    return lambda *args, **kw: AdapterIndex(*args, memory_search=request.param, **kw)


@pytest.fixture
def index(cards, make):
    idx = make(DIM)
    for name, samples in cards.items():
        idx.upsert(name, samples)
    return idx


def oracle(cards: dict, query: np.ndarray, scoring: str, m: int = 1) -> list[tuple[str, float]]:
    """Scores computed directly: cosine to the normalised mean, or mean of the best m sample cosines."""
    scores = {}
    for name, samples in cards.items():
        sims = unit(samples) @ unit(query)  # (samples,)
        scores[name] = (float(unit(unit(samples).mean(0)) @ unit(query)) if scoring == "centroid"
                        else float(np.sort(sims)[::-1][:m].mean()))
    return sorted(scores.items(), key=lambda kv: -kv[1])


@pytest.mark.parametrize("scoring,m", [("centroid", 1), ("samples", 1), ("samples", 3)])
def test_scores_and_order_match_the_oracle(cards, rng, make, scoring, m):
    idx = make(DIM, scoring=scoring, sample_top_m=m)
    for name, samples in cards.items():
        idx.upsert(name, samples)
    queries = rng.normal(size=(4, DIM)).astype(np.float32)
    for query, result in zip(queries, idx.search(queries, top_k=3)):
        expected = oracle(cards, query, scoring, m)[:3]
        assert [a.name for a in result.adapters] == [n for n, _ in expected]
        np.testing.assert_allclose([a.score for a in result.adapters], [s for _, s in expected], atol=1e-5)


def test_a_query_equal_to_an_adapter_centroid_finds_it_with_score_one(index, cards):
    query = unit(unit(cards["a3"]).mean(0))[None, :]
    best = index.search(query, top_k=1)[0].adapters[0]
    assert best.name == "a3" and best.score == pytest.approx(1.0, abs=1e-5)
    assert index.search(query, top_k=1, scoring="samples")[0].adapters[0].score < 1.0


def test_tenant_visibility(cards, rng, make):
    idx = make(DIM)
    idx.upsert("shared", cards["a0"])
    idx.upsert("mine", cards["a1"], tenant="t1")
    idx.upsert("theirs", cards["a2"], tenant="t2")
    query = rng.normal(size=(1, DIM))
    seen = {t: {a.name for a in idx.search(query, top_k=5, tenant=t)[0].adapters} for t in (None, "t1", "t2")}
    assert seen == {None: {"shared"}, "t1": {"shared", "mine"}, "t2": {"shared", "theirs"}}


def test_base_model_filter_exclusion_and_min_similarity(cards, make):
    idx = make(DIM)
    idx.upsert("llama", cards["a0"], base_model="llama", version="7")
    idx.upsert("smol", cards["a1"], base_model="smol")
    idx.upsert("smol2", cards["a2"], base_model="smol")
    query = unit(cards["a0"].mean(0))[None, :]
    assert [a.name for a in idx.search(query, base_model="llama")[0].adapters] == ["llama"]
    assert idx.search(query, base_model="llama")[0].adapters[0].version == "7"
    assert "llama" not in {a.name for a in idx.search(query, exclude=["llama"])[0].adapters}
    assert idx.search(query, min_similarity=0.999)[0].adapters == []  # no adapter fits: base model
    kept = idx.search(query, top_k=3, min_similarity=0.0)[0].adapters
    assert kept and all(a.score >= 0.0 for a in kept)


def test_replacing_an_adapter_drops_its_old_samples(cards, rng, make):
    idx = make(DIM, scoring="samples")
    idx.upsert("x", cards["a4"])  # 6 samples
    new = rng.normal(size=(2, DIM)).astype(np.float32)
    idx.upsert("x", new, version="2")
    for old in cards["a4"]:
        hit = idx.search(old[None, :], top_k=1)[0].adapters[0]
        assert hit.version == "2"
        assert hit.score == pytest.approx(float((unit(new) @ unit(old)).max()), abs=1e-5)
    assert idx.names() == ["x"]
    assert len(idx.client.scroll(idx.collection, limit=100)[0]) == 3  # centroid + 2 samples: none left behind


def test_batched_search_equals_one_query_at_a_time_with_per_row_options(index, cards, rng):
    queries = rng.normal(size=(6, DIM)).astype(np.float32)
    options = [{"top_k": 2}, {"top_k": 4, "exclude": ["a1", "a3"]}, {"scoring": "samples"},
               {"min_similarity": 0.1, "top_k": 5}, {"top_k": 2}, {"top_k": 3, "tenant": "t9"}]
    batched = index.search_batch(queries, options)
    alone = [index.search(q[None, :], **o)[0] for q, o in zip(queries, options)]
    for b, a in zip(batched, alone):
        assert [(x.name, x.version) for x in b.adapters] == [(x.name, x.version) for x in a.adapters]
        np.testing.assert_allclose([x.score for x in b.adapters], [x.score for x in a.adapters], atol=1e-6)
    assert [len(r.adapters) for r in batched][:3] == [2, 3, 3] and {"a1", "a3"}.isdisjoint(
        a.name for a in batched[1].adapters)


def test_batched_search_makes_one_qdrant_call_for_centroid_rows(cards, rng):
    idx = AdapterIndex(DIM, memory_search=False)
    for name, samples in cards.items():
        idx.upsert(name, samples)
    calls = []
    real = idx.client.query_batch_points
    idx.client.query_batch_points = lambda *a, **kw: calls.append(len(kw["requests"])) or real(*a, **kw)
    idx.search_batch(rng.normal(size=(5, DIM)), [{"top_k": k, "exclude": ["a0"] * (k % 2)} for k in range(1, 6)])
    assert calls == [5]


def test_a_folder_index_reloads_its_in_memory_copy_with_tenants_and_versions(tmp_path, cards, rng):
    idx = AdapterIndex(DIM, path=str(tmp_path / "q"))
    idx.upsert("mine", cards["a1"], tenant="t1", version="4")
    idx.upsert("shared", cards["a2"])
    idx.client.close()
    reopened = AdapterIndex(DIM, path=str(tmp_path / "q"))
    query = unit(unit(cards["a1"]).mean(0))[None, :]
    assert [a.name for a in reopened.search(query, top_k=2)[0].adapters] == ["shared"]
    best = reopened.search(query, top_k=2, tenant="t1")[0].adapters[0]
    assert (best.name, best.version) == ("mine", "4") and best.score == pytest.approx(1.0, abs=1e-5)
    reopened.client.close()


def test_remove_is_visible_at_once_and_idempotent(index, cards):
    index.remove("a2")
    index.remove("a2")
    assert index.names() == ["a0", "a1", "a3", "a4"]
    query = unit(cards["a2"].mean(0))[None, :]
    assert "a2" not in {a.name for a in index.search(query, top_k=8)[0].adapters}


def test_index_in_a_folder_survives_reopening(tmp_path, cards):
    idx = AdapterIndex(DIM, path=str(tmp_path / "q"))
    idx.upsert("a0", cards["a0"])
    idx.client.close()
    reopened = AdapterIndex(DIM, path=str(tmp_path / "q"))
    assert reopened.names() == ["a0"]
    reopened.client.close()
    with pytest.raises(IndexInputError, match="holds 16-d vectors"):
        AdapterIndex(DIM + 1, path=str(tmp_path / "q"))


@pytest.mark.parametrize("call,match", [
    (lambda idx: idx.upsert("x", np.ones((3, DIM + 1))), r"shape \(n, 16\)"),
    (lambda idx: idx.upsert("x", np.zeros((0, DIM))), "at least one sample"),
    (lambda idx: idx.upsert("x", np.full((1, DIM), np.nan)), "NaN"),
    (lambda idx: idx.upsert("", np.ones((1, DIM))), "non-empty"),
    (lambda idx: idx.upsert("x", np.ones((1, DIM)), tenant=""), "tenant"),
    (lambda idx: idx.search(np.ones(DIM)), r"shape \(n, 16\)"),
    (lambda idx: idx.search(np.ones((1, DIM)), top_k=0), "top_k"),
    (lambda idx: idx.search(np.ones((1, DIM)), scoring="best"), "scoring"),
    (lambda idx: idx.search_batch(np.ones((2, DIM)), [{}]), "2 queries and 1 option"),
    (lambda idx: idx.search_batch(np.ones((1, DIM)), [{"topk": 3}]), "unknown search option"),
])
def test_bad_input_is_refused_with_a_named_error(index, call, match):
    with pytest.raises(IndexInputError, match=match):
        call(index)
