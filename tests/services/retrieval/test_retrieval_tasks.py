"""The synthetic task generator: valid files, distinct samples, queries never repeating a card sample."""
from __future__ import annotations

from cluster.bench.retrieval_tasks import TASKS, generate, write_task_files
from services.retrieval.evaluation import load_cards, load_queries


def test_generated_files_load_and_queries_do_not_repeat_card_samples(tmp_path):
    cards_path, queries_path = write_task_files(tmp_path, seed=1, samples_per_card=20, queries_per_task=5)
    cards = load_cards(cards_path)
    queries = load_queries(queries_path, cards)
    assert len(cards) == len(TASKS) == 54 and len(queries) == 54 * 5
    assert len({c.domain for c in cards}) == 9
    for card in cards:
        inputs = {s.inputs for s in card.sample}
        assert len(inputs) == 20
        assert not inputs & {q.inputs for q in queries if q.task == card.model_name}


def test_generation_is_deterministic_per_seed():
    assert generate(seed=3, samples_per_card=2, queries_per_task=1) == generate(seed=3, samples_per_card=2, queries_per_task=1)
    assert generate(seed=3, samples_per_card=2, queries_per_task=1) != generate(seed=4, samples_per_card=2, queries_per_task=1)
