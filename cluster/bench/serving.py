"""Closed-loop serving benchmark on loopback: the Serve app against a naive PEFT deployment.

    python -m cluster.bench.serving [--zoo DIR] [--clients 1 2 4 8 16 32 64] [--seconds 15] [--out docs]

Starts a redis-server, local Ray and the product's Serve app on the demo zoo (every adapter
registered), plus cluster.bench.naive_serving (load the PEFT adapter per request, as the
paper's released code does) on the same Ray cluster and Retriever. Then, for each client
count, N clients send chat completions over the zoo's held-out queries (mixed tasks, one
after another, for --seconds) to:
  ours-auto       model=auto, the product defaults    (composition auto: docs/policy.md)
  ours-selection  model=auto, top-1 adapter          (the same work as the naive baseline)
  ours-mixture    model=auto, top-3 adapters, mixed
  naive-peft      retrieve top-1, PeftModel.from_pretrained, generate, unload
and records requests/s, p50/p99 latency, the Server-Timing split (retrieval+planning, waiting
for a batch, forward passes, the rest) and exact-match accuracy. The composer's adapter cache
hit rate comes from its placement heartbeat. A second phase runs two composer replicas with
few device slots under each request router (adapter affinity vs Serve's default) and
compares their hit rates. Writes OUT/serving.json and OUT/serving.png.
"""
from __future__ import annotations

import os

from cluster.bench.run_record import command_line
from cluster.local_ray import LOOPBACK_IMPORT_ENV

os.environ.update(LOOPBACK_IMPORT_ENV)  # before anything imports Ray: bind loopback only

import argparse  # noqa: E402
import asyncio  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import random  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from dataclasses import asdict, dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402

import httpx  # noqa: E402
import numpy as np  # noqa: E402

log = logging.getLogger("bench.serving")

SYSTEMS = {
    "ours-auto": {},  # the product's defaults: composition auto (docs/policy.md)
    "ours-selection": {"lora": {"composition": "selection", "top_k": 1}},
    "ours-mixture": {"lora": {"composition": "mixture", "top_k": 3}},
    "naive-peft": {},
}
TIMING_PARTS = ("plan", "queue", "compose", "total")


@dataclass
class Sample:
    started: float
    seconds: float
    status: int
    timing_ms: dict[str, float]
    correct: bool | None  # exact match, for queries scored by exact match


@dataclass
class LevelResult:
    system: str
    clients: int
    requests: int
    errors: int
    requests_per_s: float
    p50_s: float
    p99_s: float
    timing_ms: dict[str, float]  # mean Server-Timing parts, plus "other" = total - the parts
    exact_match: float | None
    hit_rate: float | None = None
    extra: dict = field(default_factory=dict)


def parse_timing(header: str | None) -> dict[str, float]:
    if not header:
        return {}
    return {name: float(ms) for name, _, ms in (part.partition(";dur=") for part in header.split(", "))}


async def closed_loop(url: str, headers: dict, queries: list, extra: dict, clients: int, seconds: float,
                      max_tokens: int) -> list[Sample]:
    """`clients` loops, each sending its next query as soon as the last one is answered."""
    samples: list[Sample] = []
    deadline = time.perf_counter() + seconds

    async def client(i: int, http: httpx.AsyncClient) -> None:
        k = i
        while time.perf_counter() < deadline:
            q = queries[k % len(queries)]
            k += clients
            body = {"model": "auto", "messages": [{"role": "user", "content": q.inputs}],
                    "max_tokens": max_tokens, **extra}
            t0 = time.perf_counter()
            try:
                r = await http.post(url, json=body, headers=headers)
                status, timing = r.status_code, parse_timing(r.headers.get("server-timing"))
                text = r.json()["choices"][0]["message"]["content"] if status == 200 else None
            except httpx.HTTPError:
                status, timing, text = 599, {}, None
            correct = None if q.metric != "em" or text is None else text.strip() == q.targets.strip()
            samples.append(Sample(t0, time.perf_counter() - t0, status, timing, correct))

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=600, limits=limits) as http:
        await asyncio.gather(*(client(i, http) for i in range(clients)))
    return samples


