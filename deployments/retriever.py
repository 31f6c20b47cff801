"""Retriever replicas: embed prompts in batches, search the adapter index kept in step with the registry."""
from __future__ import annotations

import asyncio
import logging

from ray import serve

from deployments import metrics
from services.config import AppConfig, replica_threads
from services.wiring import make_index, make_registry, redis_client
from services.retrieval.embedder import embedder_from_config
from services.retrieval.model_versions import RetrieverModels
from services.serving.index_sync import IndexSync, process_id
from services.serving.lexical_follower import LexicalFollower
from services.serving.model_follower import ModelFollower, ServingModel, prepare_model

log = logging.getLogger("ray.serve")


@serve.deployment(name="Retriever")
class Retriever:
    # How often a replica follows the registry without traffic: the index writer must apply an
    # adapter added on a quiet cluster, and keep its writer lease (services/serving/index_sync.py).
    FOLLOW_EVERY_S = 1.0

    async def __init__(self, config: dict):
        cfg = AppConfig.model_validate(config)
        if cfg.embedder.threads is None:  # the replica's own CPUs: both cores where it reserved them
            cfg.embedder.threads = replica_threads(cfg.deployments.retriever.num_cpus)
        self.embedder = embedder_from_config(cfg.embedder)  # the configured one: card embeddings in the registry
        registry, redis = make_registry(cfg), redis_client(cfg)
        writer_id = f"retriever:{process_id()}"
        sync = IndexSync(registry, make_index(cfg, self.embedder.dim), redis=redis, writer_id=writer_id)
        sync.refresh(force=True)
        models = RetrieverModels(redis, cfg.retriever_tuning.root())
        # answers come from the active retriever model's (embedder, index), prepared off the event loop
        self.models = ModelFollower(ServingModel(None, self.embedder, sync), models.active_version,
                                    lambda version: prepare_model(cfg, registry, redis, models, version, writer_id))
        self.models.poll()
        # the hybrid score's lexical side, rebuilt from the registry's cards when it changes
        self.lexical = LexicalFollower(registry, cfg.retrieval.hybrid_weight) if cfg.retrieval.hybrid else None
        if self.lexical is not None:
            self.lexical.refresh()
        self._follower = asyncio.get_running_loop().create_task(self._follow())

    async def _follow(self) -> None:
        while True:
            await asyncio.sleep(self.FOLLOW_EVERY_S)
            self.models.poll()
            self.models.serving().sync.refresh()
            if self.lexical is not None:
                await asyncio.to_thread(self.lexical.refresh)  # a rebuild fits TF-IDF on every card: off the loop

    def __del__(self):
        if hasattr(self, "models"):  # a replica shut down hands the writer lock over at once
            self.models.current.sync.release()

    async def retrieve(self, text: str, **search: object) -> dict:
        """RetrievalResult as a dict; `search` holds AdapterIndex.search keywords."""
        self.models.current.sync.index.check_options(search)  # a bad option fails its own request, not its batch
        return await self._retrieve((text, search))

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def _retrieve(self, requests: list[tuple[str, dict]]) -> list[dict]:
        """One embedding call and one index search call for the whole batch, both of one model."""
        model = self.models.serving()
        index = model.sync.refresh()
        before = model.embedder.cache.stats()
        vectors = model.embedder.encode([text for text, _ in requests])  # (batch, dim)
        after = model.embedder.cache.stats()
        metrics.observe_embedding_cache(after["hits"] - before["hits"], after["misses"] - before["misses"])
        options = [search for _, search in requests]
        lexical, weight = self.lexical, None
        if lexical is not None and model.version is not None and lexical.configured_weight is None:
            weight = model.hybrid_weight  # chosen at the model's tuning (1.0: its embedding alone)
        wide = lexical.widen(options, weight) if lexical is not None else options
        try:
            results = index.search_batch(vectors, wide)
        except Exception as err:  # the index lost its collection since the last refresh: rebuild, search again
            log.warning("index search failed (%s); rebuilding from the registry", err)
            results = model.sync.refresh(force=True).search_batch(vectors, wide)
        if lexical is not None:
            results = lexical.rerank(results, [text for text, _ in requests], options, weight)
        return [r.model_dump() for r in results]

    async def embed(self, texts: list[str]):
        """Card embeddings for the admin API, by the configured embedder whatever model serves: (n, dim) float32."""
        return self.embedder.encode(texts)

    def status(self) -> dict:
        model = self.models.current
        return {"adapters": len(model.sync.index.names()), "generation": model.sync.generation,
                "index_writer": model.sync.writes, "retriever_model": model.version,
                "scoring": model.sync.index.scoring, "hybrid_weight": model.hybrid_weight,
                "embedder": {"backend": model.embedder.backend, "threads": model.embedder.threads},
                "embedding_cache": model.embedder.cache.stats(),
                "hybrid": self.lexical.status() if self.lexical is not None else None}
