"""Retriever tuning off the serving path: a Ray task at the lowest CPU priority, started by the
Ingress on an operator's request or after registry changes (debounced; docs/retrieval.md)."""
from __future__ import annotations

import asyncio
import logging
import os
import time

import ray

from services.config import AppConfig
from services.errors import NotFound
from services.offline import OFFLINE_ENV
from services.retrieval.model_versions import LOCK_KEY, RetrieverModels, registry_cards, tune

log = logging.getLogger("ray.serve")


@ray.remote(max_retries=0)
def tuning_task(config: dict, trigger: str) -> dict:
    """One run (services.retrieval.model_versions.tune) in a worker of its own, niced to 19 and on one
    thread, so serving replicas keep the CPU they need; progress goes to this worker's log."""
    import torch

    from services.wiring import make_registry, redis_client

    os.nice(19)
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = AppConfig.model_validate(config)
    t = cfg.retriever_tuning
    return tune(make_registry(cfg), RetrieverModels(redis_client(cfg), t.root()), instruction=cfg.embedder.instruction,
                heldout_fraction=t.heldout_fraction, epochs=t.epochs, min_gain=t.min_gain, refit=t.refit, trigger=trigger,
                hybrid=cfg.retrieval.hybrid,  # both models scored as replicas serve them
                progress=logging.getLogger("loraretriever.tuning").info)


class TuningLauncher:
    """Starts tuning tasks and watches the registry for the automatic ones. Several Ingress replicas
    may watch: the run's Redis lock lets one run at a time, and a run records the card set it
    trained on, so the same registry state is not tuned twice."""

    WATCH_EVERY_S = 10.0

    def __init__(self, cfg: AppConfig, registry, models: RetrieverModels):
        self.cfg, self.registry, self.models = cfg, registry, models
        self._running: ray.ObjectRef | None = None
        self._seen: tuple[str | None, float] = (None, time.monotonic())  # fingerprint, since when

    def start(self, trigger: str) -> dict:
        if self.models.r.get(LOCK_KEY) is not None or (self._running is not None and not self._done()):
            return {"status": "busy", "detail": "a retriever tuning run is in progress"}
        t = self.cfg.retriever_tuning
        self._running = tuning_task.options(num_cpus=t.num_cpus, runtime_env={"env_vars": OFFLINE_ENV}).remote(
            self.cfg.model_dump(mode="json"), trigger)
        log.info("retriever tuning started (%s)", trigger)
        return {"status": "started", "trigger": trigger}

    def _done(self) -> bool:
        ready, _ = ray.wait([self._running], timeout=0)
        return bool(ready)

    def report(self) -> dict:
        active = self.models.active()
        return {"active": active.version if active else None,
                "versions": [m.model_dump(mode="json") for m in self.models.list()],
                "last_tuning": self.models.last_tuning(),
                "running": self.models.r.get(LOCK_KEY) is not None}

    def rollback(self) -> dict:
        try:
            version = self.models.rollback()
        except LookupError as err:
            raise NotFound(str(err)) from err
        return {"active": version}

    def due(self, served: int, fingerprint: str, now: float) -> bool:
        """Whether an automatic run should start: the served card set changed since the last run saw
        it, has stayed as it is for debounce_s, and holds at least min_adapters adapters."""
        t = self.cfg.retriever_tuning
        if fingerprint != self._seen[0]:
            self._seen = (fingerprint, now)  # a change: the quiet time starts again
            return False
        last = self.models.last_tuning() or {}
        return served >= t.min_adapters and last.get("fingerprint") != fingerprint and now - self._seen[1] >= t.debounce_s

    async def watch(self) -> None:
        """Start a run whenever one is due (checked every WATCH_EVERY_S)."""
        while True:
            await asyncio.sleep(self.WATCH_EVERY_S)
            try:
                cards, fingerprint = registry_cards(self.registry)
                if self.due(len(cards), fingerprint, time.monotonic()):
                    self.start("registry change")
            except Exception as err:  # Redis away: try again at the next tick
                log.warning("retriever tuning watch: %s", err)
