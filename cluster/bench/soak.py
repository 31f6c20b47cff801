"""Soak: mixed load for a long stretch with adapter rollouts in between; does memory stay flat?

    python -m cluster.bench.soak [--zoo DIR] [--seconds 600] [--clients 4] [--out docs]

Starts a redis-server, local Ray and the product's Serve app on the demo zoo (the full one
at ~/.cache/loraretriever/demo by default; `--zoo` for another, e.g. a tiny one), then for
--seconds runs --clients closed-loop clients on loopback with a mix of requests:
  chat      model=auto chat completion (retrieval, top-3 mixture: the product default)
  stream    the same, streamed (SSE)
  named     completion with one named adapter
  retrieve  /v1/retrieve only
Operator rollouts run over the admin API, --rollout-every seconds apart (from the end of one
to the start of the next), on each adapter in turn: add a new version (staged), canary it at
20 %, promote it, and every second time roll back. Every --sample-every seconds the RSS of every process of this
cluster is recorded, grouped by role: each Serve deployment's replicas (ray::...), Ray's
raylet and GCS, its other helpers (agents, monitors, idle workers), redis-server, and this
driver (which also runs the clients and the operator).

Writes OUT/soak.json (the exact command, every sample and request outcome, plus a summary:
RSS per role in the first and the last minute of the load and at every 10th minute, the
slope of the total over the second half, error count, p50/p99 latency per minute and
overall) and OUT/soak.png (RSS and latency over time, with the rollouts marked).
"""
from __future__ import annotations

import os

from cluster.local_ray import LOOPBACK_IMPORT_ENV

os.environ.update(LOOPBACK_IMPORT_ENV)  # before anything imports Ray: bind loopback only

import argparse  # noqa: E402
import asyncio  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import random  # noqa: E402
import secrets  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import httpx  # noqa: E402
import numpy as np  # noqa: E402
import psutil  # noqa: E402

from cluster.bench.run_record import command_line  # noqa: E402
from cluster.demo.variants import variant_adapter  # noqa: E402

log = logging.getLogger("bench.soak")

KINDS = ("chat", "stream", "named", "retrieve", "chat", "named", "chat", "stream")  # the mix, in turn
SERVE_ROLES = ("Composer", "Retriever", "Ingress", "ProxyActor", "ServeController")
ROLES = SERVE_ROLES + ("raylet", "gcs_server", "ray other", "redis", "driver")


def role_of(cmdline: str) -> str:
    """The role of one descendant process, from its command line."""
    if cmdline.startswith("ray::"):
        return next((role for role in SERVE_ROLES if role in cmdline), "ray other")  # ray::IDLE and the like
    program = cmdline.split(" ", 1)[0]
    for role in ("raylet", "gcs_server", "redis"):
        if role in program.rsplit("/", 1)[-1]:
            return role
    return "ray other"  # Ray's agents and monitors (python .../ray/...)


def cluster_rss() -> dict[str, float]:
    """MiB of resident memory per role over this process and all its descendants."""
    me = psutil.Process()
    out = {"driver": me.memory_info().rss / 2**20}
    for proc in me.children(recursive=True):
        try:
            role = role_of(" ".join(proc.cmdline()))
            out[role] = out.get(role, 0.0) + proc.memory_info().rss / 2**20
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    out["total"] = sum(out.values())
    return out


class Recorder:
    def __init__(self):
        self.t0 = time.monotonic()
        self.requests: list[tuple[float, str, int, float]] = []  # (t, kind, status, seconds)
        self.rss: list[dict] = []
        self.rollouts: list[dict] = []
        self.lock = threading.Lock()

    def now(self) -> float:
        return time.monotonic() - self.t0


