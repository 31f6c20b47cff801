"""Safe rollout on the real cluster: the quality gate scores staged versions by real generation,
promote refuses a worse one unless forced (audited); automatic canaries under client load roll a
failing version back (only the canary share ever fails) and promote a good one; `adapters add`
takes a folder as PEFT's save_pretrained leaves it; every registry action has a CLI path.

One cluster for the whole module (tests/conftest.py); tests run in file order and build on the
state the earlier ones leave."""
from __future__ import annotations

import contextlib
import io
import json
import shutil
import threading
import time
import uuid
from pathlib import Path

import httpx
import pytest

from cluster.cli import main
from cluster.demo.tasks import TASKS
from cluster.demo.variants import variant_adapter
from services.serving.catalog import canary_bucket

TASK = "review_sentiment"  # "positive" / "negative": the tiny model learns the label's first token in seconds
GATE_SAMPLES = 12


@pytest.fixture(scope="module")
def cli(serve_cluster):
    """Run `loraretriever ARGS --url <cluster>` in this process: (exit code, stdout, stderr)."""
    def run(*args: str) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main([*args, "--url", serve_cluster.url])
        return code, out.getvalue(), err.getvalue()

    return run


@pytest.fixture(scope="module")
def trained(serve_cluster, tmp_path_factory):
    """Two new versions of TASK trained on the zoo's base as a user would (save_pretrained folders):
    'good' on the task's labels, 'worse' on flipped labels; plus held-out samples."""
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    from cluster.demo.train import TrainSettings, train_lora

    task = next(t for t in TASKS if t.name == TASK)
    examples = task.examples(40 + GATE_SAMPLES, seed=1)
    train, held_out = examples[:40], examples[40:]
    flip = {"positive": "negative", "negative": "positive"}
    base = serve_cluster.zoo.base
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = LlamaForCausalLM.from_pretrained(base, dtype=torch.float32)
    model.name_or_path = "tiny-random-llama"
    root = tmp_path_factory.mktemp("trained")
    settings = TrainSettings(steps=80, batch_size=8, learning_rate=2e-2)
    folders = {}
    for tag, data in (("good", train), ("worse", [(x, flip[y]) for x, y in train])):
        folders[tag] = root / tag
        train_lora(model, tokenizer, data, folders[tag], settings)
    return folders, held_out


def user_folder(src: Path, dest: Path, held_out, card) -> Path:
    """What a training run leaves: the adapter, README.md, training args, a checkpoint, tokenizer
    files, and the card (with its held-out samples) as card.json."""
    shutil.copytree(src, dest)
    (dest / "training_args.bin").write_bytes(b"\x80\x04not-for-the-server")
    (dest / "checkpoint-20").mkdir()
    (dest / "checkpoint-20" / "adapter_model.safetensors").write_bytes(b"old")
    (dest / "tokenizer.json").write_text("{}")
    evaluation = {"metric": "rouge", "samples": [{"inputs": x, "targets": y} for x, y in held_out]}
    (dest / "card.json").write_text(json.dumps({**card, "evaluation": evaluation}))
    return dest


@pytest.fixture(scope="module")
def card(serve_cluster):
    return next(c for c in serve_cluster.zoo.cards if c.model_name == TASK).model_dump(exclude={"model_name"})


@pytest.fixture(scope="module")
def admin(serve_cluster):
    return httpx.Client(base_url=serve_cluster.url, headers=serve_cluster.admin, timeout=300)


