"""What `loraretriever status` and `index rebuild` report and do."""
from __future__ import annotations

import os
import time

import httpx

from cluster.bringup import ADMIN_KEY_FILE
from cluster.errors import UserError
from services.config import AppConfig
from services.wiring import make_placement, make_registry, redis_client
from services.serving.index_sync import REBUILD_EPOCH_KEY


def serve_status(cfg: AppConfig) -> dict:
    """Deployments and replicas as the running cluster reports them (admin API), or why not."""
    from cluster.bringup import read_state

    state = read_state()
    url = state["url"] if state else f"http://{cfg.server.host}:{cfg.server.port}"
    key = os.environ.get(cfg.server.admin_key_env)
    if key is None and ADMIN_KEY_FILE.exists():
        key = ADMIN_KEY_FILE.read_text().strip()
    try:
        resp = httpx.get(f"{url}/admin/status", headers={"Authorization": f"Bearer {key}"}, timeout=30)
    except httpx.HTTPError as err:
        return {"error": f"no cluster answering at {url}: {type(err).__name__}"}
    if resp.status_code != 200:
        return {"error": f"{url}/admin/status answered {resp.status_code}: {resp.text[:200]}"}
    return resp.json()


def collect_status(cfg: AppConfig) -> dict:
    registry = make_registry(cfg)
    records = registry.snapshot()
    placement = make_placement(cfg).replicas()
    return {
        "serve": serve_status(cfg),
        "adapters": [
            {"name": r.name, "active": r.active_version, "versions": sorted(r.versions), "domain": r.domain,
             "visibility": r.visibility, "owner": r.owner_tenant, "canary": canary_state(registry, r),
             "last_verdict": r.last_verdict}
            for r in records
        ],
        "placement": {rid: {"resident": s.resident, "queue_len": s.queue_len, "hit_rate": hit_rate(s.pool),
                            "seen_s_ago": round(time.time() - s.last_seen, 1)} for rid, s in placement.items()},
    }


def canary_state(registry, record) -> dict | None:
    """The canary, and for an automatic one its counts per arm so far (docs/rollout.md)."""
    from services.rollout.canary import progress

    if record.canary is None:
        return None
    state = record.canary.model_dump(mode="json")
    if record.canary.auto:
        arms = progress(registry.r, record.name, record.canary.version)
        state["arms"] = {arm: {"requests": a.requests, "errors": a.errors} for arm, a in arms.items()}
    return state


def render_canary(canary: dict | None) -> str:
    if canary is None:
        return ""
    text = f" canary {canary['version']}@{canary['percent']}%"
    if canary.get("auto"):
        arms = canary.get("arms", {})
        c, a = arms.get("canary", {}), arms.get("active", {})
        text += (f" auto: {c.get('requests', 0)}/{canary['min_requests']} requests, {c.get('errors', 0)} errors"
                 f" (active {a.get('errors', 0)}/{a.get('requests', 0)})")
    return text


def hit_rate(pool: dict) -> float | None:
    """Share of adapter acquisitions served from a device slot; None before the first one."""
    hits, misses = pool.get("hits", 0), pool.get("misses", 0)
    return round(hits / (hits + misses), 4) if hits + misses else None


def render_status(report: dict) -> str:
    lines = ["Serve:"]
    serve = report["serve"]
    if "error" in serve:
        lines.append(f"  {serve['error']}")
    else:
        lines.append(f"  application: {serve['status']}")
        for name, d in serve["deployments"].items():
            lines.append(f"  {name:<10} {d['status']:<10} replicas {d['replicas']}")
        for c in serve.get("composers", []):
            lines.append(f"  composer {c['replica_id']}: queue {c['queue_len']}, pool {c['pool']}")
    lines.append(f"Adapters ({len(report['adapters'])}):")
    for a in report["adapters"]:
        lines.append(f"  {a['name']:<24} active {a['active']!s:<6} versions {','.join(a['versions'])}"
                     f" {a['visibility']}{' of ' + a['owner'] if a['owner'] else ''} [{a['domain']}]"
                     f"{render_canary(a['canary'])}")
        if a.get("last_verdict"):
            lines.append(f"  {'':<24} last canary verdict: {a['last_verdict']}")
    lines.append(f"Placement ({len(report['placement'])} composer replicas):")
    for rid, p in report["placement"].items():
        rate = "-" if p["hit_rate"] is None else f"{p['hit_rate']:.0%}"
        lines.append(f"  {rid:<12} queue {p['queue_len']:<3} hit rate {rate:<5} seen {p['seen_s_ago']} s ago  "
                     f"resident: {', '.join(p['resident']) or '-'}")
    return "\n".join(lines)


def rebuild_index(cfg: AppConfig, wait_s: float = 120.0) -> str:
    """Embedded indexes live in each retriever replica, which rebuild when they see the epoch key
    move. A shared Qdrant collection is rebuilt by its one writer: the retriever replica holding
    the writer lock, or, when no replica holds it (no cluster running), this command."""
    from services.serving.index_sync import REBUILT_EPOCH_KEY, IndexSync

    redis = redis_client(cfg)
    epoch = str(time.time()).encode()
    redis.set(REBUILD_EPOCH_KEY, epoch)
    if cfg.qdrant.url is None:
        return "asked every retriever replica to rebuild its embedded index from the registry"
    from services.wiring import make_index
    from services.retrieval.embedder import embedder_from_config

    dim = embedder_from_config(cfg.embedder).dim
    sync = IndexSync(make_registry(cfg), make_index(cfg, dim), redis=redis, writer_id=f"cli:{os.getpid()}")
    if sync.writer.hold():
        try:
            count = sync.rebuild()
        finally:
            sync.release()
        return f"rebuilt the index at {cfg.qdrant.url} into a new collection and switched to it: {count} adapters"
    holder = sync.writer.current()
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if redis.get(REBUILT_EPOCH_KEY.format(alias=cfg.qdrant.collection)) == epoch:
            return f"the index writer {holder} rebuilt the index at {cfg.qdrant.url} and switched to it"
        time.sleep(1)
    raise UserError(f"the index writer {holder} did not rebuild the index within {wait_s:.0f} s; "
                    "check the retriever replicas (`loraretriever status`) and run this again")
