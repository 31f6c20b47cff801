"""Retriever fine-tuning on the registered adapters' cards: prototype loss, hard negatives, optional student.

The recipe (docs/retrieval.md, "Tuning on the registry's cards", has the measurements behind each
default):
- **Student** (optional, `layers`): the first `layers` transformer layers of the base model
  (all-MiniLM-L6-v2 has 6). The tuning runs per registry anyway, so a student is trained for this
  library; 2 layers at 128 tokens embed a long prompt at a tenth of the full model's cost. The
  default keeps all layers until the student is shown to keep top-1 (docs/retrieval.md).
- **Cut**: texts past `max_seq_length` tokens keep their head and tail halves (services/retrieval/cut.py),
  in training as at retrieval time (the folder records it, the Embedder reads it).
- **Objective**: retrieval scores a prompt against each adapter's centroid, so training does the
  same: every card sample of a step is a query against the centroids of the step's adapters, its
  own adapter's centroid taken without it (leave-one-out), cross-entropy over scaled cosines.
- **Hard negatives**: a step holds up to `adapters_per_step` adapters, grouped by nearness of their
  centroids under the base model (siblings of one domain land together), so each query competes
  with the adapters it is most easily confused with (16 a step: what fits in memory at 6 layers).
- **Epochs**: 5 over every card sample by default. Early stopping is optional (`heldout_fraction`):
  that share of each card's samples is held out, scored after each epoch against the centroids of
  the training samples, and the best epoch's weights are kept (training stops `patience` epochs
  after the last improvement); on 15-20 samples a card it stopped too early on the k-fold. The
  registry-driven tuning keeps a model only if it beats the serving one on held-out samples anyway.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import logging
import random
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from services.retrieval import DEFAULT_INSTRUCTION, TRAINING_INFO_FILE
from services.retrieval.cut import CUTS, cut_ids
from services.retrieval.embedder import load_sentence_model
from services.retrieval.batch_encoder import padded_batch
from services.schemas import AdapterCard

log = logging.getLogger(__name__)

__all__ = ["TRAINING_INFO_FILE", "Recipe", "TrainingInputError", "train_retriever", "split_samples", "step_groups", "student_model"]


@dataclasses.dataclass(frozen=True)
class Recipe:
    layers: int | None = None           # transformer layers kept from the base (None: all); 2 = the fast student
    # tokens per text, in training and at retrieval time: at 128 the tuned model scored as well as at
    # 256 on the Flan k-fold, at half the embedding cost (docs/retrieval.md)
    max_seq_length: int = 128
    cut: str = "head_tail"
    max_epochs: int = 5
    patience: int = 2                   # epochs without a better held-out top-1 before stopping
    # of each card's samples, for early stopping; 0 (the default): every sample trains for max_epochs.
    # A quarter of 15-20 samples per card is too few to stop on: on the k-fold it stopped fold 0
    # after one epoch (75.0 top-1) where 5 epochs on all samples reached 82.9 (docs/retrieval.md)
    heldout_fraction: float = 0.0
    adapters_per_step: int = 16         # memory: 64 a step of 6 layers at 256 tokens held 17 GB (docs/retrieval.md)
    samples_per_adapter: int = 4        # per step; the leave-one-out centroid is the other 3
    learning_rate: float = 2e-4         # 5 epochs at 2e-4, 128 tokens: docs/retrieval.md's k-fold
    scale: float = 20.0                 # cosine -> logit, as sentence-transformers' ranking loss
    hard_negatives: bool = True         # group a step's adapters by nearness (False: at random)
    bf16: bool = True                   # autocast where the CPU computes bfloat16 natively (AVX-512 BF16, AMX)


class TrainingInputError(ValueError):
    """Cards that cannot train a retriever (too few adapters or samples, duplicate names), or a bad out_dir."""


def check_training_cards(cards: list[AdapterCard]) -> None:
    if len(cards) < 2:
        raise TrainingInputError(f"training needs at least 2 adapters (in-batch negatives), got {len(cards)}")
    names = [c.model_name for c in cards]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise TrainingInputError(f"adapter {dup!r} appears twice in the cards")
    for card in cards:
        if len(card.sample) < 2:
            raise TrainingInputError(f"adapter {card.model_name!r} needs at least 2 samples (a sample and a centroid)")


def split_samples(n_samples: list[int], fraction: float, rng: random.Random) -> tuple[list[list[int]], list[list[int]]]:
    """Per card, (training, held-out) sample indices: round(fraction * n) held out, at least 2 kept for training."""
    train, held = [], []
    for n in n_samples:
        order = list(range(n))
        rng.shuffle(order)
        k = min(round(fraction * n), n - 2)
        held.append(sorted(order[:k]))
        train.append(sorted(order[k:]))
    return train, held


def step_groups(centroids: np.ndarray, size: int, hard: bool, rng: random.Random) -> list[list[int]]:
    """Adapters (rows of centroids (a, dim), unit) cut into groups of at most `size`.

    hard: each group is a random seed adapter and its nearest ungrouped neighbours; else random.
    """
    left = list(range(len(centroids)))
    rng.shuffle(left)
    if not hard:
        return [left[i:i + size] for i in range(0, len(left), size)]
    groups = []
    while left:
        seed, rest = left[0], np.array(left[1:], dtype=int)
        nearest = rest[np.argsort(-(centroids[rest] @ centroids[seed]))][:size - 1]
        groups.append([seed, *nearest.tolist()])
        left = [a for a in left if a not in set(groups[-1])]
    return groups


def _bf16_native() -> bool:
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def student_model(base_model_path: str | None, layers: int | None, max_seq_length: int):
    """The base SentenceTransformer cut to its first `layers` transformer layers (None: all)."""
    model = load_sentence_model(base_model_path)
    encoder = model[0].auto_model
    if layers is not None and layers < len(encoder.encoder.layer):
        encoder.encoder.layer = encoder.encoder.layer[:layers]
        encoder.config.num_hidden_layers = layers
    model.max_seq_length = max_seq_length
    return model


class _Trainer:
    """The student, its tokenized card samples, and the encode / loss / score steps of the recipe."""

    def __init__(self, cards: list[AdapterCard], recipe: Recipe, instruction: str, base_model_path: str | None):
        self.recipe = recipe
        self.model = student_model(base_model_path, recipe.layers, recipe.max_seq_length)
        tokenizer = self.model.tokenizer
        self.ids = [[cut_ids(tokenizer(instruction + s.inputs)["input_ids"], recipe.max_seq_length, recipe.cut)
                     for s in card.sample] for card in cards]  # per card, per sample: token ids
        self.autocast = recipe.bf16 and _bf16_native()

    def embed(self, ids: list[list[int]]) -> torch.Tensor:
        """(n, dim) unit rows; with gradients when the model is in training mode."""
        features = {k: torch.from_numpy(v) for k, v in padded_batch(ids).items()}
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.autocast):
            out = self.model(features)["sentence_embedding"]
        return torch.nn.functional.normalize(out.float(), dim=-1)

    @torch.no_grad()
    def embed_all(self, rows: list[tuple[int, int]], batch: int = 64) -> np.ndarray:
        """(len(rows), dim) for (card, sample) rows, longest first so batches pad little."""
        self.model.eval()
        order = sorted(range(len(rows)), key=lambda i: -len(self.ids[rows[i][0]][rows[i][1]]))
        out = np.empty((len(rows), self.model.get_embedding_dimension()), dtype=np.float32)
        for start in range(0, len(order), batch):
            chunk = order[start:start + batch]
            out[chunk] = self.embed([self.ids[rows[i][0]][rows[i][1]] for i in chunk]).numpy()
        return out

    def centroids(self, train: list[list[int]]) -> np.ndarray:
        """(cards, dim) unit means of each card's training samples."""
        rows = [(c, s) for c, samples in enumerate(train) for s in samples]
        vectors = self.embed_all(rows)
        sums = np.zeros((len(train), vectors.shape[1]), dtype=np.float32)
        np.add.at(sums, [c for c, _ in rows], vectors)
        return sums / np.linalg.norm(sums, axis=1, keepdims=True)

    def heldout_top1(self, train: list[list[int]], held: list[list[int]]) -> float:
        """Percent of held-out samples whose nearest training centroid is their own card's."""
        rows = [(c, s) for c, samples in enumerate(held) for s in samples]
        best = (self.embed_all(rows) @ self.centroids(train).T).argmax(1)  # (held-out samples,)
        return 100.0 * float(np.mean(best == np.array([c for c, _ in rows])))

    def loss(self, draw: list[tuple[int, list[int]]]) -> torch.Tensor:
        """Leave-one-out prototype loss of one step: draw = [(card, its sample indices)], >= 2 samples each."""
        counts = [len(s) for _, s in draw]
        vectors = self.embed([self.ids[c][s] for c, samples in draw for s in samples])  # (n, dim)
        owner = torch.repeat_interleave(torch.arange(len(draw)), torch.tensor(counts))  # (n,)
        sums = torch.zeros(len(draw), vectors.shape[1]).index_add(0, owner, vectors)  # (cards, dim)
        cos = vectors @ torch.nn.functional.normalize(sums, dim=-1).T  # (n, cards)
        own = torch.nn.functional.normalize(sums[owner] - vectors, dim=-1)  # (n, dim): centroid without the sample
        cos = cos.scatter(1, owner[:, None], (vectors * own).sum(1, keepdim=True))
        return torch.nn.functional.cross_entropy(self.recipe.scale * cos, owner)


