"""Hostile adapters through the admin API (POST /admin/adapters, uploaded `files` or a `path`).

Each one must be refused with a 4xx whose message says why, and leave everything as it was:
the registry in Redis (every lr:registry:* key), the adapter store on disk (staging included),
what tenants see (/v1/models, retrieval for each card's sample) and what the composer holds
(GET /admin/status). One real cluster for the module; real PEFT files from the tiny zoo."""
from __future__ import annotations

import base64
import json
import os
import pickle
import struct
import time

import httpx
import pytest
import torch
from safetensors.torch import load_file, save_file

from services.schemas import ErrorResponse

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


@pytest.fixture(scope="module")
def admin(serve_cluster):
    with httpx.Client(base_url=serve_cluster.url, headers=serve_cluster.admin, timeout=120) as client:
        yield client


@pytest.fixture(scope="module")
def tenant(serve_cluster):
    with httpx.Client(base_url=serve_cluster.url, timeout=120,
                      headers={"Authorization": f"Bearer {serve_cluster.api_key}"}) as client:
        yield client


def cluster_state(serve_cluster, admin, tenant) -> dict:
    """Everything a refused upload must leave alone."""
    import redis

    r = redis.Redis.from_url(serve_cluster.redis_url)
    registry = {}
    for key in sorted(r.scan_iter(match="lr:registry:*")):
        kind = r.type(key)
        registry[key] = {b"hash": r.hgetall, b"string": r.get, b"stream": lambda k: r.xrange(k)}[kind](key)
    store = serve_cluster.cfg.adapter_store.path
    files = sorted((os.path.relpath(os.path.join(d, f), store), os.path.getsize(os.path.join(d, f)))
                   for d, _, names in os.walk(store) for f in names)
    folders = sorted(os.path.relpath(d, store) for d, _, _ in os.walk(store))
    retrieval = [tenant.post("/v1/retrieve", json={"input": card.sample[0].inputs}).json()["data"][0]["adapters"]
                 for card in serve_cluster.zoo.cards]
    models = [(m["id"], m.get("version")) for m in tenant.get("/v1/models").json()["data"]]
    composers = [sorted(c["resident"]) for c in admin.get("/admin/status").json()["composers"]]
    return {"registry": registry, "store": (folders, files), "retrieval": retrieval, "models": models,
            "composers": composers}


@pytest.fixture(scope="module")
def baseline(serve_cluster, admin, tenant):
    """The state before any hostile upload, with adapters resident on the composer."""
    names = [card.model_name for card in serve_cluster.zoo.cards]
    r = tenant.post("/v1/completions", json={"model": "auto", "prompt": "hello", "max_tokens": 2,
                                             "lora": {"adapters": names}})
    assert r.status_code == 200, r.text
    state = cluster_state(serve_cluster, admin, tenant)
    assert state["composers"][0], "no adapter resident: the composer comparison would prove nothing"
    assert state["registry"][b"lr:registry:adapters"] and state["store"][1]
    return state


@pytest.fixture(scope="module")
def good(serve_cluster):
    """A valid adapter's files (the zoo's first), as bytes by file name; and its card."""
    card = serve_cluster.zoo.cards[0]
    folder = serve_cluster.zoo.adapters[card.model_name]
    return {f: (folder / f).read_bytes() for f in (CONFIG, WEIGHTS)}, card


def upload(name: str, card, files: dict[str, bytes] | None = None, **extra) -> dict:
    body = {"name": name, "card": {**card.model_dump(), "model_name": name}, **extra}
    if files is not None:
        body["files"] = {f: base64.b64encode(data).decode() for f, data in files.items()}
    return body


def with_config(files: dict[str, bytes], **changes) -> dict[str, bytes]:
    config = json.loads(files[CONFIG])
    config.update(changes)
    return {**files, CONFIG: json.dumps(config).encode()}


def with_tensors(files: dict[str, bytes], tmp_path, change) -> dict[str, bytes]:
    """`change(tensors)` edits the weights in place; the result saved as real safetensors."""
    src, out = tmp_path / "in.safetensors", tmp_path / "out.safetensors"
    src.write_bytes(files[WEIGHTS])
    tensors = load_file(src)
    change(tensors)
    save_file(tensors, out)
    return {**files, WEIGHTS: out.read_bytes()}


def first_key(tensors: dict, side: str = "lora_A") -> str:
    return next(k for k in sorted(tensors) if side in k)


