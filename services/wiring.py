"""Build the engines' collaborators (Redis, registry, placement, index) from the config.

One place, so the deployments, the command line and the tests wire them identically."""
from __future__ import annotations

import os
from pathlib import Path

import redis

from services.config import AppConfig, ConfigError, data_home

DEMO_BASE_NAME = "SmolLM2-135M-Instruct"


def redis_client(cfg: AppConfig) -> redis.Redis:
    password = os.environ.get(cfg.redis.password_env) if cfg.redis.password_env else None
    return redis.Redis.from_url(cfg.redis.url, password=password, socket_timeout=2.0, socket_connect_timeout=2.0)


def base_model_path(cfg: AppConfig, *, config_only: bool = False) -> Path:
    """The base model folder; 'demo' = the SmolLM2 folder `loraretriever demo build` writes; an object
    store URI = this node's copy, fetched once per node (services/registry/model_cache.py; with
    `config_only`, config.json alone)."""
    from services.registry.object_store import is_remote

    if cfg.base_model.path == "demo":
        path = data_home() / "demo" / "base"
    elif is_remote(cfg.base_model.path):
        from services.registry.model_cache import node_model_folder

        path = node_model_folder(cfg.base_model.path, node_cache_root(cfg), make_object_folders(cfg),
                                 config_only=config_only)
    else:
        path = Path(cfg.base_model.path)
    if not (path / "config.json").is_file():
        raise ConfigError(f"base model folder {path} has no config.json (for the demo: `loraretriever demo build`)")
    return path


def base_model_name(cfg: AppConfig) -> str:
    """The id clients use for the base model (and adapters record as their base)."""
    if cfg.base_model.name:
        return cfg.base_model.name
    return DEMO_BASE_NAME if cfg.base_model.path == "demo" else cfg.base_model.path.rstrip("/").rsplit("/", 1)[-1]


def make_placement(cfg: AppConfig):
    from services.registry.placement import PlacementStore

    return PlacementStore(redis_client(cfg))


def make_registry(cfg: AppConfig):
    """The adapter registry over the configured Redis and adapter store."""
    from transformers import AutoConfig

    from services.registry.registry import AdapterRegistry

    return AdapterRegistry(
        redis_client(cfg), make_adapter_store(cfg),
        base_config=AutoConfig.from_pretrained(base_model_path(cfg, config_only=True)),
        base_model=base_model_name(cfg),
        max_rank=cfg.composition.max_rank, allow_unsafe_pickle=cfg.adapter_store.allow_unsafe_pickle,
        objects=make_object_folders(cfg),
    )


def make_object_folders(cfg: AppConfig):
    from services.registry.object_store import ObjectFolders

    return ObjectFolders(cfg.adapter_store.objects)


def make_adapter_store(cfg: AppConfig):
    """Where uploaded versions go: the folder `adapter_store.path`, or the bucket `adapter_store.uri`."""
    from services.registry.bucket_store import BucketAdapterStore
    from services.registry.store import AdapterStore

    if cfg.adapter_store.uri:
        return BucketAdapterStore(cfg.adapter_store.uri, make_object_folders(cfg))
    return AdapterStore(cfg.adapter_store.path)


def node_cache_root(cfg: AppConfig) -> Path:
    """This node's folder for what it fetches from object storage (adapter versions, the base model)."""
    return Path(cfg.adapter_store.cache_path) if cfg.adapter_store.cache_path else data_home() / "node-cache"


def adapter_cache_path(cfg: AppConfig) -> Path:
    return node_cache_root(cfg) / "adapters"


def make_adapter_cache(cfg: AppConfig, registry):
    """The node's NodeAdapterCache over `registry`: how every composer engine gets adapter files."""
    from services.registry.node_cache import NodeAdapterCache, registry_resolver

    return NodeAdapterCache(adapter_cache_path(cfg), registry_resolver(registry, cfg.adapter_store.path),
                            make_object_folders(cfg))


def make_index(cfg: AppConfig, dim: int, *, collection: str | None = None, in_memory: bool = False,
               model_scoring: str = "centroid"):
    """The configured index; collection: another alias on the same Qdrant (a tuned retriever model's);
    in_memory: an embedded index of this process only (never the configured folder, which one client holds);
    model_scoring: the serving model's own scoring, used unless retrieval.scoring sets one."""
    from services.retrieval.index import AdapterIndex

    api_key = os.environ.get(cfg.qdrant.api_key_env) if cfg.qdrant.api_key_env else None
    return AdapterIndex(dim, url=cfg.qdrant.url, path=":memory:" if in_memory else cfg.qdrant.path,
                        collection=collection or cfg.qdrant.collection, scoring=cfg.retrieval.scoring or model_scoring,
                        api_key=api_key)
