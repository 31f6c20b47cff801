"""Composer replicas: the shared base model, the adapter pool, continuous batching, streaming."""
from __future__ import annotations

import json
import logging

from ray import serve

from services.config import AppConfig
from deployments import metrics
from services.wiring import make_adapter_cache, make_placement, make_registry
from services.lora.compatibility import GainTable
from services.serving.catalog import CatalogCache
from services.serving.composer_service import ComposeJob, ComposerService

log = logging.getLogger("ray.serve")


@serve.deployment(name="Composer")
class Composer:
    def __init__(self, config: dict, engine=None):
        """`engine` may be injected (tests); otherwise composition.engine's engine is built with the
        configured base model (services/serving/engines.py)."""
        from services.serving.engines import make_engine

        cfg = AppConfig.model_validate(config)
        comp = cfg.composition
        if comp.torch_threads is not None:  # Ray set OMP_NUM_THREADS from num_cpus; this overrides it
            import torch

            torch.set_num_threads(comp.torch_threads)
        if engine is None:
            engine = make_engine(cfg)
        registry = make_registry(cfg)
        # Adapter files come through this node's cache (fetched from object storage and verified).
        self.service = ComposerService(engine, make_adapter_cache(cfg, registry),
                                       max_prompt_tokens=comp.max_prompt_tokens, on_batch=metrics.observe_batch)
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        self.placement = make_placement(cfg)
        self.catalog = CatalogCache(registry)
        self._synced_generation = None

    async def generate(self, job: ComposeJob):
        """Streams text pieces (str, or {"text", "logprobs"} when asked), then the GenerationResult as a dict."""
        async for item in self.service.generate(job):
            if isinstance(item, (str, dict)):
                yield item
                continue
            log.info(json.dumps({"event": "compose", "request_id": job.request_id, "replica": self.replica_id,
                                 "adapters": job.plan.keys(), "composition": job.plan.composition.value,
                                 "completion_tokens": item.completion_tokens, "finish_reason": item.finish_reason}))
            yield dict(vars(item))  # not dataclasses.asdict: its deep copy of every logprob entry cost seconds

    async def measure_gains(self, jobs: list[tuple[str, list[str]]],
                            cards: dict[str, list[tuple[str, str]]]) -> list[GainTable]:
        """Gain tables of adapter versions with their neighbours, on their cards (services/rollout/compatibility.py)."""
        return await self.service.measure_gains(jobs, cards)

    async def record_routing_stats(self) -> dict:
        """Called by Serve every few seconds: feeds the affinity router and the placement heartbeat,
        and drops adapter versions the registry has rolled away from."""
        catalog = self.catalog.get()
        if catalog.generation != self._synced_generation:
            dropped, busy = await self.service.follow_catalog(catalog)
            if not busy:  # otherwise sync again next time, when their rows have left
                self._synced_generation = catalog.generation
            if dropped:
                log.info("dropped stale adapter versions %s", dropped)
        resident, pool = self.service.resident(), self.service.pool_stats()
        metrics.set_pool_stats(self.replica_id, pool)
        try:
            self.placement.heartbeat(self.replica_id, resident, queue_len=self.service.queue_len, pool=pool)
        except Exception as err:  # placement is advisory; routing must not depend on Redis
            log.warning("placement heartbeat failed: %s", err)
        return {"resident": resident}

    def status(self) -> dict:
        return {
            "replica_id": self.replica_id,
            "resident": self.service.resident(),
            "queue_len": self.service.queue_len,
            "pool": self.service.pool_stats(),
            "batches": self.service.batch_stats(),
        }
