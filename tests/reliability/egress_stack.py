"""The local stack end to end, for tests/reliability/test_no_egress.py to run under strace.

    python tests/reliability/egress_stack.py ZOO_DIR WORK_DIR

Starts a redis-server, registers the zoo's adapters, starts local Ray and the Serve app on
a free loopback port, sends every kind of request (retrieval-driven chat, streamed chat,
named completion, retrieval, an admin upload), then shuts everything down. Prints OK at the end."""
from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root

from cluster.local_ray import LOOPBACK_IMPORT_ENV  # noqa: E402

os.environ.update(LOOPBACK_IMPORT_ENV)  # before Ray is imported, as the CLI does
os.environ.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                   "LORARETRIEVER_ADMIN_KEY": "egress-admin-key-0123456789"})

import httpx  # noqa: E402
import redis  # noqa: E402


def main(zoo_dir: str, work: str) -> None:
    from ray import serve

    from cluster.adapter_admin import AdapterAdmin
    from cluster.bringup import APP_NAME
    from services.config import AppConfig
    from cluster.demo.zoo import load_zoo
    from cluster.local_ray import init_local_ray
    from cluster.redis_server import RedisServer, free_port
    from deployments.app import build_app
    from services.tenancy.tenants import TenantStore

    zoo = load_zoo(zoo_dir)
    server = RedisServer(data_dir=Path(work) / "redis").start()
    port = free_port()
    try:
        cfg = AppConfig.model_validate({
            "base_model": {"path": str(zoo.base), "name": "tiny-random-llama"},
            "adapter_store": {"path": str(Path(work) / "store")},
            "redis": {"url": server.url, "start_local": False},
            "server": {"port": port, "request_timeout_s": 60},
            "deployments": {name: {"num_cpus": 0.1} for name in ("ingress", "retriever", "composer")},
        })
        admin = AdapterAdmin.from_config(cfg)
        names = sorted(zoo.adapters)
        for card in zoo.cards:
            if card.model_name in names[:-1]:  # the last one is uploaded over the admin API below
                admin.add(card.model_name, zoo.adapters[card.model_name], card)
        key = TenantStore(redis.Redis.from_url(server.url)).add("egress")
        init_local_ray(num_cpus=2)
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(cfg), name=APP_NAME, route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        user = httpx.Client(base_url=url, timeout=120, headers={"Authorization": f"Bearer {key}"})
        ops = httpx.Client(base_url=url, timeout=120,
                           headers={"Authorization": f"Bearer {os.environ['LORARETRIEVER_ADMIN_KEY']}"})
        card = next(c for c in zoo.cards if c.model_name == names[-1]).model_dump(mode="json")
        checks = [
            ops.post("/admin/adapters", json={"name": names[-1], "card": card, "path": str(zoo.adapters[names[-1]])}),
            user.post("/v1/chat/completions", json={"model": "auto", "max_tokens": 4,
                                                    "messages": [{"role": "user", "content": "hello"}]}),
            user.post("/v1/chat/completions", json={"model": "auto", "max_tokens": 4, "stream": True,
                                                    "messages": [{"role": "user", "content": "hello"}]}),
            user.post("/v1/completions", json={"model": names[0], "prompt": ["1 + 2", "hi"], "max_tokens": 4}),
            user.post("/v1/retrieve", json={"input": ["hello", "1 + 2"]}),
            user.get("/v1/models"),
            ops.get("/admin/status"),
        ]
        bad = [(r.request.url.path, r.status_code, r.text[:200]) for r in checks if r.status_code != 200]
        if bad:
            raise SystemExit(f"requests failed: {bad}")
    finally:
        import ray

        serve.shutdown()
        ray.shutdown()
        server.stop()
    print("OK")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