def train_retriever(cards: list[AdapterCard], out_dir, *, recipe: Recipe = Recipe(), seed: int = 0,
                    base_model_path: str | None = None, instruction: str = DEFAULT_INSTRUCTION,
                    progress: bool = True, epochs: int | None = None) -> Path:
    """Fine-tune a student of the embedder on exactly these cards; saves a folder `Embedder(model_path=...)` loads.

    epochs, when given, replaces recipe.max_epochs. Writes `loraretriever_training.json` beside the
    model with the recipe, the epoch kept and the held-out top-1 before (the base model, same
    student depth) and after. out_dir must not exist or be empty; it is written only once training succeeded.
    """
    check_training_cards(cards)
    if epochs is not None:
        recipe = dataclasses.replace(recipe, max_epochs=epochs)
    if recipe.max_epochs < 1:
        raise TrainingInputError(f"epochs must be at least 1, got {recipe.max_epochs}")
    if recipe.cut not in CUTS:
        raise TrainingInputError(f"cut must be one of {CUTS}, got {recipe.cut!r}")
    if recipe.samples_per_adapter < 2 or recipe.adapters_per_step < 2:
        raise TrainingInputError("a step needs at least 2 adapters and 2 samples per adapter")
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise TrainingInputError(f"output folder {out_dir} exists and is not empty")

    started = time.perf_counter()
    rng = random.Random(seed)
    torch.manual_seed(seed)
    trainer = _Trainer(cards, recipe, instruction, base_model_path)
    n_samples = [len(c.sample) for c in cards]
    train, held = split_samples(n_samples, recipe.heldout_fraction, rng)
    stopping = any(held)
    if not stopping:  # cards too small to hold samples out: every sample trains, the last epoch is kept
        train = [list(range(n)) for n in n_samples]
    before = trainer.heldout_top1(train, held) if stopping else None
    optimizer = torch.optim.AdamW(trainer.model.parameters(), lr=recipe.learning_rate)
    # an epoch is kept only if it beats the untrained student on the held-out samples
    best, best_state, best_epoch, history = before, copy.deepcopy(trainer.model.state_dict()), 0, []
    bar = tqdm(range(1, recipe.max_epochs + 1), desc="fine-tuning retriever", unit="epoch", disable=not progress)
    for epoch in bar:
        groups = step_groups(trainer.centroids(train), recipe.adapters_per_step, recipe.hard_negatives, rng)
        pools = [rng.sample(t, len(t)) for t in train]  # each card's training samples, shuffled, once per epoch
        trainer.model.train()
        for start in range(0, max(len(t) for t in train), recipe.samples_per_adapter):
            for group in groups:
                # cards with fewer samples wrap around; a card needs 2 samples in a step (itself and a centroid)
                draw = [(c, [pools[c][(start + j) % len(pools[c])]
                             for j in range(min(recipe.samples_per_adapter, len(pools[c])))]) for c in group]
                loss = trainer.loss(draw)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                bar.set_postfix(loss=f"{loss.item():.3f}", best=best)
        if not stopping:
            best_epoch = epoch
            continue
        score = trainer.heldout_top1(train, held)
        history.append(round(score, 2))
        if score > best:
            best, best_epoch, best_state = score, epoch, copy.deepcopy(trainer.model.state_dict())
        elif epoch - best_epoch >= recipe.patience:
            break
    if stopping:
        trainer.model.load_state_dict(best_state)
    trainer.model.eval()
    info = {"adapters": sorted(c.model_name for c in cards), "recipe": dataclasses.asdict(recipe), "cut": recipe.cut,
            "max_seq_length": recipe.max_seq_length,
            "seed": seed, "instruction": instruction, "base_model_path": base_model_path,
            "epoch_kept": best_epoch, "heldout_top1_before": before, "heldout_top1_after": best,
            "heldout_top1_per_epoch": history, "seconds": round(time.perf_counter() - started, 1)}
    _save(trainer.model, out_dir, info)
    log.info("saved the fine-tuned retriever to %s (epoch %d kept, held-out top-1 %s -> %s)",
             out_dir, best_epoch, before, best)
    return out_dir


def _save(model, out_dir: Path, info: dict) -> None:
    """Save next to the destination, then move into place: a failure leaves no half-written model."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        model.save(str(staging))
        (staging / TRAINING_INFO_FILE).write_text(json.dumps(info, indent=1))
        if out_dir.exists():
            out_dir.rmdir()
        staging.rename(out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
