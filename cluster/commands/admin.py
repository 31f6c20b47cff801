"""`loraretriever adapters ...` and `tenants ...`: operator commands over the admin API."""
from __future__ import annotations

import argparse
import base64
import json
import os
import sys
from pathlib import Path

import httpx

from cluster.cli import command_group
from cluster.errors import UserError
from services.schemas import AdapterCard

DEFAULT_URL = "http://127.0.0.1:8000"
ADMIN_KEY_ENV = "LORARETRIEVER_ADMIN_KEY"
CARD_FILE = "card.json"  # an adapter folder's card, used when --card is not given
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")  # all the server takes


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
        (["folder"], {"help": "PEFT folder (as save_pretrained writes it; only adapter_config.json and "
                              "adapter_model.safetensors are sent), or the URI of one in object storage "
                              "(s3://bucket/path: the cluster checks it and registers it where it is)"}),
        (["--card"], {"help": f"card JSON: {{model_name?, sample: [{{inputs, targets}}], domain?, evaluation?: "
                              f"{{metric, samples}}}} (default: FOLDER/{CARD_FILE})"}),
        (["--store-path"], {"action": "store_true", "help": "the cluster reads FOLDER itself (shared volume)"}),
        (["--tenant"], {"help": "owner tenant"}),
        (["--private"], {"action": "store_true", "help": "visible to the owner tenant only"}),
        (["--staged"], {"action": "store_true", "help": "do not activate: the quality gate scores it, promote later"}))
    cmd(adapters, "list", "all adapters", lambda a: _print(_call(a, "GET", "/admin/adapters")))
    cmd(adapters, "show", "one adapter with its versions", lambda a: _print(_call(a, "GET", f"/admin/adapters/{a.name}")), name)
    force = (["--force"], {"action": "store_true", "help": "override a failed quality gate (audited)"})
    cmd(adapters, "promote", "make NAME@VERSION active", cmd_promote, ref, force)
    cmd(adapters, "canary", "send PERCENT of NAME's traffic to VERSION", cmd_canary, ref,
        (["--percent"], {"type": float, "required": True}),
        (["--auto"], {"action": "store_true", "help": "promote or roll back on its own (docs/rollout.md)"}),
        (["--min-requests"], {"type": int, "help": "canary requests before the verdict (--auto)"}), force)
    cmd(adapters, "end-canary", "stop NAME's canary (the active version takes all traffic)",
        lambda a: _print(_call(a, "DELETE", f"/admin/adapters/{a.name}/canary")), name)
    cmd(adapters, "rollback", "restore the previous active version",
        lambda a: _print(_call(a, "POST", f"/admin/adapters/{a.name}/rollback")), name)
    cmd(adapters, "retire", "remove an adapter (NAME) or one version of it (NAME@VERSION) from serving",
        cmd_retire, (["ref"], {"help": "NAME or NAME@VERSION"}))
    cmd(adapters, "visibility", "who may use NAME: shared, or private to its owner tenant", cmd_visibility, name,
        (["visibility"], {"choices": ("shared", "private")}), (["--tenant"], {"help": "owner tenant"}))
    cmd(adapters, "gc", "delete stored files of retired versions no composer holds",
        lambda a: _print(_call(a, "POST", "/admin/gc")))
    cmd(adapters, "pin", "keep resident on composers", lambda a: _print(_call(a, "POST", f"/admin/adapters/{a.name}/pin")), name)
    cmd(adapters, "unpin", "allow eviction again", lambda a: _print(_call(a, "POST", f"/admin/adapters/{a.name}/unpin")), name)
    cmd(adapters, "history", "audit log: operator actions, quality gates, canary verdicts",
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


def read_card(path: Path, name: str) -> tuple[dict, dict | None]:
    """(card, evaluation) from a card file; `evaluation` (held-out samples, metric) is optional."""
    from services.rollout.quality_gate import GateSamples  # loads the text metrics: only when adding

    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError as err:
        raise UserError(f"card file {path} does not exist (give --card, or put {CARD_FILE} in the folder)") from err
    except ValueError as err:
        raise UserError(f"card file {path} is not valid JSON: {err}") from err
    if not isinstance(raw, dict):
        raise UserError(f"card file {path} must hold a JSON object")
    evaluation = raw.pop("evaluation", None)
    raw.setdefault("model_name", name)
    try:
        card = AdapterCard.model_validate(raw)
        if evaluation is not None:
            GateSamples.model_validate(evaluation)
    except ValueError as err:
        raise UserError(f"card file {path} is invalid: {str(err).splitlines()[0]}: "
                        f"{' '.join(str(err).splitlines()[1:3]).strip()}") from err
    return card.model_dump(), evaluation


def adapter_files(folder: Path) -> tuple[dict[str, str], list[str]]:
    """(file name -> base64 content of the two files the server takes, names of what was left out)."""
    missing = [f for f in ADAPTER_FILES if not (folder / f).is_file()]
    if missing:
        raise UserError(f"adapter folder {folder} has no {' or '.join(missing)} (a PEFT LoRA folder has both)")
    files = {f: base64.b64encode((folder / f).read_bytes()).decode() for f in ADAPTER_FILES}
    left_out = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir()
                      if p.name not in ADAPTER_FILES and p.name != CARD_FILE)
    return files, left_out


