"""Faults under steady load on a real cluster (real Redis, Ray Serve, HTTP, PEFT files).

Each test runs a few client threads against the cluster, injects one fault, and counts
every request that did not succeed. The promise: none is lost, apart from requests in
flight on a killed replica, and the Ingress sends those again (nothing had reached the
client yet), so there too the count is zero. Each test prints a `FAULT-REPORT {json}` line
with what it measured (run with -s to see them); docs/reliability.md quotes them.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time
from dataclasses import dataclass

import httpx
import psutil
import pytest
import redis

LOAD_CLIENTS = 3


@pytest.fixture(scope="module")
def cluster_overrides() -> dict:
    # Room for a replica restart inside one request's time limit. No compatibility scoring on add:
    # it loads each new adapter at once, and the store-loss test needs adapters nobody loaded yet.
    return {"server": {"request_timeout_s": 90}, "composition": {"compatibility_neighbours": 0}}


@dataclass
class Outcome:
    kind: str
    started: float
    ended: float
    status: int  # HTTP status; 0 = no answer (connection error), -1 = error event inside a 200 stream
    detail: str


class SteadyLoad:
    """`clients` threads sending `requests` in turn until stopped: at most `max_s` seconds and
    `max_requests` per thread. Every outcome is kept, so failures are counted exactly."""

    def __init__(self, url: str, api_key: str, requests: list[tuple[str, str, dict]], *,
                 clients: int = LOAD_CLIENTS, max_s: float = 150, max_requests: int = 400):
        self.url, self.requests = url, requests
        self.headers = {"Authorization": f"Bearer {api_key}"}
        self.clients, self.max_s, self.max_requests = clients, max_s, max_requests
        self.outcomes: list[Outcome] = []
        self.lock = threading.Lock()
        self.stop_event = threading.Event()
        self.threads: list[threading.Thread] = []

    def __enter__(self) -> "SteadyLoad":
        self.threads = [threading.Thread(target=self._loop, args=(i,), daemon=True) for i in range(self.clients)]
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop_event.set()
        for t in self.threads:
            t.join(timeout=120)
        assert not any(t.is_alive() for t in self.threads), "a load thread hung"

    def _loop(self, i: int) -> None:
        deadline = time.monotonic() + self.max_s
        with httpx.Client(base_url=self.url, headers=self.headers, timeout=120) as client:
            for n in range(self.max_requests):
                if self.stop_event.is_set() or time.monotonic() > deadline:
                    return
                kind, path, body = self.requests[(i + n * self.clients) % len(self.requests)]
                started = time.monotonic()
                status, detail = self._send(client, path, body)
                with self.lock:
                    self.outcomes.append(Outcome(kind, started, time.monotonic(), status, detail))

    @staticmethod
    def _send(client: httpx.Client, path: str, body: dict) -> tuple[int, str]:
        try:
            if body.get("stream"):
                with client.stream("POST", path, json=body) as r:
                    text = r.read().decode()
                if r.status_code == 200 and ('"error"' in text or "[DONE]" not in text):
                    return -1, text[-300:]
                return r.status_code, text[:300]
            r = client.post(path, json=body)
            return r.status_code, r.text[:300]
        except httpx.HTTPError as err:
            return 0, repr(err)

    def snapshot(self) -> list[Outcome]:
        with self.lock:
            return list(self.outcomes)

    def failures(self) -> list[Outcome]:
        return [o for o in self.snapshot() if o.status != 200]

    def successes_after(self, t: float) -> int:
        return sum(1 for o in self.snapshot() if o.status == 200 and o.started >= t)

    def wait_successes_after(self, t: float, n: int, timeout_s: float) -> float | None:
        """Seconds from t until n requests started after t have succeeded; None on timeout."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            ok = sorted(o.ended for o in self.snapshot() if o.status == 200 and o.started >= t)
            if len(ok) >= n:
                return ok[n - 1] - t
            time.sleep(0.1)
        return None


