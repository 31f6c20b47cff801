"""Retriever model versions: tuned on the registry's cards, kept only if better, rolled back on demand.

Redis, beside the registry:
| key | type | content |
| `lr:retriever:models` | hash | version (`r1`, `r2`, ...) -> ModelVersion JSON |
| `lr:retriever:active` | string | the version replicas serve; absent = the configured embedder |
| `lr:retriever:previous` | list | versions active before (rollback pops it; "" = the configured embedder) |
| `lr:retriever:last-tuning` | string | the last run's outcome JSON (kept / refused / failed, both scores) |
| `lr:retriever:tuning-lock` | string | held by the one tuning run in progress |
Model folders live under `<root>/<version>/` (root: the data home's `retriever-models/` by default),
a refit version's gate model under `<root>/<version>-gate/`. A run that fails or is refused deletes
its candidate folders and writes only `last-tuning`."""
from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
import uuid
from pathlib import Path
from typing import Callable

from pydantic import BaseModel

from services.retrieval import DEFAULT_INSTRUCTION
from services.retrieval.served import Serving, write_serving
from services.retrieval.tuning import refit as refit_model
from services.retrieval.tuning import split_cards, train_candidate

MODELS_KEY = "lr:retriever:models"
ACTIVE_KEY = "lr:retriever:active"
PREVIOUS_KEY = "lr:retriever:previous"
SEQ_KEY = "lr:retriever:model-seq"
LAST_KEY = "lr:retriever:last-tuning"
LOCK_KEY = "lr:retriever:tuning-lock"
LOCK_TTL_S = 6 * 3600  # a run that died holding it frees it after this long

log = logging.getLogger(__name__)


class ModelVersion(BaseModel):
    version: str
    path: str
    created_at: float
    candidate_top1: float
    current_top1: float
    compared_with: str | None  # the version that was active (None: the configured embedder)
    adapters: list[str]
    fingerprint: str
    scoring: str = "centroid"  # the index scoring the model won with at tuning; replicas search with it
    backend: str = "onnx"  # the embedder runtime its tuning chose; replicas serve it with it
    hybrid_weight: float = 1.0  # the embedding's share of the hybrid score it is served with (1.0: embedding alone)
    # the same recipe on the tuning's training split only, when `path` was refit on every sample: later
    # runs score this version by it, on held-out samples it never saw (the refit model saw them all)
    gate_path: str | None = None

    def scored_path(self) -> str:
        return self.gate_path or self.path


def _text(value) -> str | None:
    return value.decode() if isinstance(value, bytes) else value


class RetrieverModels:
    def __init__(self, redis, root: str | Path):
        self.r = redis
        self.root = Path(root)

    def active(self) -> ModelVersion | None:
        version = _text(self.r.get(ACTIVE_KEY))
        return self.get(version) if version else None

    def active_version(self) -> str | None:
        return _text(self.r.get(ACTIVE_KEY)) or None

    def get(self, version: str) -> ModelVersion | None:
        raw = self.r.hget(MODELS_KEY, version)
        return ModelVersion.model_validate_json(raw) if raw else None

    def list(self) -> list[ModelVersion]:
        return sorted((ModelVersion.model_validate_json(v) for v in self.r.hgetall(MODELS_KEY).values()),
                      key=lambda m: m.created_at)

    def last_tuning(self) -> dict | None:
        raw = self.r.get(LAST_KEY)
        return json.loads(raw) if raw else None

    def add_and_activate(self, candidate_dir: Path, gate_dir: Path | None = None, **fields) -> ModelVersion:
        """Move a kept candidate (and its gate model) into the store as the next version and make it
        active (one MULTI)."""
        version = f"r{self.r.incr(SEQ_KEY)}"
        path, gate = self.root / version, self.root / f"{version}-gate"
        self.root.mkdir(parents=True, exist_ok=True)
        if gate_dir is not None:
            gate_dir.rename(gate)
        candidate_dir.rename(path)
        model = ModelVersion(version=version, path=str(path), created_at=time.time(),
                             gate_path=str(gate) if gate_dir is not None else None, **fields)
        pipe = self.r.pipeline(transaction=True)
        pipe.hset(MODELS_KEY, version, model.model_dump_json())
        pipe.lpush(PREVIOUS_KEY, self.active_version() or "")
        pipe.set(ACTIVE_KEY, version)
        pipe.execute()
        return model

    def rollback(self) -> str | None:
        """Serve the version active before the current one again; returns it (None: the configured
        embedder). Nothing to roll back to raises LookupError."""
        previous = self.r.lpop(PREVIOUS_KEY)
        if previous is None:
            raise LookupError("no earlier retriever model to roll back to")
        previous = _text(previous)
        if previous:
            self.r.set(ACTIVE_KEY, previous)
        else:
            self.r.delete(ACTIVE_KEY)
        return previous or None


