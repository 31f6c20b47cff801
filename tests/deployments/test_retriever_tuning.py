"""The retriever that learns from the registry, on the real cluster: an operator asks for a tuning
run (admin API), the Ray task trains and keeps the candidate (min_gain is set so that any candidate
counts as better: the keeping path is under test; the refusing one is in
tests/services/retrieval/test_model_versions.py), the retriever replica switches to it while
retrieval requests keep coming, and a rollback switches back. No answer in between misses."""
from __future__ import annotations

import threading
import time

import httpx
import pytest


@pytest.fixture(scope="module")
def cluster_overrides(tmp_path_factory) -> dict:
    return {"retriever_tuning": {"auto": False, "epochs": 1, "min_gain": -100.0,
                                 "models_path": str(tmp_path_factory.mktemp("retriever-models"))}}


@pytest.fixture
def task_prompts(serve_cluster) -> dict:
    """One query per zoo task: {task: prompt}."""
    prompts = {}
    for q in serve_cluster.zoo.queries:
        prompts.setdefault(q.task, q.inputs)
    return prompts


def wait_for(what, check, timeout_s: float = 900.0):
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(2)


def test_tune_keep_switch_and_roll_back_while_retrieval_answers(serve_cluster, task_prompts):
    url, admin = serve_cluster.url, serve_cluster.admin
    headers = {"Authorization": f"Bearer {serve_cluster.api_key}"}

    def retriever_model():
        return httpx.get(f"{url}/admin/status", headers=admin, timeout=60).json()["retrievers"][0]["retriever_model"]

    assert httpx.get(f"{url}/admin/retriever/models", headers=admin, timeout=30).json()["active"] is None
    refused = httpx.post(f"{url}/admin/retriever/rollback", headers=admin, timeout=30)
    assert refused.status_code == 404 and "no earlier retriever model" in refused.text
    assert httpx.post(f"{url}/admin/retriever/tune", timeout=30).status_code == 401  # admin key only

    answers, bad, stop = [], [], threading.Event()

    def ask() -> None:
        while not stop.is_set():
            for task, prompt in task_prompts.items():
                r = httpx.post(f"{url}/v1/retrieve", headers=headers, timeout=120,
                               # every adapter counts (a tuned model gives unrelated ones negative cosines, which
                               # the default min_similarity 0 drops): a short answer means a half-filled index
                               json={"input": prompt, "lora": {"top_k": 3, "min_similarity": -1}})
                answers.append(r.status_code)
                if r.status_code != 200 or len(r.json()["data"][0]["adapters"]) != 3:
                    bad.append(r.text[:200])
            time.sleep(0.2)

    asker = threading.Thread(target=ask)
    asker.start()
    try:
        started = httpx.post(f"{url}/admin/retriever/tune", headers=admin, timeout=30).json()
        assert started["status"] == "started"
        assert httpx.post(f"{url}/admin/retriever/tune", headers=admin, timeout=30).json()["status"] == "busy"
        report = wait_for("the tuning run", lambda: (lambda m: m if m["last_tuning"] else None)(
            httpx.get(f"{url}/admin/retriever/models", headers=admin, timeout=30).json()))
        last = report["last_tuning"]
        assert last["status"] == "kept" and last["refit"] is True, last  # served: the recipe refit on every sample
        assert 0 <= last["candidate_top1"] <= 100 and 0 <= last["current_top1"] <= 100
        assert report["active"] == last["version"] == "r1"
        wait_for("the replica to switch to r1", lambda: retriever_model() == "r1")
        n_before_rollback = len(answers)
        assert httpx.post(f"{url}/admin/retriever/rollback", headers=admin, timeout=30).json() == {"active": None}
        wait_for("the replica to switch back", lambda: retriever_model() is None)
        wait_for("answers after the rollback", lambda: len(answers) > n_before_rollback + len(task_prompts))
    finally:
        stop.set()
        asker.join(120)
    assert answers and not bad, f"{len(bad)} of {len(answers)} retrievals failed or came back short: {bad[:2]}"
