"""Retriever (embedder + index), evaluation metrics and contrastive fine-tuning on tiny cards."""
from __future__ import annotations

import json
import random

import numpy as np
import pytest

from services.retrieval.embedder import Embedder
from services.retrieval.evaluation import evaluate
from services.retrieval.finetune import TRAINING_INFO_FILE, TrainingInputError, pair_batches, train_retriever
from services.retrieval.index import AdapterIndex
from services.retrieval.retriever import Retriever
from services.schemas import AdapterCard, Query


def test_add_card_returns_the_indexed_embeddings_and_retrieve_finds_the_task(embedder, tiny_cards):
    retriever = Retriever(embedder, AdapterIndex(embedder.dim))
    emb = retriever.add_card(tiny_cards[0], version="3", tenant="t1")
    np.testing.assert_allclose(emb, embedder.encode([s.inputs for s in tiny_cards[0].sample]), atol=1e-6)
    for card in tiny_cards[1:]:
        retriever.add_card(card)
    results = retriever.retrieve(["What is 40 plus 2?", "Translate to French: the dog eats"], top_k=3, tenant="t1")
    assert [r.adapters[0].name for r in results] == ["addition", "to_french"]
    assert results[1].adapters[0].version == "3"
    assert "to_french" not in {a.name for a in retriever.retrieve(["Translate to French: hi"])[0].adapters}


def test_retriever_refuses_an_index_of_another_dimension(embedder):
    with pytest.raises(ValueError, match="384-d"):
        Retriever(embedder, AdapterIndex(8))


def queries_for(pairs):
    return [Query(inputs=t, targets="", task=task, domain=domain, metric="em") for t, task, domain in pairs]


def test_evaluate_counts_hits_per_k_and_domain(embedder, tiny_cards):
    queries = queries_for([("What is 9 plus 9?", "addition", "arithmetic"),
                           ("Spell 'tower' backwards.", "reverse", "strings"),
                           # labelled with the wrong adapter on purpose: a miss at top-1, a hit at top-3
                           ("Reverse the word: apple", "addition", "arithmetic")])
    result = evaluate(Retriever(embedder, AdapterIndex(embedder.dim)), tiny_cards, queries)
    assert result["top1"] == pytest.approx(200 / 3, abs=0.01) and result["top3"] == 100.0
    assert result["per_domain"]["arithmetic"] == {"top1": 50.0, "top3": 100.0, "top5": 100.0, "top8": 100.0, "queries": 2}
    assert result["queries"] == 3 and result["match"] == "task"


def test_exclude_own_reports_domain_hits(embedder, tiny_cards):
    cards = tiny_cards + [AdapterCard(model_name="to_german", domain="translation",
                                      sample=[{"inputs": "Translate to German: the cat sleeps"}])]
    queries = queries_for([("Translate to French: the child runs", "to_french", "translation"),
                           ("What is 5 plus 1?", "addition", "arithmetic")])
    result = evaluate(Retriever(embedder, AdapterIndex(embedder.dim)), cards, queries, exclude_own=True)
    # the French query's best other adapter is the German one (same domain); addition has no other arithmetic adapter
    assert result["match"] == "domain"
    assert result["per_domain"]["translation"]["top1"] == 100.0
    assert result["per_domain"]["arithmetic"]["top8"] == 0.0


def test_pair_batches_never_put_one_adapter_twice_in_a_batch(tiny_cards):
    batches = pair_batches(tiny_cards, epochs=2, batch_size=2, rng=random.Random(0))
    owner = {s.inputs: c.model_name for c in tiny_cards for s in c.sample}
    assert batches
    for batch in batches:
        adapters = [owner[a] for a, _ in batch]
        assert len(batch) >= 2 and len(set(adapters)) == len(adapters)
        assert all(owner[a] == owner[p] for a, p in batch)


def test_fine_tuning_saves_a_model_the_embedder_loads_and_moves_it(tiny_cards, tmp_path, embedder):
    out = train_retriever(tiny_cards, tmp_path / "model", epochs=1, seed=0, progress=False)
    info = json.loads((out / TRAINING_INFO_FILE).read_text())
    assert info["adapters"] == ["addition", "reverse", "to_french"]
    tuned = Embedder(str(out), backend="torch")
    text = ["What is 3 plus 4?"]
    assert tuned.dim == 384
    assert not np.allclose(tuned.encode(text), embedder.encode(text), atol=1e-4)  # the weights did change
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no staging folder left behind


@pytest.mark.parametrize("mutate,match", [
    (lambda cards: cards[:1], "at least 2 adapters"),
    (lambda cards: cards + cards[:1], "appears twice"),
    (lambda cards: [*cards[:2], cards[2].model_copy(update={"sample": cards[2].sample[:1]})], "at least 2 samples"),
])
def test_bad_training_cards_are_refused_before_anything_is_written(tiny_cards, tmp_path, mutate, match):
    with pytest.raises(TrainingInputError, match=match):
        train_retriever(mutate(tiny_cards), tmp_path / "model", epochs=1)
    assert not (tmp_path / "model").exists()


def test_training_refuses_a_non_empty_output_folder(tiny_cards, tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "keep.txt").write_text("x")
    with pytest.raises(TrainingInputError, match="not empty"):
        train_retriever(tiny_cards, tmp_path / "model", epochs=1)
    assert [p.name for p in (tmp_path / "model").iterdir()] == ["keep.txt"]
