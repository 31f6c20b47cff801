"""The real cluster on three Ray nodes on this machine: a head (ingress, retriever, Serve's controller
and proxy) and two workers that each hold one composer through a custom resource (`lr_composer`).
Every node has its own data folder (LORARETRIEVER_HOME) and no adapter folder is shared: the
adapter store is a bucket in a real S3-compatible server on loopback (SeaweedFS), and each worker
reaches it through a link of its own (tests/held_link.py), so a test can stall one worker's fetches.

Tests run in file order on one cluster and build on each other's state. Figures (fetch time per
adapter, time until a promotion is served everywhere) are printed and written to
$LR_MULTINODE_FIGURES when set (docs/state.md quotes them)."""
from __future__ import annotations

import base64
import json
import os
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
from cluster_settings import ADMIN_KEY
from held_link import HeldLink

from cluster.demo.variants import variant_adapter

pytestmark = pytest.mark.slow

COMPOSER_RESOURCE = "lr_composer"
HEAD_RESOURCE = "lr_head"
PROMOTION_DEADLINE_S = 60.0  # the stated bound: a promoted version is served by every composer within it
FIGURES: dict = {}


def upload_body(name: str, folder: Path, card: dict, **extra) -> dict:
    files = {f: base64.b64encode((folder / f).read_bytes()).decode()
             for f in ("adapter_config.json", "adapter_model.safetensors")}
    return {"name": name, "card": {**card, "model_name": name}, "files": files, **extra}


@pytest.fixture(scope="module")
def three_nodes(redis_server, tiny_zoo, s3_server, tmp_path_factory):
    import ray
    from ray import serve
    from ray.cluster_utils import Cluster

    from cluster.bringup import APP_NAME
    from cluster.local_ray import loopback_ray_env
    from cluster.redis_server import free_port
    from deployments.app import build_app
    from services.config import AppConfig, ObjectStoreConfig
    from services.registry.object_store import ObjectFolders
    from services.tenancy.tenants import TenantLimits, TenantStore

    os.environ["LORARETRIEVER_ADMIN_KEY"] = ADMIN_KEY
    redis_server.client().flushdb()
    port = free_port()
    s3_port = int(s3_server.endpoint.rsplit(":", 1)[1])
    links = [HeldLink(s3_port), HeldLink(s3_port)]
    homes = [tmp_path_factory.mktemp(f"worker{i}-home") for i in range(2)]
    credentials = {k: v for k, v in s3_server.env().items() if k != "AWS_ENDPOINT_URL"}
    head_env = {**loopback_ray_env(), **credentials, "AWS_ENDPOINT_URL": s3_server.endpoint}
    os.environ.update(head_env)  # this process uploads and tampers with bucket objects too
    base_uri = "s3://lr-multinode/models/tiny-random-llama"  # each node fetches it into its own cache
    ObjectFolders(ObjectStoreConfig(allow_http=True)).upload(
        tiny_zoo.base, [str(p.relative_to(tiny_zoo.base)) for p in tiny_zoo.base.rglob("*") if p.is_file()], base_uri)
    cfg = AppConfig.model_validate({
        "base_model": {"path": base_uri, "dtype": "float32"},
        # The endpoint is each node's AWS_ENDPOINT_URL: the head's is the server, a worker's its link.
        "adapter_store": {"path": str(tmp_path_factory.mktemp("head-only-folder")), "uri": "s3://lr-multinode/adapters",
                          "objects": {"allow_http": True, "region": "us-east-1", "retries": 1, "timeout_s": 120}},
        "redis": {"url": redis_server.url, "start_local": False},
        "server": {"port": port, "request_timeout_s": 120},
        # compatibility_neighbours 0: adding a version scores no pairs on a composer, so the first fetch
        # of a version is the one a request makes (the checksum test tampers before it).
        "composition": {"max_batch_size": 8, "device_slots": 8, "cpu_slots": 16, "torch_threads": 1,
                        "compatibility_neighbours": 0},
        "deployments": {
            "ingress": {"num_cpus": 0.1, "resources": {HEAD_RESOURCE: 1}},
            "retriever": {"num_cpus": 0.1, "resources": {HEAD_RESOURCE: 1}},
            "composer": {"num_cpus": 0.1, "resources": {COMPOSER_RESOURCE: 1},
                         "autoscaling": {"min_replicas": 2, "max_replicas": 2}},
            # Serve's power-of-two choice spreads a burst over both composers; the affinity router
            # would keep an adapter on the replica that loaded it first (tested elsewhere).
            "composer_router": "power_of_two",
        },
    })
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "resources": {HEAD_RESOURCE: 4}, "include_dashboard": False, "env_vars": head_env,
        "node_ip_address": "127.0.0.1"})
    workers = [cluster.add_node(num_cpus=1, resources={COMPOSER_RESOURCE: 1}, node_ip_address="127.0.0.1",
                                env_vars={**head_env, "AWS_ENDPOINT_URL": link.endpoint,
                                          "LORARETRIEVER_HOME": str(home)})
               for link, home in zip(links, homes)]
    ray.init(address=cluster.address, log_to_driver=False)
    api_key = TenantStore(redis_server.client()).add("acme", TenantLimits(requests_per_second=1000, burst=2000,
                                                                          max_concurrent=64))
    serve.start(http_options={"host": "127.0.0.1", "port": port, "location": "HeadOnly"})
    started = time.monotonic()
    serve.run(build_app(cfg), name=APP_NAME, route_prefix="/")
    print(f"3-node serve.run: {time.monotonic() - started:.1f} s")
    url = f"http://127.0.0.1:{port}"
    admin = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=180)
    cards = {c.model_name: c.model_dump() for c in tiny_zoo.cards}
    for name in sorted(tiny_zoo.adapters):  # through the admin API on the head: into the bucket
        reply = admin.post("/admin/adapters", json=upload_body(name, tiny_zoo.adapters[name], cards[name]))
        assert reply.status_code == 200, reply.text
    yield SimpleNamespace(url=url, admin=admin, api_key=api_key, cfg=cfg, zoo=tiny_zoo, cards=cards, links=links,
                          homes=homes, workers=workers, cluster=cluster, redis=redis_server, s3=s3_server)
    admin.close()
    serve.shutdown()
    ray.shutdown()
    cluster.shutdown()
    for link in links:
        link.close()
    if os.environ.get("LR_MULTINODE_FIGURES"):
        Path(os.environ["LR_MULTINODE_FIGURES"]).write_text(json.dumps(FIGURES, indent=1))