def registry_cards(registry) -> tuple[list, str]:
    """The cards of every active adapter version, and a fingerprint of that set (name@version)."""
    cards, keys = [], []
    for record in registry.snapshot():
        if record.active_version is None:
            continue
        cards.append(record.versions[record.active_version].card)
        keys.append(f"{record.name}@{record.active_version}")
    return cards, hashlib.sha256("\n".join(sorted(keys)).encode()).hexdigest()[:16]


def tune(registry, models: RetrieverModels, *, instruction: str = DEFAULT_INSTRUCTION, heldout_fraction: float = 0.25,
         epochs: int | None = None, min_gain: float = 0.5, seed: int = 0, trigger: str = "operator", hybrid: bool = False,
         refit: bool = True, progress: Callable[[str], None] = log.info) -> dict:
    """One tuning run: train a candidate on the registry's cards, keep it (new active version) only
    if its held-out top-1 beats the current model's by min_gain points, and with `refit` serve the
    same recipe trained again on every sample (the split model kept as its gate model). Returns the
    outcome (also stored as last-tuning); a failure or refusal leaves models, files and pointers as
    they were."""
    token = uuid.uuid4().hex
    if not models.r.set(LOCK_KEY, token, nx=True, ex=LOCK_TTL_S):
        return {"status": "busy", "detail": "a tuning run is in progress"}
    started = time.time()
    candidate_dir = models.root / f".candidate-{token[:8]}"
    refit_dir = models.root / f".refit-{token[:8]}"
    outcome: dict = {"trigger": trigger, "started_at": started}
    try:
        cards, fingerprint = registry_cards(registry)
        outcome["fingerprint"] = fingerprint
        current = models.active()
        outcome["current_version"] = current.version if current else None
        outcome["current_scored_with"] = current.scored_path() if current else None
        if len(cards) < 2:
            outcome.update(status="refused", detail=f"tuning needs at least 2 adapters, the registry serves {len(cards)}")
            return outcome
        train, heldout = split_cards(cards, heldout_fraction, seed)
        if not heldout:
            outcome.update(status="refused", detail="no adapter card has 3 or more samples to hold out")
            return outcome
        models.root.mkdir(parents=True, exist_ok=True)
        progress(f"retriever tuning ({trigger}): {len(train)} adapters, current model "
                 f"{current.version if current else 'configured embedder'}")
        result = train_candidate(train, heldout, candidate_dir, current_model=current.scored_path() if current else None,
                                 current_serving=(current.backend, current.scoring, current.hybrid_weight)
                                 if current else None,
                                 instruction=instruction,
                                 seed=seed, epochs=epochs, hybrid=hybrid, progress=progress)
        outcome.update(candidate_top1=result.candidate_top1, current_top1=result.current_top1, scoring=result.scoring,
                       backend=result.backend, hybrid_weight=result.hybrid_weight, **result.details)
        if result.candidate_top1 < result.current_top1 + min_gain:
            outcome.update(status="refused", detail=f"the candidate's held-out top-1 {result.candidate_top1:.1f}% does "
                           f"not beat the current {result.current_top1:.1f}% by {min_gain} points")
            return outcome
        outcome["refit"] = refit
        if refit:
            progress(f"refitting the kept recipe on all {sum(len(c.sample) for c in cards)} card samples")
            refit_started = time.time()
            refit_model(cards, refit_dir, instruction=instruction, seed=seed, epochs=epochs)
            outcome["refit_seconds"] = round(time.time() - refit_started, 1)
        write_serving(refit_dir if refit else candidate_dir, Serving(result.backend, result.scoring, result.hybrid_weight),
                      candidate_top1=result.candidate_top1, current_top1=result.current_top1, refit=refit)
        model = models.add_and_activate(refit_dir if refit else candidate_dir, candidate_dir if refit else None,
                                        candidate_top1=result.candidate_top1,
                                        current_top1=result.current_top1, compared_with=outcome["current_version"],
                                        adapters=sorted(c.model_name for c in cards), fingerprint=fingerprint,
                                        scoring=result.scoring, backend=result.backend,
                                        hybrid_weight=result.hybrid_weight)
        outcome.update(status="kept", version=model.version)
        return outcome
    except Exception as err:
        log.exception("retriever tuning failed")
        outcome.update(status="failed", detail=f"{type(err).__name__}: {str(err)[:300]}")
        return outcome
    finally:
        for folder in (candidate_dir, refit_dir):
            shutil.rmtree(folder, ignore_errors=True)
        outcome["seconds"] = round(time.time() - started, 1)
        progress(f"retriever tuning {outcome.get('status')}: {outcome.get('detail') or outcome.get('version')}"
                 f" (candidate {outcome.get('candidate_top1')}, current {outcome.get('current_top1')}, "
                 f"{outcome['seconds']} s)")
        models.r.set(LAST_KEY, json.dumps(outcome))
        models.r.eval("if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0",
                      1, LOCK_KEY, token)