def mixed_requests(zoo, names: list[str] | None = None) -> list[tuple[str, str, dict]]:
    """Named-adapter completions, retrieval-driven chat (plain and streamed) and bare retrieval."""
    names = names or sorted(zoo.adapters)
    prompts = {q.task: q.inputs for q in zoo.queries}
    out = []
    for name in names:
        prompt = prompts.get(name, "hello")
        out.append(("named", "/v1/completions", {"model": name, "prompt": prompt, "max_tokens": 4}))
        out.append(("auto", "/v1/chat/completions", {"model": "auto", "max_tokens": 4,
                                                     "messages": [{"role": "user", "content": prompt}]}))
    out.append(("stream", "/v1/chat/completions", {"model": "auto", "max_tokens": 4, "stream": True,
                                                   "messages": [{"role": "user", "content": "hello there"}]}))
    out.append(("retrieve", "/v1/retrieve", {"input": "hello there"}))
    return out


def report(fault: str, load: SteadyLoad, **figures) -> None:
    outcomes = load.snapshot()
    lost = [o for o in outcomes if o.status != 200]
    print("FAULT-REPORT " + json.dumps({"fault": fault, "requests": len(outcomes), "lost": len(lost),
                                        **{k: round(v, 2) if isinstance(v, float) else v for k, v in figures.items()}}))
    for o in lost:
        print(f"  lost {o.kind} status {o.status}: {o.detail[:200]}")


def replica_pids(deployment: str) -> set[int]:
    """PIDs of this cluster's replica processes of one deployment (descendants of this test process only)."""
    pids = set()
    for proc in psutil.Process().children(recursive=True):
        try:
            cmd = " ".join(proc.cmdline())
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if cmd.startswith("ray::ServeReplica") and f":{deployment}" in cmd:
            pids.add(proc.pid)
    return pids


