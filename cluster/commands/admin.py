"""`loraretriever adapters ...` and `tenants ...`: operator commands over the admin API."""
from __future__ import annotations

import argparse
import base64
import json
import os
from pathlib import Path

import httpx

from cluster.cli import command_group
from cluster.errors import UserError
from services.schemas import AdapterCard

DEFAULT_URL = "http://127.0.0.1:8000"
ADMIN_KEY_ENV = "LORARETRIEVER_ADMIN_KEY"


def register(sub) -> None:
    adapters = command_group(sub, "adapters", "roll adapters out and back (admin API)")
    tenants = command_group(sub, "tenants", "tenants and their API keys (admin API)")

    def cmd(group, name, help, func, *args):
        p = group.add_parser(name, help=help)
        p.add_argument("--url", default=os.environ.get("LORARETRIEVER_URL", DEFAULT_URL), help="cluster URL")
        for a in args:
            p.add_argument(*a[0], **a[1])
        p.set_defaults(func=func)
        return p

    name = (["name"], {"help": "adapter name"})
    ref = (["ref"], {"help": "NAME@VERSION"})
    cmd(adapters, "add", "validate, embed and stage a new adapter version", cmd_add, name,
        (["folder"], {"help": "PEFT folder (adapter_config.json + adapter_model.safetensors)"}),
        (["--card"], {"required": True, "help": "card JSON: {model_name?, sample: [{inputs, targets}], domain?}"}),
        (["--store-path"], {"action": "store_true", "help": "the cluster reads FOLDER itself (shared volume)"}),
        (["--tenant"], {"help": "owner tenant"}),
        (["--private"], {"action": "store_true", "help": "visible to the owner tenant only"}),
        (["--staged"], {"action": "store_true", "help": "do not activate (promote later)"}))
    cmd(adapters, "list", "all adapters", lambda a: _print(_call(a, "GET", "/admin/adapters")))
    cmd(adapters, "show", "one adapter with its versions", lambda a: _print(_call(a, "GET", f"/admin/adapters/{a.name}")), name)
    cmd(adapters, "promote", "make NAME@VERSION active", cmd_promote, ref)
    cmd(adapters, "canary", "send PERCENT of NAME's traffic to VERSION", cmd_canary, ref,
        (["--percent"], {"type": float, "required": True}))
    cmd(adapters, "rollback", "restore the previous active version",
        lambda a: _print(_call(a, "POST", f"/admin/adapters/{a.name}/rollback")), name)
    cmd(adapters, "retire", "remove an adapter from serving",
        lambda a: _print(_call(a, "DELETE", f"/admin/adapters/{a.name}")), name)
    cmd(adapters, "pin", "keep resident on composers", lambda a: _print(_call(a, "POST", f"/admin/adapters/{a.name}/pin")), name)
    cmd(adapters, "unpin", "allow eviction again", lambda a: _print(_call(a, "POST", f"/admin/adapters/{a.name}/unpin")), name)
    cmd(adapters, "history", "audit log of operator actions",
        lambda a: _print(_call(a, "GET", f"/admin/adapters/{a.name}/history")), name)

    cmd(tenants, "add", "create a tenant; prints its API key once", cmd_tenant_add,
        (["name"], {"help": "tenant name"}),
        (["--rps"], {"type": float, "help": "requests per second"}),
        (["--concurrency"], {"type": int, "help": "concurrent requests"}),
        (["--max-tokens"], {"type": int, "help": "largest max_tokens"}))
    cmd(tenants, "list", "all tenants", lambda a: _print(_call(a, "GET", "/admin/tenants")))
    cmd(tenants, "revoke", "delete a tenant and its keys at once",
        lambda a: _print(_call(a, "DELETE", f"/admin/tenants/{a.name}")), (["name"], {}))
    cmd(tenants, "usage", "a tenant's request and token counters",
        lambda a: _print(_call(a, "GET", f"/admin/tenants/{a.name}/usage")), (["name"], {}))


def _call(args: argparse.Namespace, method: str, path: str, body: dict | None = None) -> dict:
    key = os.environ.get(ADMIN_KEY_ENV)
    if not key:
        raise UserError(f"set {ADMIN_KEY_ENV} to the cluster's admin key")
    try:
        resp = httpx.request(method, args.url.rstrip("/") + path, json=body, timeout=300,
                             headers={"Authorization": f"Bearer {key}"})
    except httpx.HTTPError as err:
        raise UserError(f"cannot reach the cluster at {args.url}: {err}") from err
    if resp.status_code >= 400:
        try:
            message = resp.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = resp.text[:300]
        raise UserError(f"{method} {path} failed ({resp.status_code}): {message}")
    return resp.json()


def _print(data: dict) -> int:
    print(json.dumps(data, indent=1))
    return 0


def _split_ref(ref: str) -> tuple[str, str]:
    name, _, version = ref.partition("@")
    if not name or not version:
        raise UserError(f"'{ref}' is not NAME@VERSION")
    return name, version


def cmd_add(args: argparse.Namespace) -> int:
    folder = Path(args.folder)
    if not folder.is_dir():
        raise UserError(f"adapter folder {folder} does not exist")
    try:
        raw = json.loads(Path(args.card).read_text())
        raw.setdefault("model_name", args.name)
        card = AdapterCard.model_validate(raw)
    except FileNotFoundError as err:
        raise UserError(f"card file {args.card} does not exist") from err
    except ValueError as err:
        raise UserError(f"card file {args.card} is invalid: {str(err).splitlines()[0]}") from err
    body = {"name": args.name, "card": card.model_dump(), "tenant": args.tenant,
            "visibility": "private" if args.private else "shared", "activate": not args.staged}
    if args.store_path:
        body["path"] = str(folder.resolve())
    else:
        files = {f.name: base64.b64encode(f.read_bytes()).decode() for f in folder.iterdir() if f.is_file()}
        body["files"] = files
    return _print(_call(args, "POST", "/admin/adapters", body))


def cmd_promote(args: argparse.Namespace) -> int:
    name, version = _split_ref(args.ref)
    return _print(_call(args, "POST", f"/admin/adapters/{name}/promote", {"version": version}))


def cmd_canary(args: argparse.Namespace) -> int:
    name, version = _split_ref(args.ref)
    return _print(_call(args, "POST", f"/admin/adapters/{name}/canary", {"version": version, "percent": args.percent}))


def cmd_tenant_add(args: argparse.Namespace) -> int:
    limits = {k: v for k, v in {"requests_per_second": args.rps, "max_concurrent": args.concurrency,
                                "max_tokens": args.max_tokens}.items() if v is not None}
    return _print(_call(args, "POST", "/admin/tenants", {"name": args.name, "limits": limits}))