def cmd_add(args: argparse.Namespace) -> int:
    from services.registry.object_store import is_remote

    remote = is_remote(args.folder)
    folder = Path(args.folder)
    if remote and not args.card:
        raise UserError(f"give the card with --card: {args.folder} is read by the cluster, not here")
    if not remote and not folder.is_dir():
        raise UserError(f"adapter folder {folder} does not exist")
    card, evaluation = read_card(Path(args.card) if args.card else folder / CARD_FILE, args.name)
    body = {"name": args.name, "card": card, "tenant": args.tenant, "evaluation": evaluation,
            "visibility": "private" if args.private else "shared", "activate": not args.staged}
    if remote:
        body["path"] = args.folder
    elif args.store_path:
        body["path"] = str(folder.resolve())
    else:
        body["files"], left_out = adapter_files(folder)
        if left_out:
            print(f"sending {', '.join(ADAPTER_FILES)}; left out (not needed to serve): {', '.join(left_out)}",
                  file=sys.stderr)
    return _print(_call(args, "POST", "/admin/adapters", body))


def cmd_promote(args: argparse.Namespace) -> int:
    name, version = _split_ref(args.ref)
    return _print(_call(args, "POST", f"/admin/adapters/{name}/promote", {"version": version, "force": args.force}))


def cmd_canary(args: argparse.Namespace) -> int:
    name, version = _split_ref(args.ref)
    if args.min_requests is not None and not args.auto:
        raise UserError("--min-requests needs --auto")
    body = {"version": version, "percent": args.percent, "auto": args.auto, "force": args.force,
            "min_requests": args.min_requests}
    return _print(_call(args, "POST", f"/admin/adapters/{name}/canary", body))


def cmd_retire(args: argparse.Namespace) -> int:
    if "@" in args.ref:
        name, version = _split_ref(args.ref)
        return _print(_call(args, "DELETE", f"/admin/adapters/{name}/versions/{version}"))
    return _print(_call(args, "DELETE", f"/admin/adapters/{args.ref}"))


def cmd_visibility(args: argparse.Namespace) -> int:
    return _print(_call(args, "POST", f"/admin/adapters/{args.name}/visibility",
                        {"visibility": args.visibility, "tenant": args.tenant}))


def cmd_tenant_add(args: argparse.Namespace) -> int:
    limits = {k: v for k, v in {"requests_per_second": args.rps, "max_concurrent": args.concurrency,
                                "max_tokens": args.max_tokens}.items() if v is not None}
    return _print(_call(args, "POST", "/admin/tenants", {"name": args.name, "limits": limits}))