def summarize(system: str, clients: int, samples: list[Sample], seconds: float) -> LevelResult:
    ok = [s for s in samples if s.status == 200]
    lat = np.array([s.seconds for s in ok]) if ok else np.array([np.nan])
    window_end = min(s.started for s in samples) + seconds
    done_in_window = sum(1 for s in ok if s.started + s.seconds <= window_end)
    timing = {p: float(np.mean([s.timing_ms.get(p, 0.0) for s in ok])) if ok else 0.0 for p in TIMING_PARTS}
    timing["other"] = max(0.0, timing["total"] - timing["plan"] - timing["queue"] - timing["compose"])
    scored = [s.correct for s in ok if s.correct is not None]
    return LevelResult(system, clients, len(samples), len(samples) - len(ok), done_in_window / seconds,
                       float(np.percentile(lat, 50)), float(np.percentile(lat, 99)), timing,
                       float(np.mean(scored)) if scored else None)


class Stack:
    """redis-server, local Ray, the product app ('loraretriever') and the naive app."""

    def __init__(self, zoo, work: Path):
        from cluster.redis_server import RedisServer

        self.zoo, self.work = zoo, work
        self.redis = RedisServer(data_dir=work / "redis").start()
        self.port = None

    def config(self, port: int, **composer):
        from services.config import AppConfig

        deployments = {name: {"num_cpus": 0.25} for name in ("ingress", "retriever", "composer")}
        replicas = composer.pop("replicas", 1)  # fixed: the comparison is per replica, not autoscaled
        deployments["composer"]["autoscaling"] = {"min_replicas": replicas, "max_replicas": replicas}
        deployments["composer_router"] = composer.pop("router", "adapter_affinity")
        return AppConfig.model_validate({
            "base_model": {"path": str(self.zoo.base), "name": self.zoo.manifest["base_name"]},
            "adapter_store": {"path": str(self.work / "store")},
            "redis": {"url": self.redis.url, "start_local": False},
            "server": {"port": port, "request_timeout_s": 600},
            "composition": {**composer},  # the product defaults (64 running rows)
            "deployments": deployments,
        })

    def register(self, cfg) -> str:
        """Every finished adapter of the zoo, and a tenant whose limits the load never reaches."""
        import redis

        from cluster.adapter_admin import AdapterAdmin
        from services.tenancy.tenants import TenantLimits, TenantStore

        admin = AdapterAdmin.from_config(cfg)
        for card in self.zoo.cards:
            if card.model_name in self.zoo.adapters:
                admin.add(card.model_name, self.zoo.adapters[card.model_name], card)
        limits = TenantLimits(requests_per_second=1e6, burst=100000, max_concurrent=10000, max_tokens=512)
        return TenantStore(redis.Redis.from_url(self.redis.url)).add("bench", limits)

    def deploy(self, cfg, *, naive: bool) -> None:
        from ray import serve

        from cluster.bench.naive_serving import NaivePeft
        from cluster.bringup import APP_NAME
        from deployments.app import build_app

        serve.run(build_app(cfg), name=APP_NAME, route_prefix="/")
        if naive:
            app = NaivePeft.options(ray_actor_options={"num_cpus": 0.25}).bind(
                str(self.zoo.base), str(self.zoo.adapters_dir), APP_NAME)
            serve.run(app, name="naive", route_prefix="/naive")
        url = f"http://127.0.0.1:{cfg.server.port}"
        deadline = time.time() + 300
        while httpx.get(f"{url}/readyz", timeout=30).status_code != 200:
            if time.time() > deadline:
                raise RuntimeError("the Serve app did not become ready in 300 s")
            time.sleep(1)

    def pool_totals(self) -> dict[str, float]:
        """Hits and misses summed over the live composer replicas' last heartbeats."""
        import redis

        from services.registry.placement import PlacementStore

        time.sleep(2.5)  # one routing-stats period: the heartbeat catches up with the last requests
        replicas = PlacementStore(redis.Redis.from_url(self.redis.url)).replicas()
        live = [r for r in replicas.values() if time.time() - r.last_seen < 5]  # not a redeployed app's old ones
        return {k: sum(r.pool.get(k, 0) for r in live) for k in ("hits", "misses", "loads", "evictions")}

    def stop(self) -> None:
        import ray
        from ray import serve

        serve.shutdown()
        ray.shutdown()
        self.redis.stop()


def hit_rate_between(before: dict, after: dict) -> float | None:
    """The pool's hit rate over the counters' growth from `before` to `after`."""
    from cluster.status import hit_rate

    return hit_rate({k: after[k] - before[k] for k in ("hits", "misses")})