async def client_loop(i: int, http: httpx.AsyncClient, base: str, queries: list, names: list[str],
                      deadline: float, rec: Recorder, max_tokens: int) -> None:
    k = i
    while time.monotonic() < deadline:
        q = queries[k % len(queries)]
        kind = KINDS[k % len(KINDS)]
        k += 7
        messages = [{"role": "user", "content": q.inputs}]
        started = time.monotonic()
        status = 599
        try:
            if kind == "retrieve":
                r = await http.post(f"{base}/v1/retrieve", json={"input": q.inputs})
                status = r.status_code
            elif kind == "named":
                r = await http.post(f"{base}/v1/completions", json={
                    "model": names[k % len(names)], "prompt": q.inputs, "max_tokens": max_tokens})
                status = r.status_code
            elif kind == "stream":
                body = {"model": "auto", "messages": messages, "max_tokens": max_tokens, "stream": True}
                async with http.stream("POST", f"{base}/v1/chat/completions", json=body) as r:
                    text = "".join([chunk async for chunk in r.aiter_text()])
                    # an error inside a stream arrives as an error event with status 200
                    status = r.status_code if "[DONE]" in text and '"error"' not in text else 598
            else:
                r = await http.post(f"{base}/v1/chat/completions", json={
                    "model": "auto", "messages": messages, "max_tokens": max_tokens})
                status = r.status_code
            if status != 200:
                log.warning("%s request failed: %s", kind, status)
        except httpx.HTTPError as err:
            log.warning("%s request failed: %r", kind, err)
        with rec.lock:
            rec.requests.append((started - rec.t0, kind, status, time.monotonic() - started))


async def run_load(base: str, api_key: str, queries: list, names: list[str], seconds: float, clients: int,
                   rec: Recorder, max_tokens: int) -> None:
    deadline = time.monotonic() + seconds
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=120, limits=limits, headers={"Authorization": f"Bearer {api_key}"}) as http:
        await asyncio.gather(*(client_loop(i, http, base, queries, names, deadline, rec, max_tokens)
                               for i in range(clients)))


def rollout_loop(base: str, admin_key: str, zoo, work: Path, stop: threading.Event, every: float,
                 rec: Recorder) -> None:
    """One rollout every `every` seconds: stage a variant, canary 20 %, promote, maybe roll back."""
    admin = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {admin_key}"}, timeout=300)
    cards = {c.model_name: c.model_dump(mode="json") for c in zoo.cards}
    names = list(zoo.adapters)
    n = 0
    while not stop.wait(every):
        name = names[n % len(names)]
        started = rec.now()
        entry = {"t": started, "adapter": name, "steps": []}
        try:
            folder = variant_adapter(zoo.adapters[name], work / "variants" / f"{name}-{n}", 1.0 + 0.1 * (n + 1))
            r = admin.post("/admin/adapters",
                           json={"name": name, "card": cards[name], "path": str(folder), "activate": False})
            entry["steps"].append(["add", r.status_code])
            version = r.json().get("version") if r.status_code == 200 else None
            if version:
                r = admin.post(f"/admin/adapters/{name}/canary", json={"version": version, "percent": 20})
                entry["steps"].append(["canary", r.status_code])
                if stop.wait(min(10, every / 4)):
                    break
                r = admin.post(f"/admin/adapters/{name}/promote", json={"version": version})
                entry["steps"].append(["promote", r.status_code])
                if n % 2 == 1:
                    if stop.wait(min(10, every / 4)):
                        break
                    r = admin.post(f"/admin/adapters/{name}/rollback")
                    entry["steps"].append(["rollback", r.status_code])
            entry["version"] = version
        except httpx.HTTPError as err:
            entry["steps"].append(["error", repr(err)])
        finally:
            entry["seconds"] = rec.now() - started
            with rec.lock:
                rec.rollouts.append(entry)
            log.info("rollout %d of %s: %s", n, name, entry["steps"])
        n += 1


def sample_loop(stop: threading.Event, every: float, rec: Recorder) -> None:
    while True:
        rss = cluster_rss()
        with rec.lock:
            rec.rss.append({"t": rec.now(), **{k: round(v, 1) for k, v in rss.items()}})
        if stop.wait(every):
            return


