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
replicas serve it that way (docs/retrieval.md has the k-fold measurements behind each option).
A kept candidate is then trained again on every sample (`refit`); the split model stays beside it
as the version's gate model, the one later runs score it by."""
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
    """(train cards, held-out cards): per adapter a shuffle of its samples seeded by (seed, adapter
    name), `heldout_fraction` of them (at least 1) held out, at least 2 kept for training. Adapters
    with fewer than 3 samples are trained on and never held out. Seeded per card, an unchanged card
    holds out the same samples in every run whatever else the registry holds, so the gate model of
    the version serving now (trained on an earlier run's split) never saw them."""
    train, heldout = [], []
    for card in cards:
        samples = list(card.sample)
        random.Random(f"{seed}:{card.model_name}").shuffle(samples)
        n_out = max(1, round(len(samples) * heldout_fraction)) if len(samples) >= 3 else 0
        n_out = min(n_out, len(samples) - 2)
        train.append(card.model_copy(update={"sample": samples[n_out:]}))
        if n_out:
            heldout.append(card.model_copy(update={"sample": samples[:n_out]}))
    return train, heldout


SCORINGS = ("centroid", "samples")
# (scoring, hybrid) ways to serve a tuned model; a tie goes to the earlier. Best sample first: once
# tuned it led the centroid on the Flan k-fold in every fold measured (docs/retrieval.md), and the
# refit serves it with a third more samples a card than the split it is chosen on could show. The
# embedding alone before the hybrid (the lexical side costs about a millisecond a prompt).
SERVINGS = (("samples", False), ("centroid", False), ("samples", True), ("centroid", True))
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
    the earlier in SERVINGS), on int8 when int8 keeps that top-1 within INT8_TOLERANCE points (a
    third or less of float32's CPU on long prompts, docs/retrieval.md). A replica on a CPU with AMX
    serves either as bf16 (host_runtime.py), closer to float32 than int8 and faster than both."""
    scores = per_runtime["onnx"]
    scoring, hybrid = max(SERVINGS, key=lambda s: scores[serving_key(*s)]["top1"])
    key = serving_key(scoring, hybrid)
    int8_holds = per_runtime["onnx-int8"][key]["top1"] >= scores[key]["top1"] - INT8_TOLERANCE
    backend = "onnx-int8" if int8_holds else "onnx"
    return backend, scoring, per_runtime[backend][key]["weight"]


def train_candidate(train_cards: list[AdapterCard], heldout_cards: list[AdapterCard], out_dir: Path, *,
                    current_model: str | None, current_serving: tuple[str, str, float] | None = None,
                    instruction: str = DEFAULT_INSTRUCTION, seed: int = 0, epochs: int | None = None,
                    hybrid: bool = False, base_model_path: str | None = None,
                    progress: Callable[[str], None] | None = None) -> CandidateResult:
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
    train_retriever(train_cards, out_dir, epochs=epochs, seed=seed, instruction=instruction,
                    base_model_path=base_model_path, progress=False)
    per_runtime = {b: top1(out_dir, train_cards, heldout_cards, instruction, SERVINGS, b) for b in RUNTIMES}
    backend, scoring, weight = choose_serving(per_runtime)
    chosen = per_runtime[backend][serving_key(scoring, weight < 1.0)]["top1"]
    say(f"candidate: top-1 {chosen:.1f}% on {backend}, {scoring} scoring, embedding weight {weight} "
        f"({per_runtime}); current {current_top1:.1f}%")
    return CandidateResult(Path(out_dir), chosen, current_top1, scoring, backend, weight,
                           {"epochs": epochs, "seed": seed, "adapters": len(train_cards), "hybrid": hybrid,
                            "heldout_samples": sum(len(c.sample) for c in heldout_cards),
                            "candidate_top1_per_runtime": per_runtime})


def refit(cards: list[AdapterCard], out_dir: Path, *, instruction: str = DEFAULT_INSTRUCTION, seed: int = 0,
          epochs: int | None = None, base_model_path: str | None = None) -> Path:
    """The kept candidate's recipe trained again on every sample of `cards`: the model replicas serve.
    The split's held-out quarter is a quarter of what a card teaches; trained on it too, the Flan
    k-fold's served top-1 rose (docs/retrieval.md, "Refit on every sample"). Nothing is left to score
    it on: the gate and the serving choice are the split model's."""
    from services.retrieval.finetune import train_retriever

    return train_retriever(cards, out_dir, epochs=epochs, seed=seed, instruction=instruction,
                           base_model_path=base_model_path, progress=False)


def tune_cards(cards: list[AdapterCard], out_dir: Path, *, heldout_fraction: float = 0.25, refit_all: bool = True,
               instruction: str = DEFAULT_INSTRUCTION, seed: int = 0, epochs: int | None = None, hybrid: bool = True,
               base_model_path: str | None = None, gate_dir: Path | None = None,
               progress: Callable[[str], None] | None = None) -> dict:
    """A tuning run without a registry (`retriever train`, the k-fold bench): split, train and score
    a candidate against the configured embedder (served with `hybrid`), choose its serving, refit
    on every sample (`refit_all`), and write the model with its serving (served.SERVING_FILE) to
    out_dir, kept whatever the scores say (the caller asked for a model; the scores are returned).
    Cards too small to hold a sample out train on everything and serve as the recipe's default.
    gate_dir: keep the candidate scored (refit_all) there, else it is discarded."""
    import tempfile

    from services.retrieval.served import Serving, write_serving

    say = progress or (lambda message: None)
    out_dir = Path(out_dir)
    train, heldout = split_cards(cards, heldout_fraction, seed)
    if not heldout:
        say("no card has 3 or more samples to hold out: training on every sample, nothing scored")
        refit(cards, out_dir, instruction=instruction, seed=seed, epochs=epochs, base_model_path=base_model_path)
        serving, measured = Serving(hybrid_weight=1.0), {"gated": False}
    else:
        with tempfile.TemporaryDirectory(prefix="loraretriever-gate-") as scratch:
            gate = (gate_dir or Path(scratch) / "gate") if refit_all else out_dir
            result = train_candidate(train, heldout, gate,
                                     current_model=None, instruction=instruction, seed=seed, epochs=epochs,
                                     hybrid=hybrid, base_model_path=base_model_path, progress=say)
            if refit_all:
                say(f"refitting on all {sum(len(c.sample) for c in cards)} card samples")
                refit(cards, out_dir, instruction=instruction, seed=seed, epochs=epochs, base_model_path=base_model_path)
        serving = Serving(result.backend, result.scoring, result.hybrid_weight)
        measured = {"gated": True, "candidate_top1": result.candidate_top1, "current_top1": result.current_top1,
                    "candidate_top1_per_runtime": result.details["candidate_top1_per_runtime"],
                    "heldout_samples": result.details["heldout_samples"]}
    write_serving(out_dir, serving, refit=refit_all or not heldout, **measured)
    return {"serving": serving, **measured}
