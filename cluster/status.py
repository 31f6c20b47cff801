"""What `loraretriever status` and `index rebuild` report and do."""
from __future__ import annotations

import time

from cluster.config import AppConfig
from cluster.wiring import make_placement, make_registry, redis_client
from services.serving.index_sync import REBUILD_EPOCH_KEY


def serve_status() -> dict:
    """Deployments and replica counts of the running Serve app, or why they are unknown."""
    try:
        import os

        import ray
        from ray import serve

        from cluster.bringup import APP_NAME, read_state
        from cluster.local_ray import loopback_ray_env

        state = read_state()
        if state is None:
            return {"error": "no cluster started by `loraretriever up` is running"}
        os.environ.update(loopback_ray_env())
        if not ray.is_initialized():
            ray.init(address=state["ray"], log_to_driver=False, logging_level="ERROR", namespace="serve")
        app = serve.status().applications.get(APP_NAME)
        if app is None:
            return {"error": f"no Serve application '{APP_NAME}' is running"}
        return {
            "status": str(app.status.value if hasattr(app.status, "value") else app.status),
            "deployments": {
                name: {"status": str(d.status.value if hasattr(d.status, "value") else d.status),
                       "replicas": {str(k.value if hasattr(k, "value") else k): v for k, v in d.replica_states.items()}}
                for name, d in app.deployments.items()
            },
        }
    except Exception as err:  # no cluster running is a normal answer here
        return {"error": f"Ray cluster not reachable: {str(err)[:200]}"}


def collect_status(cfg: AppConfig) -> dict:
    registry = make_registry(cfg)
    records = registry.snapshot()
    placement = make_placement(cfg).replicas()
    return {
        "serve": serve_status(),
        "adapters": [
            {"name": r.name, "active": r.active_version, "versions": sorted(r.versions), "domain": r.domain,
             "visibility": r.visibility, "owner": r.owner_tenant,
             "canary": r.canary.model_dump() if r.canary else None}
            for r in records
        ],
        "placement": {rid: {"resident": s.resident, "queue_len": s.queue_len,
                            "seen_s_ago": round(time.time() - s.last_seen, 1)} for rid, s in placement.items()},
    }


def render_status(report: dict) -> str:
    lines = ["Serve:"]
    serve = report["serve"]
    if "error" in serve:
        lines.append(f"  {serve['error']}")
    else:
        lines.append(f"  application: {serve['status']}")
        for name, d in serve["deployments"].items():
            lines.append(f"  {name:<10} {d['status']:<10} replicas {d['replicas']}")
    lines.append(f"Adapters ({len(report['adapters'])}):")
    for a in report["adapters"]:
        canary = f" canary {a['canary']['version']}@{a['canary']['percent']}%" if a["canary"] else ""
        lines.append(f"  {a['name']:<24} active {a['active']!s:<6} versions {','.join(a['versions'])}"
                     f" {a['visibility']}{' of ' + a['owner'] if a['owner'] else ''} [{a['domain']}]{canary}")
    lines.append(f"Placement ({len(report['placement'])} composer replicas):")
    for rid, p in report["placement"].items():
        lines.append(f"  {rid:<12} queue {p['queue_len']:<3} seen {p['seen_s_ago']} s ago  resident: "
                     f"{', '.join(p['resident']) or '-'}")
    return "\n".join(lines)


def rebuild_index(cfg: AppConfig) -> str:
    """A shared Qdrant server is rebuilt here; embedded indexes live in each retriever replica,
    which rebuild when they see the epoch key move."""
    redis_client(cfg).set(REBUILD_EPOCH_KEY, str(time.time()))
    if cfg.qdrant.url is None:
        return "asked every retriever replica to rebuild its embedded index from the registry"
    from cluster.wiring import make_index
    from services.retrieval.embedder import Embedder
    from services.serving.index_sync import IndexSync

    dim = Embedder(cfg.embedder.model_path, cfg.embedder.instruction).dim
    count = IndexSync(make_registry(cfg), make_index(cfg, dim)).rebuild()
    return f"rebuilt the index at {cfg.qdrant.url}: {count} adapters"