class Planted:
    """Pickle payload: unpickling it creates `marker` (proof that code ran)."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return open, (self.marker, "w")


def set_tensor(key_side: str, fill):
    def change(tensors):
        key = first_key(tensors, key_side)
        tensors[key] = fill(tensors[key])
    return change


# (id, build(files, tmp_path, marker) -> files, message fragment). Uploaded as a new adapter and as
# a new version of an existing one.
UPLOADED = [
    ("pickle weights", lambda f, t, m: {CONFIG: f[CONFIG], "adapter_model.bin": pickle.dumps(Planted(m))},
     "not allowed"),
    ("pickle disguised as safetensors", lambda f, t, m: {**f, WEIGHTS: pickle.dumps(Planted(m))}, "corrupted"),
    ("traversal in a file name", lambda f, t, m: {**f, "../../adapter_config.json": f[CONFIG]}, "not allowed"),
    ("absolute file name", lambda f, t, m: {**f, "/tmp/adapter_model.safetensors": f[WEIGHTS]}, "not allowed"),
    ("traversal inside an allowed name", lambda f, t, m: {**f, "x/../adapter_config.json": f[CONFIG]},
     "not allowed"),
    ("truncated safetensors", lambda f, t, m: {**f, WEIGHTS: f[WEIGHTS][: len(f[WEIGHTS]) // 2]}, "corrupted"),
    ("header claims 2**60 bytes", lambda f, t, m: {**f, WEIGHTS: struct.pack("<Q", 2**60) + f[WEIGHTS][8:]},
     "corrupted"),
    ("random bytes", lambda f, t, m: {**f, WEIGHTS: os.urandom(4096)}, "corrupted"),
    ("empty weights file", lambda f, t, m: {**f, WEIGHTS: b""}, "corrupted"),
    ("no weights file", lambda f, t, m: {CONFIG: f[CONFIG]}, "no adapter_model.safetensors"),
    ("config not JSON", lambda f, t, m: {**f, CONFIG: b"{r: 8"}, "not valid JSON"),
    ("config a JSON list", lambda f, t, m: {**f, CONFIG: b"[1, 2]"}, "JSON object"),
    ("config invalid UTF-8", lambda f, t, m: {**f, CONFIG: b'{"r": 8, "x": "\xff"}'}, "not valid JSON"),
    ("different base model", lambda f, t, m: with_config(f, base_model_name_or_path="meta-llama/Llama-2-70b-hf"),
     "does not match the served base model"),
    ("rank above the limit", lambda f, t, m: with_config(f, r=100_000), "field r="),
    ("rank not an integer", lambda f, t, m: with_config(f, r="8"), "field r="),
    ("not LoRA", lambda f, t, m: with_config(f, peft_type="PREFIX_TUNING"), "is not LORA"),
    ("DoRA", lambda f, t, m: with_config(f, use_dora=True), "use_dora"),
    ("alpha NaN", lambda f, t, m: with_config(f, lora_alpha=float("nan")), "lora_alpha"),  # json writes NaN
    ("wrong shape", lambda f, t, m: with_tensors(f, t, set_tensor("lora_A", lambda x: x.t().contiguous())),
     "has shape"),
    ("wrong rank in the weights", lambda f, t, m: with_tensors(f, t, set_tensor("lora_A", lambda x: x[:1].clone())),
     "has shape"),
    ("NaN values", lambda f, t, m: with_tensors(f, t, set_tensor("lora_B", lambda x: torch.full_like(x, float("nan")))),
     "NaN or infinite"),
    ("infinite values", lambda f, t, m: with_tensors(f, t, set_tensor("lora_A", lambda x: torch.full_like(x, float("inf")))),
     "NaN or infinite"),
    ("huge values", lambda f, t, m: with_tensors(f, t, set_tensor("lora_B", lambda x: torch.full_like(x, 3e38))),
     "magnitude"),
    ("integer tensor", lambda f, t, m: with_tensors(f, t, set_tensor("lora_A", lambda x: x.to(torch.int32))),
     "non-float"),
    ("a layer the base lacks", lambda f, t, m: with_tensors(f, t, lambda ts: ts.update(
        {first_key(ts).replace("layers.0.", "layers.999."): ts[first_key(ts)].clone()})), "layer 999"),
    ("a foreign tensor", lambda f, t, m: with_tensors(f, t, lambda ts: ts.update(
        {"lm_head.weight": torch.zeros(4, 4)})), "not a LoRA weight"),
    ("lora_A without its lora_B", lambda f, t, m: with_tensors(f, t, lambda ts: ts.pop(first_key(ts, "lora_B"))),
     "lacks its lora_A or lora_B"),
    ("not base64", None, "base64"),
]


def assert_refused(r: httpx.Response, fragment: str) -> None:
    assert 400 <= r.status_code < 500, (r.status_code, r.text[:400])
    error = ErrorResponse.model_validate(r.json()).error
    assert fragment.lower() in error.message.lower(), error.message


@pytest.mark.parametrize("existing", [False, True], ids=["new adapter", "new version"])
@pytest.mark.parametrize("case, build, fragment", UPLOADED, ids=[c[0] for c in UPLOADED])
def test_hostile_upload_is_refused_and_changes_nothing(serve_cluster, admin, tenant, baseline, good, tmp_path,
                                                      case, build, fragment, existing):
    files, card = good
    name = card.model_name if existing else "hostile"
    marker = tmp_path / "pickle-ran"
    if build is None:
        body = upload(name, card, files)
        body["files"][WEIGHTS] = "not base64 at all!"
    else:
        body = upload(name, card, build(files, tmp_path, str(marker)))
    assert_refused(admin.post("/admin/adapters", json=body), fragment)
    assert not marker.exists(), "the pickle payload ran"
    assert cluster_state(serve_cluster, admin, tenant) == baseline


def symlinked_out(folder, good, outside):
    """A folder whose weights file is a symlink to a (valid) file outside it."""
    (folder / CONFIG).write_bytes(good[CONFIG])
    (outside / WEIGHTS).write_bytes(good[WEIGHTS])
    (folder / WEIGHTS).symlink_to(outside / WEIGHTS)


def config_to_passwd(folder, good, outside):
    (folder / CONFIG).symlink_to("/etc/passwd")
    (folder / WEIGHTS).write_bytes(good[WEIGHTS])


def pickle_in_folder(folder, good, outside):
    (folder / CONFIG).write_bytes(good[CONFIG])
    (folder / "adapter_model.bin").write_bytes(pickle.dumps(Planted(str(outside / "pickle-ran"))))


def extra_script(folder, good, outside):
    for f, data in good.items():
        (folder / f).write_bytes(data)
    (folder / "setup.py").write_text("raise SystemExit('ran')\n")


def folder_symlink(folder, good, outside):
    """Every file a link to a valid adapter's file stored elsewhere."""
    for f, data in good.items():
        (outside / f).write_bytes(data)
        (folder / f).symlink_to(outside / f)


