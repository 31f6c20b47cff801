"""Retriever (embedder + index), evaluation metrics and contrastive fine-tuning on tiny cards."""
from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from services.retrieval.embedder import Embedder
from services.retrieval.evaluation import evaluate
from services.retrieval.finetune import (TRAINING_INFO_FILE, Recipe, TrainingInputError, _Trainer, split_samples,
                                         step_groups, train_retriever)
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


def test_prototype_loss_matches_a_loop_over_samples(tiny_cards):
    """The vectorised leave-one-out loss against the definition written sample by sample."""
    trainer = _Trainer(tiny_cards, Recipe(layers=1, bf16=False), "", None)
    draw = [(0, [0, 1, 2]), (1, [0, 3]), (2, [1, 2, 3])]
    with torch.no_grad():
        loss = trainer.loss(draw)
        terms = []
        vectors = {(c, s): trainer.embed([trainer.ids[c][s]])[0] for c, samples in draw for s in samples}
        for c, samples in draw:
            for s in samples:
                logits = []
                for other, their in draw:
                    members = [vectors[(other, t)] for t in their if (other, t) != (c, s)]
                    centroid = torch.nn.functional.normalize(torch.stack(members).mean(0), dim=0)
                    logits.append(20.0 * torch.dot(vectors[(c, s)], centroid))
                terms.append(-torch.log_softmax(torch.stack(logits), 0)[[o for o, _ in draw].index(c)])
    assert loss.item() == pytest.approx(torch.stack(terms).mean().item(), rel=1e-5)


def test_step_groups_put_near_adapters_together_and_cover_all():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 16))
    rows = np.concatenate([c + 0.05 * rng.normal(size=(4, 16)) for c in centres])  # 3 families of 4 adapters
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    groups = step_groups(rows, 4, True, random.Random(0))
    assert sorted(a for g in groups for a in g) == list(range(12))
    assert sorted(sorted(g) for g in groups) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    assert sorted(len(g) for g in step_groups(rows, 5, False, random.Random(0))) == [2, 5, 5]


def test_split_samples_keeps_two_for_training():
    train, held = split_samples([20, 4, 2], 0.25, random.Random(0))
    assert [len(h) for h in held] == [5, 1, 0] and [len(t) for t in train] == [15, 3, 2]
    assert all(not set(t) & set(h) for t, h in zip(train, held))


def test_fine_tuning_saves_a_model_the_embedder_loads_and_moves_it(tiny_cards, tmp_path, embedder):
    out = train_retriever(tiny_cards, tmp_path / "model", epochs=1, seed=0, progress=False,
                          recipe=Recipe(layers=2, max_seq_length=128, heldout_fraction=0.0))  # all samples train
    info = json.loads((out / TRAINING_INFO_FILE).read_text())
    assert info["adapters"] == ["addition", "reverse", "to_french"] and info["epoch_kept"] == 1
    tuned = Embedder(str(out), backend="torch")
    assert (tuned.cut, tuned.max_seq_length) == ("head_tail", 128)  # the recipe's cut and length, recorded beside it
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 2  # the student's depth
    text = ["What is 3 plus 4?"]
    assert tuned.dim == 384
    assert not np.allclose(tuned.encode(text), embedder.encode(text), atol=1e-4)  # the weights did change
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no staging folder left behind


def test_early_stopping_keeps_an_epoch_no_worse_than_the_untrained_student(tiny_cards, tmp_path):
    out = train_retriever(tiny_cards, tmp_path / "model", epochs=2, seed=0, progress=False,
                          recipe=Recipe(layers=1, heldout_fraction=0.25))
    info = json.loads((out / TRAINING_INFO_FILE).read_text())
    assert 1 <= len(info["heldout_top1_per_epoch"]) <= 2 and 0 <= info["epoch_kept"] <= 2
    best = max([info["heldout_top1_before"], *info["heldout_top1_per_epoch"]])
    assert info["heldout_top1_after"] == pytest.approx(best, abs=0.01)


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