def summarize(rec: Recorder, load_start: float, load_end: float) -> dict:
    reqs = [r for r in rec.requests if r[0] >= load_start]
    ok = [r for r in reqs if r[2] == 200]
    lat = np.array([r[3] for r in ok]) if ok else np.array([np.nan])
    in_load = [s for s in rec.rss if load_start <= s["t"] <= load_end + 1]
    minute = 60.0

    def window_mean(lo: float, hi: float) -> dict:
        rows = [s for s in in_load if lo <= s["t"] <= hi] or in_load[:1]
        keys = {k for s in rows for k in s if k != "t"}
        return {k: round(float(np.mean([s.get(k, 0.0) for s in rows])), 1) for k in sorted(keys)}

    second_half = [s for s in in_load if s["t"] >= (load_start + load_end) / 2]
    slope = None
    if len(second_half) >= 3:
        t = np.array([s["t"] for s in second_half]) / 60.0
        slope = float(np.polyfit(t, np.array([s["total"] for s in second_half]), 1)[0])
    per_minute = []
    m = load_start
    while m < load_end:
        rows = [r[3] for r in ok if m <= r[0] < m + minute]
        if rows:
            per_minute.append({"minute": round((m - load_start) / 60), "requests": len(rows),
                               "p50_s": round(float(np.percentile(rows, 50)), 3),
                               "p99_s": round(float(np.percentile(rows, 99)), 3)})
        m += minute
    errors_by_kind: dict[str, int] = {}
    for r in reqs:
        if r[2] != 200:
            errors_by_kind[f"{r[1]}:{r[2]}"] = errors_by_kind.get(f"{r[1]}:{r[2]}", 0) + 1
    rollout_failures = [e for e in rec.rollouts if any(s[1] != 200 for s in e["steps"])]
    return {
        "requests": len(reqs), "errors": len(reqs) - len(ok), "errors_by_kind": errors_by_kind,
        "requests_per_s": round(len(ok) / max(load_end - load_start, 1e-9), 2),
        "p50_s": round(float(np.percentile(lat, 50)), 3), "p99_s": round(float(np.percentile(lat, 99)), 3),
        "rss_mib_first_minute": window_mean(load_start, load_start + minute),
        "rss_mib_last_minute": window_mean(load_end - minute, load_end),
        # one minute's mean at minute 0, 10, 20, ... of the load, then the last minute
        "rss_mib_every_10_min": [{"minute": round((lo - load_start) / minute), **window_mean(lo, lo + minute)}
                                 for lo in [*np.arange(load_start, load_end - 2 * minute, 10 * minute),
                                            load_end - minute]],
        "rss_total_slope_mib_per_min_second_half": None if slope is None else round(slope, 2),
        "rollouts": len(rec.rollouts), "rollout_failures": len(rollout_failures),
        "latency_per_minute": per_minute,
    }