def client(c) -> httpx.Client:
    return httpx.Client(base_url=c.url, headers={"Authorization": f"Bearer {c.api_key}"}, timeout=180)


def complete(http: httpx.Client, model: str, max_tokens: int = 4) -> httpx.Response:
    return http.post("/v1/completions", json={"model": model, "prompt": "12 + 7 =", "max_tokens": max_tokens})


def composers(c) -> dict:
    """Live composer replicas from their placement heartbeats: replica id -> ReplicaState."""
    from services.registry.placement import PlacementStore

    return PlacementStore(c.redis.client()).replicas()


def wait_until(condition, what: str, timeout_s: float):
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting until {what}")
        time.sleep(0.2)


def wait_known(c, model: str) -> None:
    """Until the ingress's catalog (refreshed when the registry moves) lists `model`."""
    with client(c) as http:
        wait_until(lambda: http.get(f"/v1/models/{model}").status_code == 200, f"the ingress knows {model}", 30)


def burst(c, model: str, n: int = 8, max_tokens: int = 4) -> list[httpx.Response]:
    """n concurrent requests naming `model`."""
    out: list = [None] * n

    def one(i):
        with client(c) as http:
            out[i] = complete(http, model, max_tokens)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def test_composers_run_on_the_two_workers_and_nothing_else_does(three_nodes):
    import ray

    alive = {n["NodeID"]: n["Resources"] for n in ray.nodes() if n["Alive"]}
    assert len(alive) == 3
    assert {n for n, res in alive.items() if COMPOSER_RESOURCE in res} == {w.node_id for w in three_nodes.workers}
    # Each worker offers one lr_composer and the two composers hold both; ingress and retriever
    # hold the head's lr_head.
    wait_until(lambda: len(composers(three_nodes)) == 2, "both composers send heartbeats", 60)
    available = ray.available_resources()
    assert available.get(COMPOSER_RESOURCE, 0) == 0 and available[HEAD_RESOURCE] == 2
    for home in three_nodes.homes:  # each worker fetched the base model from the bucket into its own folder
        models = (home / "node-cache" / "models").iterdir()
        assert [m for m in models if (m / ".complete").is_file() and (m / "model.safetensors").is_file()]


