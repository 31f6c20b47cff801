"""Secrets: API keys, the admin key and the Redis password never appear in an answer or a log,
and the admin API refuses tenant keys.

The module's cluster runs against a redis-server that requires a password, handed to the
replicas the documented way (redis.password_env). The test drives error paths (bad keys, bad
bodies, refused uploads, Redis refusing the password mid-flight), then reads every file of this
cluster's Ray session (Serve access and replica logs, runtime-env agent, raylet, GCS) and the
driver's own log records."""
from __future__ import annotations

import logging
import os
import secrets
from pathlib import Path

import httpx
import pytest

from services.schemas import ErrorResponse

PASSWORD_ENV = "LORARETRIEVER_REDIS_PASSWORD"  # a LORARETRIEVER_* name: local replicas inherit it
REDIS_PASSWORD = "redis-pw-" + secrets.token_hex(12)


@pytest.fixture(scope="module")
def redis_server():
    from cluster.redis_server import RedisServer

    server = RedisServer(password=REDIS_PASSWORD).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def cluster_overrides():
    os.environ[PASSWORD_ENV] = REDIS_PASSWORD  # read by the driver's admin tool and by every replica
    yield {"redis": {"password_env": PASSWORD_ENV}}
    os.environ.pop(PASSWORD_ENV, None)


@pytest.fixture(scope="module")
def secrets_seen():
    """Every secret of the cluster; tests add the keys they make."""
    return {"redis password": REDIS_PASSWORD}


@pytest.fixture(scope="module")
def answers():
    """Every response (status line, headers, body) the tests got, to be searched for secrets."""
    return []


@pytest.fixture(scope="module")
def call(serve_cluster, answers):
    def call(method: str, path: str, authorization: str | None = None, headers: dict | None = None,
             **kwargs) -> httpx.Response:
        headers = {**(headers or {}), **({"Authorization": authorization} if authorization else {})}
        r = httpx.request(method, f"{serve_cluster.url}{path}", headers=headers, timeout=60, **kwargs)
        answers.append(f"{r.status_code} {dict(r.headers)} {r.text}")
        return r
    return call


@pytest.fixture(scope="module", autouse=True)
def driver_logs():
    """Log records of this process (admin tool, fixtures) at every level."""
    records: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(self.format(record))

    handler, root = Keep(level=logging.DEBUG), logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    yield records
    root.removeHandler(handler)
    root.setLevel(old_level)


ADMIN_ROUTES = [("GET", "/admin/status"), ("GET", "/admin/adapters"), ("GET", "/admin/adapters/add"),
                ("POST", "/admin/adapters"), ("POST", "/admin/adapters/add/promote"),
                ("POST", "/admin/adapters/add/canary"), ("POST", "/admin/adapters/add/rollback"),
                ("DELETE", "/admin/adapters/add"), ("POST", "/admin/adapters/add/pin"),
                ("POST", "/admin/adapters/add/unpin"), ("GET", "/admin/adapters/add/history"),
                ("POST", "/admin/tenants"), ("GET", "/admin/tenants"), ("DELETE", "/admin/tenants/acme"),
                ("GET", "/admin/tenants/acme/usage"), ("DELETE", "/admin/adapters/add/canary"),
                ("DELETE", "/admin/adapters/add/versions/v1"), ("POST", "/admin/adapters/add/visibility"),
                ("POST", "/admin/gc"), ("POST", "/admin/retriever/tune"), ("GET", "/admin/retriever/models"),
                ("POST", "/admin/retriever/rollback")]
BODIES = {"/admin/adapters": {"name": "x", "card": {"model_name": "x", "sample": [{"inputs": "hi"}]}, "path": "/x"},
          "/admin/adapters/add/promote": {"version": "v1"}, "/admin/adapters/add/canary": {"version": "v1", "percent": 5},
          "/admin/tenants": {"name": "intruder"}, "/admin/adapters/add/visibility": {"visibility": "private"}}


def test_openapi_lists_exactly_these_admin_routes(serve_cluster):
    paths = httpx.get(f"{serve_cluster.url}/openapi.json", timeout=30).json()["paths"]
    listed = {(m.upper(), p) for p, ops in paths.items() if p.startswith("/admin") for m in ops}
    assert listed == {(m, p.replace("/add", "/{name}").replace("/acme", "/{name}").replace("/v1", "/{version}"))
                      for m, p in ADMIN_ROUTES}, sorted(paths)