def plot(rec: Recorder, summary: dict, load_start: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(11, 8), sharex=True)
    t = np.array([s["t"] - load_start for s in rec.rss]) / 60
    for role in ("total",) + ROLES:
        if any(role in s for s in rec.rss):
            ax1.plot(t, [s.get(role, np.nan) for s in rec.rss], label=role, lw=2 if role == "total" else 1)
    ax1.set_ylabel("RSS, MiB")
    ax1.set_title(f"RSS of the cluster's processes (start {summary['rss_mib_first_minute'].get('total')} MiB, "
                  f"end {summary['rss_mib_last_minute'].get('total')} MiB)")
    ax1.legend(fontsize=8, ncol=3)
    ok = [r for r in rec.requests if r[2] == 200]
    bad = [r for r in rec.requests if r[2] != 200]
    ax2.scatter([(r[0] - load_start) / 60 for r in ok], [r[3] for r in ok], s=3, alpha=0.3, label="request")
    if bad:
        ax2.scatter([(r[0] - load_start) / 60 for r in bad], [r[3] for r in bad], s=12, c="red", label="error")
    pm = summary["latency_per_minute"]
    ax2.plot([p["minute"] + 0.5 for p in pm], [p["p50_s"] for p in pm], "k-o", label="p50 per minute")
    ax2.plot([p["minute"] + 0.5 for p in pm], [p["p99_s"] for p in pm], "k--x", label="p99 per minute")
    for e in rec.rollouts:
        for ax in (ax1, ax2):
            ax.axvline((e["t"] - load_start) / 60, color="gray", alpha=0.3, lw=0.8)
    ax2.set_yscale("log")
    ax2.set_ylabel("latency, s")
    ax2.set_xlabel("minutes of load (gray lines: rollouts)")
    ax2.set_title(f"{summary['requests']} requests, {summary['errors']} errors, p50 {summary['p50_s']} s, "
                  f"p99 {summary['p99_s']} s")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", type=Path, default=None, help="demo zoo folder (default: the full demo zoo)")
    parser.add_argument("--seconds", type=float, default=600.0, help="length of the load")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--rollout-every", type=float, default=60.0,
                        help="seconds from the end of one rollout to the start of the next")
    parser.add_argument("--sample-every", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=20.0, help="load before the measured window")
    parser.add_argument("--out", type=Path, default=Path("docs"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)

    from ray import serve

    from cluster.bench.serving import Stack
    from cluster.demo.zoo import load_zoo
    from cluster.local_ray import init_local_ray
    from cluster.redis_server import free_port

    zoo = load_zoo(args.zoo)
    queries = [q for q in zoo.queries if q.task in zoo.adapters]
    random.Random(0).shuffle(queries)
    admin_key = secrets.token_urlsafe(24)
    os.environ["LORARETRIEVER_ADMIN_KEY"] = admin_key  # handed to the replicas by init_local_ray
    port = free_port()
    rec = Recorder()
    with tempfile.TemporaryDirectory(prefix="bench-soak-") as tmp:
        stack = Stack(zoo, Path(tmp))
        stop = threading.Event()
        threads: list[threading.Thread] = []
        try:
            cfg = stack.config(port)
            api_key = stack.register(cfg)
            init_local_ray(num_cpus=2)
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            stack.deploy(cfg, naive=False)
            base = f"http://127.0.0.1:{port}"
            threads.append(threading.Thread(target=sample_loop, args=(stop, args.sample_every, rec), daemon=True))
            threads[-1].start()
            log.info("warm-up %.0f s", args.warmup)
            asyncio.run(run_load(base, api_key, queries, list(zoo.adapters), args.warmup, args.clients, rec,
                                 args.max_tokens))
            load_start = rec.now()
            threads.append(threading.Thread(target=rollout_loop, daemon=True, args=(
                base, admin_key, zoo, Path(tmp), stop, args.rollout_every, rec)))
            threads[-1].start()
            log.info("soak %.0f s with %d clients, a rollout every %.0f s", args.seconds, args.clients,
                     args.rollout_every)
            asyncio.run(run_load(base, api_key, queries, list(zoo.adapters), args.seconds, args.clients, rec,
                                 args.max_tokens))
            load_end = rec.now()
            stop.set()
            for th in threads:
                th.join(timeout=120)
            rec.rss.append({"t": rec.now(), **{k: round(v, 1) for k, v in cluster_rss().items()}})
        finally:
            stop.set()
            stack.stop()
    summary = summarize(rec, load_start, load_end)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "soak.json").write_text(json.dumps({
        "command": command_line("cluster.bench.soak", argv),
        "zoo": str(zoo.root), "adapters": len(zoo.adapters), "clients": args.clients, "seconds": args.seconds,
        "max_tokens": args.max_tokens, "rollout_every_s": args.rollout_every, "summary": summary,
        "rollouts": rec.rollouts, "rss_samples": rec.rss,
        "requests": [{"t": round(t - load_start, 3), "kind": k, "status": s, "seconds": round(d, 4)}
                     for t, k, s, d in rec.requests],
    }, indent=1))
    plot(rec, summary, load_start, args.out / "soak.png")
    print(json.dumps({k: v for k, v in summary.items() if k != "latency_per_minute"}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
