"""Autoscaling on this machine: composer replicas grow under load and shrink after it,
and no request fails while they do."""
from __future__ import annotations

import threading
import time

import httpx
import pytest


@pytest.fixture(scope="module")
def cluster_overrides() -> dict:
    fast = {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 1,
            "upscale_delay_s": 1, "downscale_delay_s": 4}
    return {"deployments": {"composer": {"autoscaling": fast, "num_cpus": 0.1}},
            "composition": {"max_batch_size": 2}}


def composer_replicas() -> int:
    from ray import serve

    from cluster.bringup import APP_NAME

    states = serve.status().applications[APP_NAME].deployments["Composer"].replica_states
    return sum(n for state, n in states.items() if state == "RUNNING")


def wait_for(condition, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.5)
    return False


def test_composers_scale_up_under_load_and_down_after(serve_cluster):
    assert composer_replicas() == 1
    client = httpx.Client(base_url=serve_cluster.url, timeout=120,
                          headers={"Authorization": f"Bearer {serve_cluster.api_key}"})
    body = {"model": "uppercase", "prompt": "Write this in capital letters: stone river", "max_tokens": 24}
    results, stop = [], threading.Event()

    def load():
        deadline = time.monotonic() + 150
        while not stop.is_set() and time.monotonic() < deadline:
            results.append(client.post("/v1/completions", json=body).status_code)

    workers = [threading.Thread(target=load) for _ in range(6)]
    for w in workers:
        w.start()
    try:
        grew = wait_for(lambda: composer_replicas() == 2, 120)
        time.sleep(3)  # requests keep flowing while the new replica joins
    finally:
        stop.set()
        for w in workers:
            w.join(timeout=150)
    shrank = wait_for(lambda: composer_replicas() == 1, 90)
    after = client.post("/v1/completions", json=body).status_code
    assert grew and shrank
    assert results and set(results) == {200} and after == 200