def test_an_adapter_added_on_the_head_is_answered_by_composers_on_both_workers(three_nodes, tmp_path):
    c = three_nodes
    name = "uppercase"
    src = variant_adapter(c.zoo.adapters[name], tmp_path / "new", 1.25)
    reply = c.admin.post("/admin/adapters", json=upload_body("shouty", src, {**c.cards[name], "model_name": "shouty"}))
    assert reply.status_code == 200, reply.text
    assert reply.json()["uri"].startswith("s3://lr-multinode/adapters/shouty/v1-")
    wait_known(c, "shouty")

    def both_hold_it():
        for response in burst(c, "shouty"):
            assert response.status_code == 200, response.text
            assert response.json()["choices"][0]["lora"]["adapters"][0]["version"] == "v1"
        states = composers(c)
        return len(states) == 2 and all("shouty@v1" in s.resident for s in states.values()) and states

    states = wait_until(both_hold_it, "both composers answered with shouty@v1", 120)
    for home in c.homes:  # each worker fetched it into its own data folder
        assert (home / "node-cache" / "adapters" / "shouty" / "v1" / ".checksum").is_file()
    per_fetch = [s.pool["fetch_seconds"] / s.pool["fetches"] for s in states.values() if s.pool.get("fetches")]
    FIGURES["fetch_seconds_per_adapter"] = sorted(round(x, 4) for x in per_fetch)
    FIGURES["fetch_bytes_per_adapter"] = sorted(s.pool["fetch_bytes"] / s.pool["fetches"] for s in states.values())
    print(f"fetch time per adapter on the workers: {[round(x, 3) for x in per_fetch]} s")


def test_adapters_add_registers_files_already_in_a_bucket(three_nodes, tmp_path):
    import contextlib
    import io

    from cluster.cli import main
    from services.registry.object_store import ObjectFolders

    c = three_nodes
    src = variant_adapter(c.zoo.adapters["uppercase"], tmp_path / "trained", 0.75)
    uri = "s3://lr-multinode/training-runs/run-7"
    ObjectFolders(c.cfg.adapter_store.objects).upload(src, ["adapter_config.json", "adapter_model.safetensors"], uri)
    card = tmp_path / "card.json"
    card.write_text(json.dumps({**c.cards["uppercase"], "model_name": "from-bucket"}))
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["adapters", "add", "from-bucket", uri, "--card", str(card), "--url", c.url])
    assert code == 0, err.getvalue()
    assert json.loads(out.getvalue())["uri"] == uri  # registered where it is, not copied
    wait_known(c, "from-bucket")
    with client(c) as http:
        reply = complete(http, "from-bucket")
    assert reply.status_code == 200, reply.text
    with contextlib.redirect_stderr(err):
        assert main(["adapters", "add", "x", uri, "--url", c.url]) != 0
    assert "give the card with --card" in err.getvalue()


