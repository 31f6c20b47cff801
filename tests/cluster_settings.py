"""The config of a test cluster (the tiny zoo, float32, a free port) and its admin key, shared by
conftest's serve_cluster and tests that start a cluster of their own."""
from __future__ import annotations

ADMIN_KEY = "test-admin-key-0123456789"


def cluster_config(zoo, redis_url: str, store, port: int, **overrides):
    from services.config import AppConfig

    cfg = {
        # float32, not the product's auto: tests compare answers with the float32 engine (the oracle)
        "base_model": {"path": str(zoo.base), "name": "tiny-random-llama", "dtype": "float32"},
        "adapter_store": {"path": str(store)},
        "redis": {"url": redis_url, "start_local": False},
        "server": {"port": port, "request_timeout_s": 60},
        "composition": {"max_batch_size": 16, "device_slots": 8, "cpu_slots": 16},
        "deployments": {name: {"num_cpus": 0.1} for name in ("ingress", "retriever", "composer")},
        # no background fine-tuning in the shared test clusters (tests of it turn it on)
        "retriever_tuning": {"auto": False},
    }
    return AppConfig.model_validate(deep_merge(cfg, overrides))


def deep_merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out
