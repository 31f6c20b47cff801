"""Train a candidate retriever on registered adapters' cards and score it against the current one.

The one entry point the registry-driven tuning (services/retrieval/model_versions.py) calls:
`train_candidate`. The training recipe underneath (services/retrieval/finetune.py) may change;
this signature does not. Scores are top-1 percentages of held-out card samples, searched among
every adapter's training samples: the same split for both models, each scored as replicas serve it.
The configured embedder serves on float32 by centroid, re-ranked by the hybrid score with `hybrid`
(the serving default, retrieval.hybrid). A tuned candidate is scored every way it could be served
(`SERVINGS`: centroid or best sample, embedding alone or hybrid, its weight chosen on the training
samples under that scoring; float32 and int8) and `choose_serving` picks one: float32's best, on
int8 where int8 keeps that top-1 within a point. The choice is recorded with the model and
replicas serve it that way (docs/retrieval.md has the k-fold measurements behind each option)."""
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
    scoring: str  # how it is served (choose_serving): index scoring, embedder runtime, hybrid weight (1.0: none)
    backend: str
    hybrid_weight: float
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
# (scoring, hybrid) ways to serve a tuned model, cheapest first: a tie goes to the earlier
SERVINGS = (("centroid", False), ("samples", False), ("centroid", True), ("samples", True))
RUNTIMES = ("onnx", "onnx-int8")  # float32 first: the reference int8 is held to
INT8_TOLERANCE = 1.0  # top-1 points int8 may give away to float32 on the held-out samples and still be served


def serving_key(scoring: str, hybrid: bool) -> str:
    return f"{scoring}+hybrid" if hybrid else scoring


def top1(model_dir: str | Path | None, train_cards: list[AdapterCard], heldout_cards: list[AdapterCard],
         instruction: str, servings=(("centroid", False),), backend: str = "onnx",
         weight: float | None = None) -> dict[str, dict]:
    """Per (scoring, hybrid) serving, {"top1": % of the held-out samples whose own adapter ranks
    first among all adapters indexed by their training samples, "weight": the embedding's share of
    the hybrid score (1.0 without hybrid)}, on one embedder runtime. A hybrid weight is `weight`,
    or chosen on the training samples under that scoring (lexical.choose_weight). Each text is
    embedded once for all servings."""
    from services.retrieval.embedder import Embedder
    from services.retrieval.evaluation import evaluate
    from services.retrieval.index import AdapterIndex
    from services.retrieval.lexical import LexicalIndex, choose_weight
    from services.retrieval.retriever import Retriever

    embedder = Embedder(str(model_dir) if model_dir else None, instruction, backend=backend, threads=1,
                        cache_entries=100_000)
    queries = [Query(inputs=s.inputs, targets=s.targets, task=c.model_name, domain=c.domain or "-", metric="em")
               for c in heldout_cards for s in c.sample]
    texts = {c.model_name: [s.inputs for s in c.sample] for c in train_cards}
    can_choose = any(len(t) >= 3 for t in texts.values())
    out = {}
    for scoring, hybrid in servings:
        lexical, w = None, 1.0
        if hybrid and (weight is not None or can_choose):
            w = weight if weight is not None else choose_weight(
                texts, {name: embedder.encode(t) for name, t in texts.items()}, scoring=scoring)[0]
            lexical = LexicalIndex(texts)
        retriever = Retriever(embedder, AdapterIndex(embedder.dim, scoring=scoring), lexical, w)
        out[serving_key(scoring, hybrid)] = {"top1": evaluate(retriever, train_cards, queries)["top1"], "weight": w}
    return out


def choose_serving(per_runtime: dict[str, dict[str, dict]]) -> tuple[str, str, float]:
    """(runtime, scoring, hybrid weight) a tuned model is served with: float32's best serving (a tie:
    the cheaper, SERVINGS order), on int8 when int8 keeps that top-1 within INT8_TOLERANCE points (a
    third or less of float32's CPU on long prompts, docs/retrieval.md)."""
    scores = per_runtime["onnx"]
    scoring, hybrid = max(SERVINGS, key=lambda s: scores[serving_key(*s)]["top1"])
    key = serving_key(scoring, hybrid)
    int8_holds = per_runtime["onnx-int8"][key]["top1"] >= scores[key]["top1"] - INT8_TOLERANCE
    backend = "onnx-int8" if int8_holds else "onnx"
    return backend, scoring, per_runtime[backend][key]["weight"]


def train_candidate(train_cards: list[AdapterCard], heldout_cards: list[AdapterCard], out_dir: Path, *,
                    current_model: str | None, current_serving: tuple[str, str, float] | None = None,
                    instruction: str = DEFAULT_INSTRUCTION, seed: int = 0, epochs: int | None = None,
                    hybrid: bool = False, progress: Callable[[str], None] | None = None) -> CandidateResult:
    """Fine-tune from the packaged embedder on `train_cards` into out_dir (written only on success),
    then score it (every serving and runtime) and `current_model` on `heldout_cards`. current_model:
    a tuned folder served with current_serving (runtime, scoring, hybrid weight), or None for the
    configured embedder (float32, centroid, hybrid when `hybrid`). epochs None: the recipe's."""
    from services.retrieval.finetune import train_retriever

    say = progress or (lambda message: None)
    say(f"scoring the current model on {sum(len(c.sample) for c in heldout_cards)} held-out samples")
    if current_model is None:
        current = top1(None, train_cards, heldout_cards, instruction, (("centroid", hybrid),))
    else:
        backend, scoring, weight = current_serving or ("onnx", "centroid", 1.0)
        current = top1(current_model, train_cards, heldout_cards, instruction, ((scoring, weight < 1.0),), backend,
                       weight=weight)
    current_top1 = next(iter(current.values()))["top1"]
    say(f"current model: top-1 {current_top1:.1f}%; training a candidate on {len(train_cards)} adapters")
    train_retriever(train_cards, out_dir, epochs=epochs, seed=seed, instruction=instruction, progress=False)
    per_runtime = {b: top1(out_dir, train_cards, heldout_cards, instruction, SERVINGS, b) for b in RUNTIMES}
    backend, scoring, weight = choose_serving(per_runtime)
    chosen = per_runtime[backend][serving_key(scoring, weight < 1.0)]["top1"]
    say(f"candidate: top-1 {chosen:.1f}% on {backend}, {scoring} scoring, embedding weight {weight} "
        f"({per_runtime}); current {current_top1:.1f}%")
    return CandidateResult(Path(out_dir), chosen, current_top1, scoring, backend, weight,
                           {"epochs": epochs, "seed": seed, "adapters": len(train_cards), "hybrid": hybrid,
                            "heldout_samples": sum(len(c.sample) for c in heldout_cards),
                            "candidate_top1_per_runtime": per_runtime})