def test_add_sends_only_the_adapter_files_and_the_gate_refuses_the_worse_version(
        serve_cluster, cli, trained, card, tmp_path, admin):
    folders, held_out = trained
    assert (folders["good"] / "README.md").is_file()  # save_pretrained writes one
    added = {}
    # 'good' is gated and promoted over the zoo's 3-step adapter; 'worse' is then gated against it.
    for tag in ("good", "worse"):
        code, out, err = cli("adapters", "add", TASK, str(user_folder(folders[tag], tmp_path / tag, held_out, card)),
                             "--staged")
        assert code == 0, err
        assert "left out (not needed to serve): README.md, checkpoint-20/, tokenizer.json, training_args.bin" in err
        added[tag] = json.loads(out)
        if tag == "good":
            assert cli("adapters", "promote", f"{TASK}@{added[tag]['version']}")[0] == 0
    good, worse = added["good"]["quality"], added["worse"]["quality"]
    print("gate reports:", json.dumps({"worse": worse, "good": good}, indent=1))  # the figures docs/rollout.md quotes
    assert worse["samples"] == good["samples"] == GATE_SAMPLES and worse["source"] == "held_out"
    assert good["passed"] is True and good["score"] > good["base_score"], good
    assert admin.get(f"/admin/adapters/{TASK}").json()["active_version"] == good["version"]
    assert worse["passed"] is False and worse["active_version"] == good["version"], worse
    assert worse["active_score"] == good["score"] > worse["score"]

    code, _, err = cli("adapters", "promote", f"{TASK}@{worse['version']}")
    assert code == 2 and "409" in err and "quality gate failed" in err and f"{worse['score']:.1f}" in err
    code, _, err = cli("adapters", "promote", f"{TASK}@{worse['version']}", "--force")
    assert code == 0, err
    entry = admin.get(f"/admin/adapters/{TASK}/history").json()["data"][-1]
    assert entry["action"] == "activate" and entry["version"] == worse["version"]
    assert entry["detail"].startswith("forced over the quality gate")
    assert cli("adapters", "rollback", TASK)[0] == 0
    shown = admin.get(f"/admin/adapters/{TASK}").json()
    assert shown["active_version"] == good["version"]
    assert shown["versions"][good["version"]]["quality"]["passed"] is True


class Load:
    """Clients sending TASK requests (plain name: the canary split applies) with their own request ids."""

    def __init__(self, serve_cluster, threads: int = 2):
        self.client = httpx.Client(base_url=serve_cluster.url, timeout=120,
                                   headers={"Authorization": f"Bearer {serve_cluster.api_key}"})
        self.prompt = next(q.inputs for q in serve_cluster.zoo.queries if q.task == TASK)
        self.results: list[tuple[float, str, int, str | None]] = []  # (time, request id, status, version)
        self.stop = threading.Event()
        self.workers = [threading.Thread(target=self._loop) for _ in range(threads)]

    def _loop(self):
        while not self.stop.is_set():
            rid = f"load-{uuid.uuid4().hex}"
            r = self.client.post("/v1/completions", headers={"X-Request-Id": rid},
                                 json={"model": TASK, "prompt": self.prompt, "max_tokens": 2})
            version = r.json()["choices"][0]["lora"]["adapters"][0]["version"] if r.status_code == 200 else None
            self.results.append((time.monotonic(), rid, r.status_code, version))

    def __enter__(self):
        for w in self.workers:
            w.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for w in self.workers:
            w.join(timeout=150)


def wait_for_verdict(admin, version: str, timeout_s: float = 240) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        record = admin.get(f"/admin/adapters/{TASK}").json()
        if record["canary"] is None or record["canary"]["version"] != version:
            return record
        time.sleep(0.5)
    pytest.fail(f"no verdict on {TASK}@{version} within {timeout_s:.0f} s: {record['canary']}")


def canary(cli, version: str, percent: int, min_requests: int) -> float:
    code, _, err = cli("adapters", "canary", f"{TASK}@{version}", "--percent", str(percent), "--auto",
                       "--min-requests", str(min_requests))
    assert code == 0, err
    return time.monotonic()


