"""The packaged all-MiniLM-L6-v2, loaded once, and three tiny, clearly different adapter cards."""
from __future__ import annotations

import pytest

from services.schemas import AdapterCard


@pytest.fixture(scope="session")
def embedder():
    from services.retrieval.embedder import Embedder

    return Embedder()


@pytest.fixture
def tiny_cards() -> list[AdapterCard]:
    def card(name, domain, texts):
        return AdapterCard(model_name=name, domain=domain, sample=[{"inputs": t, "targets": ""} for t in texts])

    return [
        card("to_french", "translation", ["Translate to French: the cat sleeps", "Translate to French: my friend reads",
                                          "How do you say 'the dog runs' in French?", "Translate to French: the bird sings"]),
        card("addition", "arithmetic", ["What is 3 plus 4?", "Add 12 and 30.", "Compute 7 + 8.", "What is 21 plus 5?"]),
        card("reverse", "strings", ["Reverse the word: lamp", "Spell 'river' backwards.", "Reverse the word: stone",
                                    "Write garden in reverse order."]),
    ]
