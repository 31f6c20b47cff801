"""Train a candidate retriever on registered adapters' cards and score it against the current one.

The one entry point the registry-driven tuning (services/retrieval/model_versions.py) calls:
`train_candidate`. The training recipe underneath (services/retrieval/finetune.py) may change;
this signature does not. Scores are top-1 percentages of held-out card samples, searched among
every adapter's centroid built from its training samples: the same split for both models, each
scored as replicas serve it: with `hybrid` (the serving default, retrieval.hybrid) the configured
embedder's candidates are re-ranked by the hybrid score (weight chosen on the training samples); a
tuned model serves by its embedding alone (docs/retrieval.md: tuned, it gains nothing from the
lexical side)."""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from services.retrieval import DEFAULT_INSTRUCTION
from services.schemas import AdapterCard, Query


@dataclass
class CandidateResult:
    model_dir: Path
    candidate_top1: float  # percent of held-out samples whose own adapter ranks first
    current_top1: float
    details: dict = field(default_factory=dict)


def split_cards(cards: list[AdapterCard], heldout_fraction: float = 0.25,
                seed: int = 0) -> tuple[list[AdapterCard], list[AdapterCard]]:
    """(train cards, held-out cards): per adapter a seeded shuffle of its samples, `heldout_fraction`
    of them (at least 1) held out, at least 2 kept for training (anchor and positive). Adapters with
    fewer than 3 samples are trained on and never held out."""
    rng = random.Random(seed)
    train, heldout = [], []
    for card in cards:
        samples = list(card.sample)
        rng.shuffle(samples)
        n_out = max(1, round(len(samples) * heldout_fraction)) if len(samples) >= 3 else 0
        n_out = min(n_out, len(samples) - 2)
        train.append(card.model_copy(update={"sample": samples[n_out:]}))
        if n_out:
            heldout.append(card.model_copy(update={"sample": samples[:n_out]}))
    return train, heldout


def top1(model_dir: str | Path | None, train_cards: list[AdapterCard], heldout_cards: list[AdapterCard],
         instruction: str, hybrid: bool = False) -> float:
    """Top-1 % of the held-out samples among all adapters (centroids of their training samples)."""
    from services.retrieval.embedder import Embedder
    from services.retrieval.evaluation import evaluate
    from services.retrieval.index import AdapterIndex
    from services.retrieval.lexical import LexicalIndex, choose_weight
    from services.retrieval.retriever import Retriever

    embedder = Embedder(str(model_dir) if model_dir else None, instruction, backend="torch", threads=1)
    queries = [Query(inputs=s.inputs, targets=s.targets, task=c.model_name, domain=c.domain or "-", metric="em")
               for c in heldout_cards for s in c.sample]
    lexical, weight = None, 1.0
    texts = {c.model_name: [s.inputs for s in c.sample] for c in train_cards}
    if hybrid and any(len(t) >= 3 for t in texts.values()):
        weight = choose_weight(texts, {name: embedder.encode(t) for name, t in texts.items()})[0]
        lexical = LexicalIndex(texts)
    return evaluate(Retriever(embedder, AdapterIndex(embedder.dim), lexical, weight), train_cards, queries)["top1"]


def train_candidate(train_cards: list[AdapterCard], heldout_cards: list[AdapterCard], out_dir: Path, *,
                    current_model: str | None, instruction: str = DEFAULT_INSTRUCTION, seed: int = 0,
                    epochs: int = 2, hybrid: bool = False,
                    progress: Callable[[str], None] | None = None) -> CandidateResult:
    """Fine-tune from the packaged embedder on `train_cards` into out_dir (written only on success),
    then score it and `current_model` (a folder; None = the packaged model) on `heldout_cards`."""
    from services.retrieval.finetune import train_retriever

    say = progress or (lambda message: None)
    say(f"scoring the current model on {sum(len(c.sample) for c in heldout_cards)} held-out samples")
    current = top1(current_model, train_cards, heldout_cards, instruction, hybrid and current_model is None)
    say(f"current model: top-1 {current:.1f}%; training a candidate on {len(train_cards)} adapters, {epochs} epochs")
    train_retriever(train_cards, out_dir, epochs=epochs, seed=seed, instruction=instruction, progress=False)
    candidate = top1(out_dir, train_cards, heldout_cards, instruction)
    say(f"candidate: top-1 {candidate:.1f}% (current {current:.1f}%)")
    return CandidateResult(Path(out_dir), candidate, current,
                           {"epochs": epochs, "seed": seed, "adapters": len(train_cards), "hybrid": hybrid,
                            "heldout_samples": sum(len(c.sample) for c in heldout_cards)})
