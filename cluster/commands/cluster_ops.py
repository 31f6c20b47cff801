"""`up`, `down`, `status`, `index rebuild`: run and inspect the cluster on this machine."""
from __future__ import annotations

import argparse
import json
import logging

import httpx

from cluster.cli import command_group
from services.config import load_config
from cluster.errors import UserError

log = logging.getLogger("loraretriever")


def register(sub) -> None:
    up = sub.add_parser("up", help="start Redis, Ray, embedded Qdrant and the Serve app on 127.0.0.1")
    up.add_argument("--config", help="YAML config (services.config.AppConfig); default: embedded defaults")
    up.add_argument("--no-demo", action="store_true", help="do not build or register the demo adapters")
    up.add_argument("--port", type=int, help="HTTP port (default 8000)")
    up.set_defaults(func=cmd_up)

    down = sub.add_parser("down", help="stop everything `up` started")
    down.set_defaults(func=cmd_down)

    status = sub.add_parser("status", help="deployments, replicas, adapters and placement")
    status.add_argument("--config", help="YAML config (for the Redis URL)")
    status.add_argument("--json", action="store_true", help="print JSON")
    status.set_defaults(func=cmd_status)

    index = command_group(sub, "index", "the vector index of adapter embeddings")
    rebuild = index.add_parser("rebuild", help="rebuild the Qdrant index from the registry")
    rebuild.add_argument("--config", help="YAML config")
    rebuild.set_defaults(func=cmd_index_rebuild)


def _config(args: argparse.Namespace):
    try:
        cfg = load_config(getattr(args, "config", None))
    except FileNotFoundError as err:
        raise UserError(f"config file not found: {err.filename}") from err
    except ValueError as err:
        raise UserError(f"invalid config {args.config}: {err}") from err
    if getattr(args, "port", None):
        cfg.server.port = args.port
    return cfg


def cmd_up(args: argparse.Namespace) -> int:
    from cluster.bringup import DEMO_KEY_FILE, LocalCluster, exit_on_signals, read_state, sample_request

    if read_state() is not None:
        raise UserError("a cluster started by `loraretriever up` is running already; `loraretriever down` stops it")
    cluster = LocalCluster(_config(args), demo=not args.no_demo)
    exit_on_signals()
    try:
        cluster.start()
        exit_on_signals()
        if cluster.demo:
            for name in cluster.register_demo_adapters():
                log.info("registered demo adapter %s", name)
        api_key = cluster.demo_api_key()
        prompt = "Write this in capital letters: silver dragon"
        try:
            reply = sample_request(cluster.url, prompt, api_key)
            print(f"sample request: {prompt!r} -> " + json.dumps(reply["choices"][0], indent=1))
        except httpx.HTTPError as err:  # serving is up; a busy machine may answer its first request late
            log.warning("the sample request did not complete (%s: %s); the cluster serves on", type(err).__name__, err)
        print(f"\nserving on {cluster.url} (OpenAI-compatible: /v1/completions, /v1/chat/completions)")
        if api_key:
            print(f"tenant 'demo': export OPENAI_API_KEY=$(cat {DEMO_KEY_FILE})")
        print("stop with Ctrl-C or `loraretriever down`")
        cluster.run_until_stopped()
    finally:
        cluster.stop()
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    from cluster.bringup import stop_running

    if not stop_running():
        print("no running cluster found")
        return 1
    print("stopped")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from cluster.status import collect_status, render_status

    report = collect_status(_config(args))
    print(json.dumps(report, indent=1) if args.json else render_status(report))
    return 0


def cmd_index_rebuild(args: argparse.Namespace) -> int:
    from cluster.status import rebuild_index

    print(rebuild_index(_config(args)))
    return 0
