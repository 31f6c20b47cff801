"""Train a candidate retriever on registered adapters' cards and score it against the current one.

The one entry point the registry-driven tuning (services/retrieval/model_versions.py) calls:
`train_candidate`. The training recipe underneath (services/retrieval/finetune.py) may change;
this signature does not. Scores are top-1 percentages of held-out card samples, searched among
every adapter's training samples: the same split for both models, each scored as replicas serve it:
with `hybrid` (the serving default, retrieval.hybrid) the configured embedder's candidates are
re-ranked by the hybrid score (weight chosen on the training samples); a tuned model serves by its
embedding alone (docs/retrieval.md: tuned, it gains nothing from the lexical side), with the
scoring that wins on this split: the centroid of the training samples, or the best one of them
(`samples`; tuned, it led the centroid in every fold of the Flan k-fold, untuned it trails by 12
points), on the float32 or the int8 runtime (int8 where it keeps the top-1 within a point). The
choice is recorded with the model and replicas serve it that way."""
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
    candidate_top1: float  # percent of held-out samples whose own adapter ranks first, under `scoring`
    current_top1: float
    scoring: str  # the index scoring and embedder runtime it is served with (choose_serving)
    backend: str
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


SCORINGS = ("centroid", "samples")
RUNTIMES = ("onnx", "onnx-int8")  # float32 first: the reference int8 is held to
INT8_TOLERANCE = 1.0  # top-1 points int8 may give away to float32 on the held-out samples and still be served


def top1(model_dir: str | Path | None, train_cards: list[AdapterCard], heldout_cards: list[AdapterCard],
         instruction: str, hybrid: bool = False, scorings: tuple[str, ...] = ("centroid",),
         backend: str = "onnx") -> dict[str, float]:
    """Top-1 % of the held-out samples among all adapters indexed by their training samples, per
    index scoring (centroid; samples: the best sample), on one embedder runtime. Each text is
    embedded once for all scorings."""
    from services.retrieval.embedder import Embedder
    from services.retrieval.evaluation import evaluate
    from services.retrieval.index import AdapterIndex
    from services.retrieval.lexical import LexicalIndex, choose_weight
    from services.retrieval.retriever import Retriever

    embedder = Embedder(str(model_dir) if model_dir else None, instruction, backend=backend, threads=1,
                        cache_entries=100_000)
    queries = [Query(inputs=s.inputs, targets=s.targets, task=c.model_name, domain=c.domain or "-", metric="em")
               for c in heldout_cards for s in c.sample]
    lexical, weight = None, 1.0
    texts = {c.model_name: [s.inputs for s in c.sample] for c in train_cards}
    if hybrid and any(len(t) >= 3 for t in texts.values()):
        weight = choose_weight(texts, {name: embedder.encode(t) for name, t in texts.items()})[0]
        lexical = LexicalIndex(texts)
    return {s: evaluate(Retriever(embedder, AdapterIndex(embedder.dim, scoring=s), lexical, weight), train_cards,
                        queries)["top1"] for s in scorings}


def choose_serving(per_runtime: dict[str, dict[str, float]]) -> tuple[str, str]:
    """(runtime, scoring) a tuned model is served with: float32's better scoring (ties: centroid, the
    cheaper search), on int8 when int8 keeps that top-1 within INT8_TOLERANCE points (a third or
    less of float32's CPU on long prompts, docs/retrieval.md)."""
    scoring = max(SCORINGS, key=lambda s: per_runtime["onnx"][s])
    int8_holds = per_runtime["onnx-int8"][scoring] >= per_runtime["onnx"][scoring] - INT8_TOLERANCE
    return ("onnx-int8" if int8_holds else "onnx"), scoring


def train_candidate(train_cards: list[AdapterCard], heldout_cards: list[AdapterCard], out_dir: Path, *,
                    current_model: str | None, current_serving: tuple[str, str] | None = None,
                    instruction: str = DEFAULT_INSTRUCTION, seed: int = 0, epochs: int | None = 2,
                    hybrid: bool = False, progress: Callable[[str], None] | None = None) -> CandidateResult:
    """Fine-tune from the packaged embedder on `train_cards` into out_dir (written only on success),
    then score it (each runtime and scoring) and `current_model` on `heldout_cards`. current_model:
    a tuned folder served with current_serving (runtime, scoring), or None for the configured
    embedder (float32, centroid, hybrid when `hybrid`). epochs None: the recipe's early stopping."""
    from services.retrieval.finetune import train_retriever

    say = progress or (lambda message: None)
    say(f"scoring the current model on {sum(len(c.sample) for c in heldout_cards)} held-out samples")
    backend, scoring = current_serving or ("onnx", "centroid")
    current = top1(current_model, train_cards, heldout_cards, instruction, hybrid and current_model is None,
                   (scoring,), backend)[scoring]
    say(f"current model: top-1 {current:.1f}%; training a candidate on {len(train_cards)} adapters")
    train_retriever(train_cards, out_dir, epochs=epochs, seed=seed, instruction=instruction, progress=False)
    per_runtime = {b: top1(out_dir, train_cards, heldout_cards, instruction, scorings=SCORINGS, backend=b)
                   for b in RUNTIMES}
    backend, scoring = choose_serving(per_runtime)
    say(f"candidate: top-1 {per_runtime[backend][scoring]:.1f}% on {backend} with {scoring} scoring "
        f"({per_runtime}); current {current:.1f}%")
    return CandidateResult(Path(out_dir), per_runtime[backend][scoring], current, scoring, backend,
                           {"epochs": epochs, "seed": seed, "adapters": len(train_cards), "hybrid": hybrid,
                            "heldout_samples": sum(len(c.sample) for c in heldout_cards),
                            "candidate_top1_per_runtime": per_runtime})