def wait_for(condition, timeout_s: float, step_s: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(step_s)
    return False


def kill_replica(deployment: str) -> tuple[int, float]:
    """SIGKILL this cluster's one replica of `deployment`; returns its pid and the kill time."""
    pids = replica_pids(deployment)
    assert len(pids) == 1, f"expected one {deployment} replica, found {pids}"
    pid = pids.pop()
    os.kill(pid, signal.SIGKILL)
    return pid, time.monotonic()


def test_index_sync_recreates_a_lost_collection_from_the_registry(tiny_zoo, redis_server, tmp_path):
    """A Qdrant server restarted without its storage has no collection at all: the next refresh
    recreates it and indexes the registry again (before, every search failed until a restart).
    The registry is the real stack's: Redis, the adapter store, card embeddings from the embedder."""
    from cluster.adapter_admin import AdapterAdmin
    from services.config import AppConfig
    from services.retrieval.index import AdapterIndex
    from services.serving.index_sync import IndexSync

    redis_url = redis_server.url.rsplit("/", 1)[0] + "/5"  # a database of its own: the module's cluster uses 0
    redis.Redis.from_url(redis_url).flushdb()
    cfg = AppConfig.model_validate({"base_model": {"path": str(tiny_zoo.base), "name": "tiny-random-llama"},
                                    "adapter_store": {"path": str(tmp_path / "store")},
                                    "redis": {"url": redis_url, "start_local": False}})
    admin = AdapterAdmin.from_config(cfg)
    for card in tiny_zoo.cards:
        admin.add(card.model_name, tiny_zoo.adapters[card.model_name], card)
    names = sorted(tiny_zoo.adapters)
    queries = admin.embedder.encode([q.inputs for q in tiny_zoo.queries])

    def ranking() -> list[list[str]]:
        return [[a.name for a in r.adapters] for r in index.search(queries, top_k=len(names))]

    index = AdapterIndex(admin.embedder.dim, memory_search=False)  # reads Qdrant itself, as with a server
    sync = IndexSync(admin.registry, index, min_interval_s=0.0)
    assert sorted(sync.refresh(force=True).names()) == names
    before = ranking()
    index.client.delete_collection(index.target())
    with pytest.raises(Exception):
        index.names()
    assert sorted(sync.refresh().names()) == names
    assert ranking() == before


def test_an_adapter_whose_files_vanished_after_its_cpu_copy_was_dropped_fails_only_its_rows(tiny_zoo, tmp_path):
    """Composer level: an adapter the CPU tier let go of is re-read from the store when next
    used. If its files are gone by then, only the rows that use it fail (503 naming it); before,
    the re-read inside the forward failed every row of the batch."""
    import asyncio

    from services.lora.engine import CompositionEngine
    from services.schemas import CompositionPlan, UsedAdapter
    from services.serving.composer_service import ComposeJob, ComposerService
    from services.errors import Unavailable

    names = sorted(tiny_zoo.adapters)[:2]
    for name in names:
        shutil.copytree(tiny_zoo.adapters[name], tmp_path / name / "v1")
    engine = CompositionEngine.from_pretrained(tiny_zoo.base, device="cpu", max_adapters_per_row=1,
                                               device_slots=1, cpu_slots=1)
    service = ComposerService(engine, tmp_path, max_prompt_tokens=256)

    def job(name: str) -> ComposeJob:
        plan = CompositionPlan(adapters=[UsedAdapter(name=name, version="v1", weight=1.0)], composition="selection")
        return ComposeJob(request_id=f"r-{name}", prompt="1 + 2", plan=plan, max_tokens=3)

    async def run(name: str):
        try:
            return [item async for item in service.generate(job(name))][-1]
        except Exception as err:
            return err

    async def scenario():
        for name in names:  # load both: one slot each tier, so the first one's copies are let go
            assert not isinstance(await run(name), Exception)
        assert f"{names[0]}@v1" not in engine.pool.cpu and f"{names[0]}@v1" not in engine.pool.slot_of
        shutil.rmtree(tmp_path / names[0])
        return await asyncio.gather(run(names[0]), run(names[1]), run(names[1]))

    lost, *others = asyncio.run(scenario())
    assert isinstance(lost, Unavailable) and f"{names[0]}@v1" in lost.message, lost
    assert all(not isinstance(r, Exception) and r.completion_tokens > 0 for r in others), others
    assert service.batcher.stats.rows == 4  # two loads, then the two healthy rows: the lost one never joined


def test_killed_composer_replica_is_restarted_and_no_request_is_lost(serve_cluster):
    """SIGKILL the composer while it generates: a streamed answer already under way ends with a
    clean error event; a non-streamed request queued on that replica is sent again by the
    Ingress and succeeds; requests sent meanwhile wait for the restarted replica."""
    client = httpx.Client(base_url=serve_cluster.url, timeout=120,
                          headers={"Authorization": f"Bearer {serve_cluster.api_key}"})
    long = {"model": "uppercase", "prompt": "Write this in capital letters: a long story", "max_tokens": 512}
    queued: dict = {}
    requests = [r for r in mixed_requests(serve_cluster.zoo) if r[0] != "stream"]  # the stream is probed below
    with SteadyLoad(serve_cluster.url, serve_cluster.api_key, requests) as load:
        assert load.wait_successes_after(0, 6, 60) is not None
        with client.stream("POST", "/v1/completions", json={**long, "stream": True}) as stream:
            lines = stream.iter_lines()
            next(line for line in lines if line.startswith("data: "))  # generation is under way
            waiter = threading.Thread(target=lambda: queued.update(r=client.post("/v1/completions", json=long)))
            waiter.start()
            time.sleep(0.5)  # the second request reaches the busy replica and queues there
            pid, killed = kill_replica("Composer")
            rest = "\n".join(lines)
        assert wait_for(lambda: replica_pids("Composer") - {pid}, 60), "Ray did not restart the composer"
        restarted = time.monotonic() - killed
        recovery = load.wait_successes_after(killed, 10, 90)
        waiter.join(120)
    in_flight = sum(1 for o in load.snapshot() if o.started < killed < o.ended)
    report("composer replica SIGKILL", load, in_flight_at_kill=in_flight + 2, replica_restart_s=restarted,
           recovery_s=recovery, queued_request_status=queued["r"].status_code)
    assert "answer is incomplete" in rest and rest.rstrip().endswith("data: [DONE]"), rest[-500:]  # cut cleanly
    assert queued["r"].status_code == 200, queued["r"].text  # in flight on the dead replica: sent again
    assert recovery is not None, "requests sent after the kill did not succeed"
    assert load.failures() == []  # in-flight ones were sent again, later ones waited for the new replica


def test_killed_retriever_loses_its_index_which_is_rebuilt_from_the_registry(serve_cluster):
    """Embedded Qdrant lives in the retriever replica: losing the process loses the index."""
    client = httpx.Client(base_url=serve_cluster.url, timeout=60,
                          headers={"Authorization": f"Bearer {serve_cluster.api_key}"})
    queries = [q.inputs for q in serve_cluster.zoo.queries][:6]

    def retrieved() -> list[list[str]]:
        r = client.post("/v1/retrieve", json={"input": queries, "lora": {"top_k": 8}})
        assert r.status_code == 200, r.text
        return [[a["name"] for a in item["adapters"]] for item in r.json()["data"]]

    before = retrieved()
    assert {n for names in before for n in names} == set(serve_cluster.zoo.adapters)
    with SteadyLoad(serve_cluster.url, serve_cluster.api_key, mixed_requests(serve_cluster.zoo)) as load:
        assert load.wait_successes_after(0, 6, 60) is not None
        pid, killed = kill_replica("Retriever")
        assert wait_for(lambda: replica_pids("Retriever") - {pid}, 60), "Ray did not restart the retriever"
        recovery = load.wait_successes_after(killed, 10, 90)
    report("retriever replica SIGKILL (embedded index lost)", load, recovery_s=recovery)
    assert recovery is not None
    assert load.failures() == []
    assert retrieved() == before  # the new replica indexed every adapter again, same ranking


def test_operator_index_rebuild_under_load_loses_nothing(serve_cluster):
    """`loraretriever index rebuild`: every retriever drops its index and rebuilds it from Redis."""
    from cluster.status import rebuild_index

    client = httpx.Client(base_url=serve_cluster.url, timeout=60,
                          headers={"Authorization": f"Bearer {serve_cluster.api_key}"})
    status = lambda: httpx.get(f"{serve_cluster.url}/readyz", timeout=30)  # noqa: E731
    assert status().status_code == 200
    with SteadyLoad(serve_cluster.url, serve_cluster.api_key, mixed_requests(serve_cluster.zoo)) as load:
        assert load.wait_successes_after(0, 6, 60) is not None
        asked = time.monotonic()
        assert "rebuild" in rebuild_index(serve_cluster.cfg)
        recovery = load.wait_successes_after(asked, 10, 60)
    report("index rebuild (operator)", load, recovery_s=recovery)
    assert recovery is not None and load.failures() == []
    found = client.post("/v1/retrieve", json={"input": "hello", "lora": {"top_k": 8}}).json()["data"][0]["adapters"]
    assert {a["name"] for a in found} == set(serve_cluster.zoo.adapters)


def test_redis_restart_keeps_serving_and_writes_fail_cleanly_then_work(serve_cluster, redis_server):
    admin = httpx.Client(base_url=serve_cluster.url, headers=serve_cluster.admin, timeout=60)
    store = redis.Redis.from_url(redis_server.url)
    with SteadyLoad(serve_cluster.url, serve_cluster.api_key, mixed_requests(serve_cluster.zoo)) as load:
        assert load.wait_successes_after(0, 6, 60) is not None
        store.save()  # a Redis with persistence: it comes back with its data
        redis_server.proc.kill()
        redis_server.proc.wait(10)
        down = time.monotonic()
        # Writes fail with a clear 503 naming Redis, and change nothing.
        pin = admin.post("/admin/adapters/add/pin")
        tenant = admin.post("/admin/tenants", json={"name": "during-outage"})
        for r in (pin, tenant):
            assert r.status_code == 503, r.text
            message = r.json()["error"]["message"]
            assert "redis" in message.lower() and "unavailable" in message.lower(), message
        # Known adapters keep serving while Redis is away.
        served_while_down = load.wait_successes_after(down, 8, 60)
        time.sleep(max(0.0, down + 5 - time.monotonic()))  # an outage of at least 5 s
        redis_server.start()
        up = time.monotonic()
        assert wait_for(lambda: admin.post("/admin/adapters/add/pin").status_code == 200, 30, 0.25)
        write_recovery = time.monotonic() - up
        assert admin.post("/admin/adapters/add/unpin").status_code == 200
        after = load.wait_successes_after(time.monotonic(), 6, 60)
    report("redis SIGKILL + restart", load, redis_down_s=up - down, requests_ok_while_down=load.successes_after(down)
           - load.successes_after(up), writes_back_after_s=write_recovery)
    assert served_while_down is not None and after is not None
    assert load.failures() == []
    tenants = admin.get("/admin/tenants").json()["data"]
    assert "during-outage" not in {t["name"] for t in tenants}  # the refused write left nothing behind
    assert admin.get("/admin/adapters/add").json()["pinned"] is False


def test_adapter_files_disappearing_affect_only_that_adapter(serve_cluster, tmp_path):
    """Store files lost: a resident adapter keeps serving from memory; one never loaded gets a
    clear 503 naming it; every other request succeeds."""
    store = serve_cluster.cfg.adapter_store.path
    zoo = serve_cluster.zoo
    admin = httpx.Client(base_url=serve_cluster.url, headers=serve_cluster.admin, timeout=60)
    client = httpx.Client(base_url=serve_cluster.url, timeout=60,
                          headers={"Authorization": f"Bearer {serve_cluster.api_key}"})
    resident_name = "uppercase"
    prompt = next(q.inputs for q in zoo.queries if q.task == resident_name)
    assert client.post("/v1/completions", json={"model": resident_name, "prompt": prompt,
                                                "max_tokens": 2}).status_code == 200  # now loaded
    # Two fresh adapters nobody has used yet: one loses its whole folder, one only its weights.
    card = next(c for c in zoo.cards if c.model_name == "add").model_dump(mode="json")
    lost = {}
    for name in ("lost-folder", "lost-weights"):
        r = admin.post("/admin/adapters", json={"name": name, "card": {**card, "model_name": name},
                                                "path": str(zoo.adapters["add"])})
        assert r.status_code == 200, r.text
        lost[name] = f"{store}/{name}/{r.json()['version']}"
    shutil.rmtree(lost["lost-folder"])
    os.remove(f"{lost['lost-weights']}/adapter_model.safetensors")
    resident_version = admin.get(f"/admin/adapters/{resident_name}").json()["active_version"]
    shutil.rmtree(f"{store}/{resident_name}/{resident_version}")

    others = [n for n in zoo.adapters if n != resident_name]
    requests = [r for r in mixed_requests(zoo, others) if r[0] == "named"]  # not retrieval: it may pick the lost ones
    requests.append(("resident", "/v1/completions", {"model": resident_name, "prompt": prompt, "max_tokens": 2}))
    requests.append(("base", "/v1/completions", {"model": "tiny-random-llama", "prompt": "hi", "max_tokens": 2}))
    with SteadyLoad(serve_cluster.url, serve_cluster.api_key, requests) as load:
        assert load.wait_successes_after(0, 4, 60) is not None
        answers = {name: client.post("/v1/completions", json={"model": name, "prompt": "1 + 2", "max_tokens": 2})
                   for name in lost for _ in range(2)}
        # The lost adapters in a batch with others (the load's requests) do not fail the others.
        assert load.wait_successes_after(time.monotonic(), 8, 60) is not None
    report("adapter store files deleted", load, lost_adapter_statuses={n: r.status_code for n, r in answers.items()})
    for name, r in answers.items():
        assert r.status_code == 503, r.text
        message = r.json()["error"]["message"]
        assert name in message and "adapter store" in message, message
    assert load.failures() == []
    assert {o.kind for o in load.snapshot() if o.status == 200} >= {"resident", "named", "base"}