@pytest.mark.parametrize("case, build, fragment", [
    ("weights symlinked out of the folder", symlinked_out, "symlink points outside"),
    ("config symlinked to /etc/passwd", config_to_passwd, "symlink points outside"),
    ("every file symlinked out", folder_symlink, "symlink points outside"),
    ("pickle weights", pickle_in_folder, "pickle weights are refused"),
    ("an unexpected file", extra_script, "unexpected file"),
])
def test_hostile_folder_path_is_refused_and_changes_nothing(serve_cluster, admin, tenant, baseline, good, tmp_path,
                                                           case, build, fragment):
    files, card = good
    folder, outside = tmp_path / "hostile", tmp_path / "outside"
    folder.mkdir()
    outside.mkdir()
    build(folder, files, outside)
    assert_refused(admin.post("/admin/adapters", json=upload("hostile", card, path=str(folder))), fragment)
    assert not (outside / "pickle-ran").exists()
    assert cluster_state(serve_cluster, admin, tenant) == baseline


@pytest.mark.parametrize("name, path, fragment", [
    ("../escape", None, "path separator"),
    ("..", None, "path separator"),
    ("a/b", None, "path separator"),
    (".staging", None, "start alphanumeric"),
    ("x" * 200, None, "at most 128"),
    ("hostile", "", "at least 1 character"),
    ("hostile", "/etc", "unexpected file"),
    ("hostile", "/nonexistent/folder", "not a directory"),
    ("hostile", "{zoo}/../../..", "unexpected file"),
])
def test_hostile_names_and_paths_are_refused(serve_cluster, admin, tenant, baseline, good, name, path, fragment):
    files, card = good
    if path is None:
        body = upload(name, card, files)
    else:
        body = upload(name, card, path=path.format(zoo=serve_cluster.zoo.adapters[card.model_name]))
    assert_refused(admin.post("/admin/adapters", json=body), fragment)
    assert cluster_state(serve_cluster, admin, tenant) == baseline


def test_a_valid_upload_still_works_after_the_hostile_ones(serve_cluster, admin, tenant, baseline, good):
    """The refusals above are not a broken endpoint: the same files, untouched, are accepted."""
    files, card = good
    r = admin.post("/admin/adapters", json=upload("welcome", card, files))
    assert r.status_code == 200, r.text
    deadline = time.monotonic() + 30  # the Ingress's catalog follows the registry within its refresh period
    while "welcome" not in [m["id"] for m in tenant.get("/v1/models").json()["data"]]:
        assert time.monotonic() < deadline, "the accepted adapter never showed in /v1/models"
        time.sleep(0.5)
