"""Bring-up on a busy machine: `loraretriever up`'s start path (LocalCluster.start: Ray, Serve's
proxy, the app, readiness) while another process keeps every core busy, and the one-sentence
failure when something does not start."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import httpx
import psutil
import pytest
from ray.exceptions import ActorDiedError

from cluster.errors import UserError
from cluster.serve_start import PATIENCE_ENV, retried, serve_timeouts_env, startup_patience_s


def test_patience_grows_with_the_load_per_core_and_can_be_set(monkeypatch):
    monkeypatch.delenv(PATIENCE_ENV, raising=False)
    idle, busy = startup_patience_s(cores=2, load=0.0), startup_patience_s(cores=2, load=4.0)
    assert busy == 3 * idle and startup_patience_s(cores=2, load=1000.0) == 900.0
    assert float(serve_timeouts_env(busy)["RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S"]) > 5  # Serve's own: 5 s
    monkeypatch.setenv(PATIENCE_ENV, "42")
    assert startup_patience_s(cores=2, load=4.0) == 42.0
    monkeypatch.setenv(PATIENCE_ENV, "soon")
    with pytest.raises(UserError, match=PATIENCE_ENV):
        startup_patience_s()


def test_a_start_whose_actor_died_is_tried_again_then_said_in_one_sentence(monkeypatch):

    monkeypatch.setattr(time, "sleep", lambda s: None)
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise ActorDiedError()
        return "started"

    assert retried("Serve's HTTP proxy", flaky, time.monotonic() + 60, "run it again") == "started"
    assert len(calls) == 3

    def dead():
        raise ActorDiedError()

    with pytest.raises(UserError) as err:
        retried("Serve's HTTP proxy", dead, time.monotonic() + 1, "free some CPU and run `loraretriever up` again")
    message = str(err.value)
    assert message.startswith("Serve's HTTP proxy did not start in time (ActorDiedError")
    assert message.endswith("run `loraretriever up` again") and "\n" not in message


def test_up_starts_the_cluster_while_another_process_keeps_both_cores_busy(tiny_zoo, redis_server, tmp_path,
                                                                           monkeypatch):
    import cluster.bringup as bringup
    from cluster.adapter_admin import AdapterAdmin
    from cluster.redis_server import free_port
    from cluster_settings import ADMIN_KEY, cluster_config

    monkeypatch.setattr(bringup, "STATE_FILE", tmp_path / "up.json")  # not the user's running `up`
    monkeypatch.setenv("LORARETRIEVER_ADMIN_KEY", ADMIN_KEY)
    redis_server.client().flushdb()
    cfg = cluster_config(tiny_zoo, redis_server.url, tmp_path / "store", free_port())
    admin = AdapterAdmin.from_config(cfg)
    for card in tiny_zoo.cards:
        admin.add(card.model_name, tiny_zoo.adapters[card.model_name], card)

    cores = os.cpu_count() or 2
    burners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(cores)]
    time.sleep(1)  # running, as a job already busy when `up` starts would be
    assert startup_patience_s() >= startup_patience_s(load=float(cores)), "the busy processes were not seen"
    # The start itself gets the longest patience: this test is about surviving the load (Serve's
    # stretched proxy checks, retries), not about how well the patience guesses its length.
    monkeypatch.setenv(PATIENCE_ENV, "900")
    cluster = bringup.LocalCluster(cfg, demo=False)
    try:
        cluster.start()
        burnt = sum(psutil.Process(b.pid).cpu_times().user for b in burners)
        reply = httpx.post(f"{cluster.url}/v1/completions", timeout=300,
                           headers={"Authorization": f"Bearer {tiny_zoo_key(redis_server)}"},
                           json={"model": "auto", "prompt": tiny_zoo.queries[0].inputs, "max_tokens": 4})
    finally:
        for b in burners:
            b.kill()
            b.wait()
        cluster.stop()
    assert all(b.returncode is not None for b in burners)
    assert burnt > 5, f"the busy processes ran only {burnt:.1f} CPU s: the machine was not busy"
    assert reply.status_code == 200, reply.text
    assert reply.json()["choices"][0]["lora"]["adapters"], "retrieval found no adapter"


def tiny_zoo_key(redis_server) -> str:
    from services.tenancy.tenants import TenantStore

    return TenantStore(redis_server.client()).add("busy")
