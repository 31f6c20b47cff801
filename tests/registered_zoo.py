"""The tiny zoo registered through the real admin path, in a Redis database of a test's own, for
tests that need a registry without a cluster."""
from __future__ import annotations

import redis

from cluster.adapter_admin import AdapterAdmin
from services.config import AppConfig


def register_tiny_zoo(zoo, redis_server, store, db: int, **overrides):
    """The tiny zoo registered through the real admin path in Redis database `db` of the module's
    redis-server (flushed first; a module's cluster uses 0). Returns (admin, client, config)."""
    url = redis_server.url.rsplit("/", 1)[0] + f"/{db}"
    client = redis.Redis.from_url(url)
    client.flushdb()
    cfg = AppConfig.model_validate({"base_model": {"path": str(zoo.base), "name": "tiny-random-llama"},
                                    "adapter_store": {"path": str(store)},
                                    "redis": {"url": url, "start_local": False}, **overrides})
    admin = AdapterAdmin.from_config(cfg)
    for card in zoo.cards:
        admin.add(card.model_name, zoo.adapters[card.model_name], card)
    return admin, client, cfg
