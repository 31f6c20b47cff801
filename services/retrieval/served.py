"""How a retriever model folder is served, recorded beside it, and the Retriever that serves it so.

A tuning run (services/retrieval/tuning.py: `tune_cards`, the registry's `model_versions.tune`)
chooses a runtime, a scoring and a hybrid weight for the model it keeps, and writes them into the
folder as `loraretriever_serving.json`; replicas take them from the model version, and
`eval retrieval --embedder DIR` and the benches from the folder, so an offline measurement of a
folder is the product's default path. A folder without the file (the configured embedder, a
model trained elsewhere) serves as the configured embedder does: float32, centroid, hybrid with
the weight chosen on the cards being searched (`retrieval.hybrid`, services/serving/lexical_follower.py).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from services.retrieval import DEFAULT_INSTRUCTION, DEFAULT_MAX_SEQ_LENGTH
from services.schemas import AdapterCard

SERVING_FILE = "loraretriever_serving.json"


@dataclass(frozen=True)
class Serving:
    backend: str = "onnx"
    scoring: str = "centroid"
    hybrid_weight: float | None = None  # the embedding's share; None: chosen on the cards searched, 1.0: embedding alone


def write_serving(folder: Path, serving: Serving, **measured) -> None:
    """Record the serving (and what it was chosen on) in the model folder."""
    (Path(folder) / SERVING_FILE).write_text(json.dumps({**asdict(serving), **measured}, indent=1))


def read_serving(folder: str | Path | None) -> Serving | None:
    """The serving recorded in a model folder; None for the packaged model or a folder without one."""
    path = Path(folder) / SERVING_FILE if folder else None
    if path is None or not path.is_file():
        return None
    raw = json.loads(path.read_text())
    return Serving(backend=raw["backend"], scoring=raw["scoring"], hybrid_weight=raw["hybrid_weight"])


def served_retriever(model_path: str | Path | None, cards: list[AdapterCard], serving: Serving, *,
                     instruction: str = DEFAULT_INSTRUCTION, threads: int | None = 1, max_seq_length: int = DEFAULT_MAX_SEQ_LENGTH):
    """(Retriever, embedding weight) serving `model_path` over `cards` the way `serving` says; a weight
    of None is chosen on the cards (lexical.choose_weight), 1.0 where no card can hold a sample out.
    The cards are not indexed yet (evaluation.evaluate indexes them); their embeddings are cached, so
    choosing the weight costs no second encoding."""
    from services.retrieval.embedder import Embedder
    from services.retrieval.index import AdapterIndex
    from services.retrieval.lexical import LexicalIndex, choose_weight
    from services.retrieval.retriever import Retriever

    embedder = Embedder(str(model_path) if model_path else None, instruction, backend=serving.backend, threads=threads,
                        max_seq_length=max_seq_length, cache_entries=100_000)
    texts = {c.model_name: [s.inputs for s in c.sample] for c in cards}
    weight = serving.hybrid_weight
    if weight is None:
        try:
            weight = choose_weight(texts, {name: embedder.encode(t) for name, t in texts.items()},
                                   scoring=serving.scoring)[0]
        except ValueError:  # no card has 3 samples to hold one out: the embedding alone, as replicas do
            weight = 1.0
    lexical = LexicalIndex(texts) if weight < 1.0 else None
    return Retriever(embedder, AdapterIndex(embedder.dim, scoring=serving.scoring), lexical, weight), weight
