"""Retriever replicas: embed prompts in batches, search the adapter index kept in step with the registry."""
from __future__ import annotations

import logging

from ray import serve

from services.config import AppConfig
from services.wiring import make_index, make_registry, redis_client
from services.retrieval.embedder import Embedder
from services.retrieval.index import IndexInputError
from services.serving.index_sync import REBUILD_EPOCH_KEY, IndexSync

log = logging.getLogger("ray.serve")


@serve.deployment(name="Retriever")
class Retriever:
    def __init__(self, config: dict):
        cfg = AppConfig.model_validate(config)
        self.embedder = Embedder(cfg.embedder.model_path, cfg.embedder.instruction, batch_size=cfg.embedder.batch_size)
        redis = redis_client(cfg)
        self.sync = IndexSync(make_registry(cfg), make_index(cfg, self.embedder.dim),
                              rebuild_epoch=lambda: redis.get(REBUILD_EPOCH_KEY))
        self.sync.refresh(force=True)

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def _embed(self, texts: list[str]) -> list:
        return list(self.embedder.encode(texts))  # one (dim,) row per caller

    async def retrieve(self, text: str, **search: object) -> dict:
        """RetrievalResult as a dict; `search` holds AdapterIndex.search keywords."""
        index = self.sync.refresh()
        vector = await self._embed(text)
        try:
            return index.search(vector[None, :], **search)[0].model_dump()
        except IndexInputError:
            raise
        except Exception as err:  # the index lost its collection since the last refresh: rebuild, search again
            log.warning("index search failed (%s); rebuilding from the registry", err)
            return self.sync.refresh(force=True).search(vector[None, :], **search)[0].model_dump()

    async def embed(self, texts: list[str]):
        """Card embeddings for the admin API: (n, dim) float32."""
        return self.embedder.encode(texts)

    def status(self) -> dict:
        return {"adapters": len(self.sync.index.names()), "generation": self.sync.generation}
