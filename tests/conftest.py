"""Fixtures shared by all tests: offline model loading, a real Redis server, a tiny Llama."""
from __future__ import annotations

import os

import pytest

# No model hub here: every load must come from local folders.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Ray reads these at import: a local Ray then binds 127.0.0.1 only (tests touch loopback only).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


@pytest.fixture(scope="module")
def redis_server():
    """A real redis-server on a free loopback port, one per test module."""
    from cluster.redis_server import RedisServer

    server = RedisServer().start()
    yield server
    server.stop()


@pytest.fixture
def redis_client(redis_server):
    """A client on a flushed database."""
    import redis

    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    client.flushdb()
    yield client
    client.close()


@pytest.fixture(scope="session")
def tiny_zoo(tmp_path_factory):
    """A demo zoo built on a tiny random Llama: base/, 3 PEFT adapters, cards.json, queries.json."""
    from cluster.demo.zoo import build_zoo

    return build_zoo(tmp_path_factory.mktemp("tiny_zoo"), tiny=True, progress=False)