def test_a_failing_canary_is_rolled_back_under_load_and_only_its_share_fails(serve_cluster, cli, admin, tmp_path):
    active = admin.get(f"/admin/adapters/{TASK}").json()["active_version"]
    src = serve_cluster.zoo.adapters[TASK]
    # No labelled card samples: not gated. Its files are then broken in the store: the composer cannot load it.
    unlabelled = {"sample": [{"inputs": "Is this review positive or negative? The soup was cold."}]}
    (tmp_path / "card.json").write_text(json.dumps(unlabelled))
    code, out, err = cli("adapters", "add", TASK, str(variant_adapter(src, tmp_path / "broken", 1.01)),
                         "--card", str(tmp_path / "card.json"), "--staged")
    assert code == 0, err
    broken = json.loads(out)
    assert broken["quality"]["passed"] is None
    (Path(serve_cluster.cfg.adapter_store.path) / TASK / broken["version"] / "adapter_model.safetensors").write_bytes(
        b"not safetensors")
    percent = 30
    with Load(serve_cluster) as load:
        time.sleep(3)
        started = canary(cli, broken["version"], percent, min_requests=15)
        record = wait_for_verdict(admin, broken["version"])
        decided = time.monotonic()
        time.sleep(3)
    assert record["active_version"] == active and record["last_verdict"].startswith(f"{broken['version']} rolled back")
    failures = [(rid, status) for _, rid, status, _ in load.results if status != 200]
    print(f"rollback verdict after {decided - started:.1f} s, {len(failures)} failed requests of "
          f"{len(load.results)}: {record['last_verdict']}")
    assert failures, "the broken canary never received a request"
    assert all(status == 503 and canary_bucket(rid, TASK) < percent for rid, status in failures), failures
    late = [r for r in load.results if r[0] > decided + 2]
    assert late and all(status == 200 and version == active for _, _, status, version in late)
    history = admin.get(f"/admin/adapters/{TASK}/history").json()["data"]
    assert history[-1]["action"] == "canary_rollback" and "errors" in history[-1]["detail"]


def test_a_good_canary_is_promoted_under_load(serve_cluster, cli, admin, trained, card, tmp_path):
    folders, held_out = trained
    # A retrained 'good': lora_B scaled by 1.01, the same answers, new weights and checksum.
    folder = user_folder(variant_adapter(folders["good"], tmp_path / "retrained", 1.01), tmp_path / "user",
                         held_out, card)
    code, out, err = cli("adapters", "add", TASK, str(folder), "--staged")
    assert code == 0, err
    quality = json.loads(out)["quality"]
    assert quality["passed"] is True, quality
    good = quality["version"]
    with Load(serve_cluster) as load:
        time.sleep(2)
        started = canary(cli, good, 30, min_requests=15)
        record = wait_for_verdict(admin, good)
        decided = time.monotonic()
    print(f"promote verdict after {decided - started:.1f} s, {len(load.results)} requests: {record['last_verdict']}")
    assert record["active_version"] == good and record["last_verdict"].startswith(f"{good} promoted")
    assert all(status == 200 for _, _, status, _ in load.results)
    code, out, _ = cli("adapters", "history", TASK)
    assert code == 0 and json.loads(out)["data"][-1]["action"] == "canary_promote"


def test_every_registry_action_has_a_cli_path(serve_cluster, cli, admin, tmp_path):
    record = admin.get(f"/admin/adapters/{TASK}").json()
    older = min((v for v in record["versions"] if v != record["active_version"]), key=lambda v: int(v[1:]))
    assert cli("adapters", "canary", f"{TASK}@{older}", "--percent", "5", "--force")[0] == 0
    assert cli("adapters", "end-canary", TASK)[0] == 0
    assert admin.get(f"/admin/adapters/{TASK}").json()["canary"] is None
    code, out, err = cli("adapters", "retire", f"{TASK}@{older}")
    assert code == 0 and older not in json.loads(out)["versions"], err
    code, out, _ = cli("adapters", "gc")
    assert code == 0 and isinstance(json.loads(out)["deleted"], list)
    code, _, err = cli("adapters", "visibility", TASK, "private")
    assert code == 2 and "needs an owner tenant" in err
    code, out, err = cli("adapters", "visibility", TASK, "private", "--tenant", "acme")
    assert code == 0 and json.loads(out)["owner_tenant"] == "acme", err
    assert cli("adapters", "visibility", TASK, "shared")[0] == 0
    code, _, err = cli("adapters", "add", TASK, str(tmp_path))
    assert code == 2 and "card.json" in err