def run_levels(stack: Stack, cfg, api_key: str, queries: list, args) -> list[LevelResult]:
    base = f"http://127.0.0.1:{cfg.server.port}"
    headers = {"Authorization": f"Bearer {api_key}"}
    results = []
    for system in args.systems:
        extra = SYSTEMS[system]
        url = f"{base}/naive/v1/chat/completions" if system == "naive-peft" else f"{base}/v1/chat/completions"
        asyncio.run(closed_loop(url, headers, queries, extra, 1, 2.0, args.max_tokens))  # warm-up
        for clients in args.clients:
            before = stack.pool_totals() if system != "naive-peft" else None
            samples = asyncio.run(closed_loop(url, headers, queries, extra, clients, args.seconds, args.max_tokens))
            res = summarize(system, clients, samples, args.seconds)
            # The naive baseline has no cache: every request loads its adapter from disk.
            res.hit_rate = hit_rate_between(before, stack.pool_totals()) if before is not None else 0.0
            results.append(res)
            log.info("%-15s clients %3d: %6.2f req/s  p50 %6.3f s  p99 %6.3f s  errors %d  hit rate %s  EM %s",
                     system, clients, res.requests_per_s, res.p50_s, res.p99_s, res.errors,
                     "-" if res.hit_rate is None else f"{res.hit_rate:.0%}",
                     "-" if res.exact_match is None else f"{res.exact_match:.0%}")
    return results


def run_router_comparison(stack: Stack, api_key: str, queries: list, args) -> list[LevelResult]:
    """Two composer replicas, each with fewer device slots than there are adapters."""
    from ray import serve

    from cluster.bringup import APP_NAME

    serve.delete("naive")
    results = []
    for router in ("adapter_affinity", "power_of_two"):
        cfg = stack.config(args.port, replicas=2, router=router, device_slots=args.router_slots, cpu_slots=64)
        serve.delete(APP_NAME)
        stack.deploy(cfg, naive=False)
        url = f"http://127.0.0.1:{cfg.server.port}/v1/chat/completions"
        headers = {"Authorization": f"Bearer {api_key}"}
        extra = SYSTEMS["ours-selection"]
        asyncio.run(closed_loop(url, headers, queries, extra, 4, 5.0, args.max_tokens))  # warm-up
        before = stack.pool_totals()
        samples = asyncio.run(closed_loop(url, headers, queries, extra, args.router_clients, args.router_seconds,
                                          args.max_tokens))
        res = summarize(f"router-{router}", args.router_clients, samples, args.router_seconds)
        after = stack.pool_totals()
        res.hit_rate = hit_rate_between(before, after)
        res.extra = {"loads": after["loads"] - before["loads"], "evictions": after["evictions"] - before["evictions"]}
        results.append(res)
        log.info("router %-16s: hit rate %s, %.2f req/s, p50 %.3f s, loads %d, errors %d", router,
                 "-" if res.hit_rate is None else f"{res.hit_rate:.1%}", res.requests_per_s, res.p50_s,
                 res.extra["loads"], res.errors)
    return results


