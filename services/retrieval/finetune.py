"""Retriever fine-tuning as in the LoraRetriever paper: contrastive, in-batch negatives.

Each training pair is two samples of one adapter's card (anchor, positive); the other pairs
of the batch are the negatives (sentence-transformers' MultipleNegativesRankingLoss). A batch
never holds two pairs of the same adapter, so no positive is ever used as a negative.
"""
from __future__ import annotations

import json
import logging
import random
import shutil
import tempfile
from pathlib import Path

import torch
from tqdm import tqdm

from services.retrieval import DEFAULT_INSTRUCTION
from services.retrieval.embedder import load_sentence_model
from services.schemas import AdapterCard

log = logging.getLogger(__name__)

TRAINING_INFO_FILE = "loraretriever_training.json"


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
            raise TrainingInputError(f"adapter {card.model_name!r} needs at least 2 samples (anchor and positive)")


def pair_batches(cards: list[AdapterCard], epochs: int, batch_size: int, rng: random.Random) -> list[list[tuple[str, str]]]:
    """Batches of (anchor, positive) texts, at most one pair per adapter in each batch.

    Per epoch every adapter's samples are shuffled and paired off; round r takes the r-th pair
    of every adapter (adapters with fewer pairs wrap around), shuffled and cut into batches.
    """
    batches = []
    for _ in range(epochs):
        pairs = {}
        for card in cards:
            texts = [s.inputs for s in card.sample]
            rng.shuffle(texts)
            if len(texts) % 2:
                texts.append(texts[0])
            pairs[card.model_name] = list(zip(texts[0::2], texts[1::2]))
        for r in range(max(len(p) for p in pairs.values())):
            round_ = [p[r % len(p)] for p in pairs.values()]
            rng.shuffle(round_)
            batches += [round_[i:i + batch_size] for i in range(0, len(round_), batch_size)
                        if len(round_[i:i + batch_size]) >= 2]  # a lone pair has no negative
    return batches


def train_retriever(cards: list[AdapterCard], out_dir, *, epochs: int = 4, seed: int = 0,
                    base_model_path: str | None = None, instruction: str = DEFAULT_INSTRUCTION,
                    batch_size: int = 32, learning_rate: float = 3e-5, progress: bool = True) -> Path:
    """Fine-tune the embedder on exactly these cards; saves a folder `Embedder(model_path=...)` loads.

    The instruction is prefixed during training as the Embedder prefixes it at retrieval time.
    out_dir must not exist or be empty; it is written only once training succeeded.
    """
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    check_training_cards(cards)
    if epochs < 1:
        raise TrainingInputError(f"epochs must be at least 1, got {epochs}")
    if batch_size < 2:
        raise TrainingInputError(f"batch_size must be at least 2 (in-batch negatives), got {batch_size}")
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise TrainingInputError(f"output folder {out_dir} exists and is not empty")

    rng = random.Random(seed)
    torch.manual_seed(seed)
    model = load_sentence_model(base_model_path)
    loss_fn = MultipleNegativesRankingLoss(model)
    batches = pair_batches(cards, epochs, batch_size, rng)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate)
    warmup = max(1, len(batches) // 10)
    # linear warm-up then linear decay to zero, the usual schedule for contrastive fine-tuning
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min((step + 1) / warmup, max(0.0, (len(batches) - step) / (len(batches) - warmup + 1))))

    model.train()
    bar = tqdm(batches, desc="fine-tuning retriever", unit="batch", disable=not progress)
    for batch in bar:
        anchors = model.preprocess([instruction + a for a, _ in batch])
        positives = model.preprocess([instruction + p for _, p in batch])
        loss = loss_fn([anchors, positives], None)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()

    # save next to the destination, then move into place: a failure leaves no half-written model
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        model.save(str(staging))
        (staging / TRAINING_INFO_FILE).write_text(json.dumps({
            "adapters": sorted(c.model_name for c in cards), "epochs": epochs, "seed": seed,
            "batches": len(batches), "instruction": instruction, "learning_rate": learning_rate,
            "base_model_path": base_model_path,
        }, indent=1))
        if out_dir.exists():
            out_dir.rmdir()
        staging.rename(out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log.info("saved the fine-tuned retriever to %s (%d batches)", out_dir, len(batches))
    return out_dir