def test_a_version_promoted_under_traffic_is_served_everywhere_within_the_stated_time(three_nodes, tmp_path):
    c = three_nodes
    src = variant_adapter(c.zoo.adapters["uppercase"], tmp_path / "v2", 0.5)
    reply = c.admin.post("/admin/adapters", json=upload_body("shouty", src, {**c.cards["uppercase"],
                                                                              "model_name": "shouty"}, activate=False))
    assert reply.status_code == 200, reply.text
    assert reply.json()["version"] == "v2"
    failures, served, stop = [], [], threading.Event()

    def traffic():
        with client(c) as http:
            while not stop.is_set():
                sent = time.monotonic()
                r = complete(http, "shouty")
                if r.status_code != 200:
                    failures.append((r.status_code, r.text[:300]))
                else:
                    served.append((sent, r.json()["choices"][0]["lora"]["adapters"][0]["version"]))

    threads = [threading.Thread(target=traffic) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        time.sleep(2)
        promoted = time.monotonic()
        assert c.admin.post("/admin/adapters/shouty/promote", json={"version": "v2", "force": True}).status_code == 200
        states = wait_until(lambda: (s := composers(c)) and all("shouty@v2" in x.resident for x in s.values())
                            and len(s) == 2 and s, "every composer serves shouty@v2", PROMOTION_DEADLINE_S)
        everywhere = time.monotonic() - promoted
        time.sleep(2)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not failures, failures[:3]
    first_v2 = min(t for t, v in served if v == "v2") - promoted
    last_v1 = max((t for t, v in served if v == "v1"), default=promoted) - promoted
    assert all(v == "v2" for t, v in served if t > promoted + everywhere)
    assert len(states) == 2
    FIGURES["promotion"] = {"first_v2_answer_s": round(first_v2, 3), "last_v1_request_sent_s": round(last_v1, 3),
                            "every_composer_holds_v2_s": round(everywhere, 3), "requests": len(served)}
    print(f"promotion: {FIGURES['promotion']}")


def test_a_worker_killed_while_it_fetches_loses_no_request(three_nodes, tmp_path):
    c = three_nodes
    src = variant_adapter(c.zoo.adapters["uppercase"], tmp_path / "late", 2.0)
    assert c.admin.post("/admin/adapters", json=upload_body("late", src, {**c.cards["uppercase"],
                                                                           "model_name": "late"})).status_code == 200
    wait_known(c, "late")
    for link in c.links:
        link.hold()
    result: dict = {}

    def request():
        with client(c) as http:
            result["response"] = complete(http, "late", 6)

    sender = threading.Thread(target=request)
    sender.start()
    wait_until(lambda: any(link.waiting for link in c.links), "a worker's fetch reaches its held link", 60)
    fetching = next(i for i, link in enumerate(c.links) if link.waiting)
    other = 1 - fetching
    c.links[other].release()
    killed = time.monotonic()
    c.cluster.remove_node(c.workers[fetching], allow_graceful=False)  # its link stays held: it never fetched
    sender.join(180)
    FIGURES["killed_worker_answer_after_kill_s"] = round(time.monotonic() - killed, 3)
    response = result["response"]
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["lora"]["adapters"][0]["name"] == "late"
    survivor = wait_until(lambda: (s := composers(c)) and any("late@v1" in x.resident for x in s.values()) and s,
                          "the surviving composer holds late@v1", 30)
    assert (c.homes[other] / "node-cache" / "adapters" / "late" / "v1").is_dir()
    assert not (c.homes[fetching] / "node-cache" / "adapters" / "late" / "v1").exists()
    assert survivor


def test_a_fetched_file_that_fails_its_checksum_is_refused_and_never_served(three_nodes, tmp_path):
    from services.lora.adapter_files import SAFETENSORS_FILE
    from services.registry.object_store import ObjectFolders

    c = three_nodes
    src = variant_adapter(c.zoo.adapters["uppercase"], tmp_path / "spoiled", 3.0)
    reply = c.admin.post("/admin/adapters", json=upload_body("spoiled", src, {**c.cards["uppercase"],
                                                                               "model_name": "spoiled"}))
    assert reply.status_code == 200, reply.text
    other = variant_adapter(c.zoo.adapters["uppercase"], tmp_path / "other", 4.0)  # valid, not the registered files
    ObjectFolders(c.cfg.adapter_store.objects).upload(other, [SAFETENSORS_FILE], reply.json()["uri"])
    wait_known(c, "spoiled")
    for response in burst(c, "spoiled", n=4):
        assert response.status_code == 503, response.text
        assert "adapter 'spoiled@v1' refused" in response.json()["error"]["message"]
    assert all("spoiled@v1" not in s.resident for s in composers(c).values())
    with client(c) as http:  # the composers serve everything else as before
        assert complete(http, "shouty").status_code == 200