def plot(levels: list[LevelResult], routers: list[LevelResult], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 9))
    systems = list(dict.fromkeys(r.system for r in levels))
    for system in systems:
        rows = [r for r in levels if r.system == system]
        x = [r.clients for r in rows]
        axes[0, 0].plot(x, [r.requests_per_s for r in rows], marker="o", label=system)
        axes[0, 1].plot(x, [r.p50_s for r in rows], marker="o", label=f"{system} p50")
        axes[0, 1].plot(x, [r.p99_s for r in rows], marker="x", linestyle="--", label=f"{system} p99")
    for ax, title, ylabel in ((axes[0, 0], "Throughput (closed loop)", "requests / s"),
                              (axes[0, 1], "Latency", "seconds")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.legend(fontsize=8)
    axes[0, 1].set_yscale("log")
    top = max(r.clients for r in levels)
    at_top = [next(r for r in levels if r.system == s and r.clients == top) for s in systems]
    bottom = np.zeros(len(at_top))
    for part in ("plan", "queue", "compose", "other"):
        values = np.array([r.timing_ms[part] for r in at_top])
        axes[1, 0].bar(systems, values, bottom=bottom, label=part)
        bottom += values
    axes[1, 0].set_title(f"Where a request's time goes, {top} clients (mean ms)")
    axes[1, 0].set_ylabel("milliseconds")
    axes[1, 0].legend(fontsize=8)
    names = [r.system.removeprefix("router-") for r in routers]
    axes[1, 1].bar(names, [100 * (r.hit_rate or 0) for r in routers], color=["tab:green", "tab:gray"])
    axes[1, 1].set_ylim(0, 100)
    axes[1, 1].set_ylabel("adapter cache hit rate, %")
    axes[1, 1].set_title("Composer routing, 2 replicas with few device slots")
    for i, r in enumerate(routers):
        axes[1, 1].text(i, 100 * (r.hit_rate or 0) + 2, f"{100 * (r.hit_rate or 0):.1f}%", ha="center")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def print_table(levels: list[LevelResult], routers: list[LevelResult]) -> None:
    print("| system | clients | req/s | p50 s | p99 s | errors | plan ms | plan % | queue ms | queue % | compose ms "
          "| other ms | hit rate | EM |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in levels + routers:
        t = r.timing_ms
        rate = "-" if r.hit_rate is None else f"{r.hit_rate:.1%}"
        em = "-" if r.exact_match is None else f"{r.exact_match:.0%}"
        share = lambda part: f"{100 * t[part] / t['total']:.0f}" if t["total"] else "-"  # noqa: E731
        print(f"| {r.system} | {r.clients} | {r.requests_per_s:.2f} | {r.p50_s:.3f} | {r.p99_s:.3f} | {r.errors} "
              f"| {t['plan']:.0f} | {share('plan')} | {t['queue']:.0f} | {share('queue')} | {t['compose']:.0f} "
              f"| {t['other']:.0f} | {rate} | {em} |")
    naive = {r.clients: r for r in levels if r.system == "naive-peft"}
    print("\nthroughput ratio to naive-peft:")
    for r in levels:
        if r.system != "naive-peft" and r.clients in naive and naive[r.clients].requests_per_s:
            print(f"  {r.system:<15} clients {r.clients:>3}: {r.requests_per_s / naive[r.clients].requests_per_s:.1f}x")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", type=Path, default=None, help="demo zoo folder (default: the full demo zoo)")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    parser.add_argument("--seconds", type=float, default=15.0, help="load per client count and system")
    parser.add_argument("--max-tokens", type=int, default=8, help="answer length (the demo answers are short)")
    parser.add_argument("--router-clients", type=int, default=16)
    parser.add_argument("--router-seconds", type=float, default=30.0)
    parser.add_argument("--router-slots", type=int, default=5, help="device slots per replica in the router phase")
    parser.add_argument("--skip-router", action="store_true", help="only the closed-loop phase")
    parser.add_argument("--out", type=Path, default=Path("docs"))
    parser.add_argument("--port", type=int, default=None)
    parser.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=list(SYSTEMS))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    from cluster.demo.zoo import load_zoo
    from cluster.local_ray import init_local_ray
    from cluster.redis_server import free_port
    from ray import serve

    zoo = load_zoo(args.zoo)
    queries = [q for q in zoo.queries if q.task in zoo.adapters]
    random.Random(0).shuffle(queries)  # tasks interleaved: every batch is mixed
    args.port = args.port or free_port()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a killed run still stops what it started
    with tempfile.TemporaryDirectory(prefix="bench-serving-") as tmp:
        stack = Stack(zoo, Path(tmp))
        try:
            cfg = stack.config(args.port)
            api_key = stack.register(cfg)
            init_local_ray(num_cpus=2)
            serve.start(http_options={"host": "127.0.0.1", "port": args.port})
            log.info("deploying the product app and the naive baseline on %d adapters", len(zoo.adapters))
            stack.deploy(cfg, naive="naive-peft" in args.systems)
            levels = run_levels(stack, cfg, api_key, queries, args)
            routers = [] if args.skip_router else run_router_comparison(stack, api_key, queries, args)
        finally:
            stack.stop()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "serving.json").write_text(json.dumps(
        {"command": command_line("cluster.bench.serving", argv),
         "adapters": len(zoo.adapters), "queries": len(queries), "seconds": args.seconds,
         "max_tokens": args.max_tokens, "levels": [asdict(r) for r in levels],
         "routers": [asdict(r) for r in routers]}, indent=1))
    if routers:
        plot(levels, routers, args.out / "serving.png")
    print_table(levels, routers)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