@pytest.mark.parametrize("method, path", ADMIN_ROUTES, ids=[f"{m} {p}" for m, p in ADMIN_ROUTES])
def test_admin_endpoints_refuse_tenant_keys(serve_cluster, call, secrets_seen, method, path):
    key = serve_cluster.api_key
    secrets_seen["tenant key"] = key
    body = {"json": BODIES[path]} if path in BODIES else {}
    for authorization, status in [(f"Bearer {key}", 403), (None, 401), (f"Basic {key}", 401),
                                  ("Bearer " + "k" * 10_000, 403), (f"bearer {key[:-1]}", 403)]:
        r = call(method, path, authorization, **body)
        assert r.status_code == status, (authorization and authorization[:20], r.text)
        assert ErrorResponse.model_validate(r.json()).error.type in ("permission_error", "authentication_error")
    # Nothing was done: acme still works, no tenant 'intruder', adapter 'add' still active.
    assert call("GET", "/v1/models", f"Bearer {key}").status_code == 200
    listed = call("GET", "/admin/tenants", serve_cluster.admin["Authorization"]).json()["data"]
    assert "intruder" not in [t["name"] for t in listed]


def test_error_paths_with_keys(serve_cluster, call, secrets_seen):
    """Keys in every position a careless handler might echo: wrong keys, keys as model or adapter
    names, a key an admin just created; none may come back in an error."""
    admin = serve_cluster.admin["Authorization"]
    secrets_seen["admin key"] = admin.split()[1]
    created = call("POST", "/admin/tenants", admin, json={"name": "second"})
    assert created.status_code == 200
    second = created.json()["api_key"]
    secrets_seen["created key"] = second
    tenant = f"Bearer {second}"
    statuses = [
        call("POST", "/v1/completions", f"Bearer {second}x", json={"model": "auto", "prompt": "hi"}).status_code,
        call("POST", "/v1/completions", tenant, json={"model": "auto", "prompt": "hi", "max_tokens": 10**9}).status_code,
        call("POST", "/v1/completions", tenant, content=b"{broken", headers={"Content-Type": "application/json"}
             ).status_code,
        call("POST", "/v1/retrieve", tenant, json={"input": "hi", "lora": {"top_k": 99}}).status_code,
        call("GET", "/admin/adapters", tenant).status_code,
        call("POST", "/admin/adapters", admin, json={**BODIES["/admin/adapters"], "path": "/nonexistent"}).status_code,
        call("GET", "/admin/tenants/nobody/usage", tenant).status_code,
    ]
    assert statuses == [401, 400, 400, 400, 403, 400, 403]
    r = call("POST", "/v1/completions", tenant, json={"model": "tiny-random-llama", "prompt": "hi", "max_tokens": 2})
    assert r.status_code == 200, r.text


def test_redis_refusing_the_password_gives_errors_without_it(serve_cluster, redis_server, call, secrets_seen):
    """Redis changes its password under the cluster and drops every connection: requests fail
    (or go on from memory), and no answer carries either password; then it recovers."""
    import redis

    admin = serve_cluster.admin["Authorization"]
    client = redis_server.client()
    new_password = "rotated-" + secrets.token_hex(8)
    secrets_seen["rotated redis password"] = new_password
    client.config_set("requirepass", new_password)
    try:
        redis.Redis.from_url(redis_server.url, password=new_password).client_kill_filter(_type="normal")
        write = call("POST", "/admin/tenants", admin, json={"name": "during-outage"})
        assert write.status_code == 503, write.text
        ErrorResponse.model_validate(write.json())
        read = call("GET", "/admin/adapters", admin)
        assert read.status_code == 503, read.text
        assert "redis" in read.json()["error"]["message"].lower()
    finally:
        redis.Redis.from_url(redis_server.url, password=new_password).config_set("requirepass", REDIS_PASSWORD)
    assert call("GET", "/admin/adapters", admin).status_code == 200


def session_files() -> list[Path]:
    import ray

    session = Path(ray._private.worker.global_worker.node.get_session_dir_path())
    return [p for p in session.rglob("*") if p.is_file() and not p.is_symlink() and p.stat().st_size < 200 * 2**20]


def test_no_secret_in_any_answer_or_log(serve_cluster, answers, secrets_seen, driver_logs):
    """Runs last: every answer above, every file of this Ray session, every driver log record."""
    assert {"tenant key", "admin key", "created key", "redis password"} <= set(secrets_seen)
    creation = [a for a in answers if '"api_key"' in a]
    assert len(creation) == 1  # the one answer that must hold a key: the admin creating it
    for name, secret in secrets_seen.items():
        for answer in answers:
            if answer in creation and name == "created key":
                continue
            assert secret not in answer, f"{name} in an answer: {answer[:300]}"
    files = session_files()
    assert any("replica_loraretriever_Ingress" in f.name for f in files)
    assert any("runtime_env_agent" in f.name for f in files)
    leaks = []
    for path in files:
        data = path.read_bytes()
        leaks += [f"{name} in {path}" for name, secret in secrets_seen.items() if secret.encode() in data]
    assert not leaks, leaks
    print(f"\nsecrets: {len(secrets_seen)} secrets, {len(answers)} answers, {len(files)} session files, "
          f"{len(driver_logs)} driver log records: 0 leaks")
    text = "\n".join(driver_logs)
    assert driver_logs and not [name for name, secret in secrets_seen.items() if secret in text]
