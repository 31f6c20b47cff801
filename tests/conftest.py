"""Fixtures shared by all tests: offline model loading, a real Redis server, a tiny Llama, and a
real cluster on this machine for the HTTP tests (tests/deployments, tests/reliability): redis-server,
local Ray, the Serve app on a free loopback port, the tiny demo zoo registered. One cluster per
test module (Ray start-up costs ~15 s)."""
from __future__ import annotations

import atexit
import os
import sys
from types import SimpleNamespace

import httpx
import pytest

# No model hub here: every load must come from local folders.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Ray reads these at import: a local Ray then binds 127.0.0.1 only (tests touch loopback only).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def pytest_sessionfinish(session, exitstatus):
    """End the process with the session's status once pytest is done, skipping the interpreter's
    teardown. This process starts and stops Ray once per cluster module; Ray does not support
    that (ray-project/ray#31145: threads of an earlier session outlive it), and on CI the teardown
    after every test had passed once segfaulted (exit 139). The tests' own threads of Ray are
    gone (see composer_status); this keeps a native library's teardown from overriding the result."""
    def exit_now() -> None:  # at exit, after pytest's own cleanup restored the streams
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(int(session.exitstatus))

    atexit.register(exit_now)


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


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-compatible server (SeaweedFS) on loopback for the whole session."""
    from cluster.s3_server import S3Server

    server = S3Server().start()
    yield server
    server.stop()


@pytest.fixture
def s3(s3_server, monkeypatch):
    """The S3 server with its credentials in this process's environment (as a k8s Secret puts them),
    the adapter store's object settings for it, and `root`, an s3:// folder of this test's own (in one
    shared bucket: each bucket is a collection of volumes in SeaweedFS)."""
    import secrets

    from services.config import ObjectStoreConfig

    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    config = ObjectStoreConfig(endpoint_url=s3_server.endpoint, region="us-east-1", allow_http=True, retries=1)
    return SimpleNamespace(server=s3_server, config=config, root=f"s3://lr-tests/t{secrets.token_hex(6)}")


@pytest.fixture(scope="module")
def cluster_overrides() -> dict:
    """Config overrides for this module's cluster; a test module redefines it to change them."""
    return {}


@pytest.fixture(scope="module")
def serve_cluster(redis_server, tiny_zoo, tmp_path_factory, cluster_overrides):
    """Yields url, api_key (a tenant 'acme'), admin headers, config and the zoo."""
    # imported here, not at load: `-p tests.conftest` (tests/test_suite_exit.py) runs without tests/ on the path
    from cluster_settings import ADMIN_KEY, cluster_config
    from ray import serve

    from cluster.adapter_admin import AdapterAdmin
    from cluster.bringup import APP_NAME
    from cluster.local_ray import init_local_ray
    from cluster.redis_server import free_port
    from deployments.app import build_app
    from services.tenancy.tenants import TenantLimits, TenantStore

    os.environ["LORARETRIEVER_ADMIN_KEY"] = ADMIN_KEY
    port = free_port()
    cfg = cluster_config(tiny_zoo, redis_server.url, tmp_path_factory.mktemp("store"), port, **cluster_overrides)
    redis_server.client().flushdb()
    admin = AdapterAdmin.from_config(cfg)
    for card in tiny_zoo.cards:
        admin.add(card.model_name, tiny_zoo.adapters[card.model_name], card)
    # Load and fault tests drive the cluster as fast as it answers: acme's request rate is never the
    # limit they meet (tests of the limits use tenants of their own).
    api_key = TenantStore(redis_server.client()).add("acme", TenantLimits(requests_per_second=1000, burst=2000,
                                                                          max_concurrent=64))

    init_local_ray(num_cpus=2)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(cfg), name=APP_NAME, route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    assert httpx.get(f"{url}/readyz", timeout=30).status_code == 200
    yield SimpleNamespace(url=url, api_key=api_key, admin={"Authorization": f"Bearer {ADMIN_KEY}"},
                          cfg=cfg, zoo=tiny_zoo, redis_url=redis_server.url, admin_tool=admin)
    serve.shutdown()
    import ray

    ray.shutdown()


@pytest.fixture
def composer_status(serve_cluster):
    """A call that reads the composer's pool and batch counters through the operators' route,
    GET /admin/status. Over HTTP, not a Serve handle in this process: a handle's router threads
    outlive the module's Ray session and can touch the freed core worker once a later module
    starts Ray again (ray-project/ray#31145; the suite once segfaulted at exit)."""
    def read() -> dict:
        reply = httpx.get(f"{serve_cluster.url}/admin/status", headers=serve_cluster.admin, timeout=30)
        assert reply.status_code == 200, reply.text
        (composer,) = reply.json()["composers"]
        return composer

    return read
