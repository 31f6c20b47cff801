"""No egress: `loraretriever up` as a user runs it (the installed command, an environment
without the offline or Ray variables, a config file), then operator commands and requests of
every kind, then `loraretriever down`, each command under strace. Every connect/sendto/sendmsg
with an internet address must go to loopback, and no DNS query may ask for a name that is not
this machine's (a loopback resolver forwards the rest). The tiny zoo stands in for the demo zoo
(`--no-demo`): the full one takes 15 minutes to build."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest
import yaml

from services.offline import OFFLINE_ENV
from strace_log import (TRACE, Lookup, dns_lookups, dns_question, inet_destinations, is_local_name,
                         is_loopback)

needs_strace = pytest.mark.skipif(shutil.which("strace") is None,
                                  reason="strace is not installed (cluster/setup.sh installs it)")
CLI = Path(sys.executable).with_name("loraretriever")
# How long the cluster keeps serving, at least, once up: long enough for background calls made a
# while after start (ONNX Runtime's telemetry looked up its host about 8 s after the first session).
MIN_SERVING_S = 30


def query(name: str, flags: bytes = b"\x01\x00") -> bytes:
    labels = b"".join(bytes([len(p)]) + p.encode() for p in name.split("."))
    return b"\xb6\xd2" + flags + b"\x00\x01\x00\x00\x00\x00\x00\x00" + labels + b"\x00\x00\x01\x00\x01"


def hex_bytes(data: bytes) -> str:
    return "".join(f"\\x{b:02x}" for b in data)


def test_parser_sees_foreign_addresses():
    log = ('12 connect(3, {sa_family=AF_INET, sin_port=htons(443), sin_addr=inet_addr("10.1.2.3")}, 16) = 0\n'
           '13 sendto(5, "\\x00", 1, 0, {sa_family=AF_INET6, sin6_port=htons(53), sin6_flowinfo=htonl(0), '
           'inet_pton(AF_INET6, "2001:db8::1", &sin6_addr), sin6_scope_id=0}, 28) = 1\n'
           '14 connect(7, {sa_family=AF_UNIX, sun_path="/tmp/x"}, 110) = 0\n'
           '15 connect(8, {sa_family=AF_INET, sin_port=htons(6379), sin_addr=inet_addr("127.0.0.1")}, 16 '
           '<unfinished ...>\n')
    found = inet_destinations(log)
    assert found == [(12, "connect", "10.1.2.3", 443), (13, "sendto", "2001:db8::1", 53),
                     (15, "connect", "127.0.0.1", 6379)]
    assert [is_loopback(a) for _, _, a, _ in found] == [False, False, True]
    assert is_loopback("::1") and is_loopback("::ffff:127.0.0.1") and not is_loopback("0.0.0.0")


def test_parser_reads_the_names_of_dns_queries_sent_to_a_loopback_resolver():
    """glibc connects a UDP socket to the resolver, then sends A and AAAA queries with sendmmsg;
    others use sendto with the address; a thread switch splits a call in two lines."""
    hf, own = hex_bytes(query("huggingface.co")), hex_bytes(query("localhost"))
    log = ('20 connect(3, {sa_family=AF_INET, sin_port=htons(53), sin_addr=inet_addr("127.0.0.53")}, 16) = 0\n'
           f'20 sendmmsg(3, [{{msg_hdr={{msg_name=NULL, msg_iov=[{{iov_base="{hf}", iov_len=32}}]}}, msg_len=32}}, '
           f'{{msg_hdr={{msg_name=NULL, msg_iov=[{{iov_base="{hf}", iov_len=32}}]}}, msg_len=32}}], 2, 0) = 2\n'
           f'21 sendto(4, "{own}", 27, 0, {{sa_family=AF_INET, sin_port=htons(53), '
           'sin_addr=inet_addr("127.0.0.53")}, 16) = 27\n'
           '22 connect(5, {sa_family=AF_INET, sin_port=htons(53), sin_addr=inet_addr("127.0.0.53")}, 16) = 0\n'
           '22 sendto(5, <unfinished ...>\n'
           '23 connect(6, {sa_family=AF_INET, sin_port=htons(6379), sin_addr=inet_addr("127.0.0.1")}, 16) = 0\n'
           f'22 <... sendto resumed>"{hex_bytes(query("pypi.org"))}", 22, MSG_NOSIGNAL, NULL, 0) = 22\n'
           '24 connect(7, {sa_family=AF_INET, sin_port=htons(53), sin_addr=inet_addr("127.0.0.53")}, 16) = 0\n'
           f'25 sendto(9, "{hf}", 32, 0, NULL, 0) = 32\n')  # not a DNS socket: not a lookup
    found = dns_lookups(log)
    assert found == [Lookup(20, "127.0.0.53:53", "huggingface.co"), Lookup(20, "127.0.0.53:53", "huggingface.co"),
                     Lookup(21, "127.0.0.53:53", "localhost"), Lookup(22, "127.0.0.53:53", "pypi.org"),
                     Lookup(24, "127.0.0.53:53", None)]  # a resolver socket whose query was not seen counts
    assert [is_local_name(f.name) for f in found] == [False, False, True, False, False]
    assert dns_question(query("huggingface.co", flags=b"\x81\x80")) is None  # a reply is not a query
    assert dns_question(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n") is None


@needs_strace
def test_the_tracer_catches_a_real_lookup(tmp_path):
    """The control: a process that resolves an outside name is caught, whatever resolver this
    machine uses (and whether or not the lookup gets an answer)."""
    log_file = tmp_path / "strace.log"
    code = "import socket\ntry:\n    socket.getaddrinfo('huggingface.co', 443)\nexcept OSError:\n    pass\n"
    subprocess.run(["strace", *TRACE, "-o", str(log_file), sys.executable, "-c", code], check=True, timeout=120)
    names = {f.name for f in dns_lookups(log_file.read_text())}
    assert "huggingface.co" in names, log_file.read_text()[-2000:]


def user_env(home: Path) -> dict[str, str]:
    """A user's shell: none of the variables the product must set itself."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RAY_", "LORARETRIEVER_", "HF_", "TRANSFORMERS_", "TOKENIZERS_", "ORT_"))}
    return env | {"LORARETRIEVER_HOME": str(home)}


def traced(log_dir: Path, label: str, args: list[str]) -> list[str]:
    return ["strace", *TRACE, "-o", str(log_dir / f"{label}.log"), str(CLI), *args]


def run_cli(log_dir: Path, label: str, args: list[str], env: dict) -> str:
    proc = subprocess.run(traced(log_dir, label, args), env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (label, proc.stdout[-2000:], proc.stderr[-3000:])
    return proc.stdout


def wait_serving(up: subprocess.Popen, out_file: Path, timeout_s: float = 420) -> None:
    deadline = time.monotonic() + timeout_s
    while "stop with Ctrl-C" not in out_file.read_text():
        assert up.poll() is None, f"`up` exited with {up.returncode}: {out_file.read_text()[-4000:]}"
        assert time.monotonic() < deadline, f"`up` did not start serving: {out_file.read_text()[-4000:]}"
        time.sleep(1)


def replica_offline_flags(up: subprocess.Popen) -> dict[str, dict[str, str]]:
    """The offline variables each Serve replica process started with (/proc/PID/environ)."""
    out = {}
    for proc in psutil.Process(up.pid).children(recursive=True):
        try:
            cmd = " ".join(proc.cmdline())
            if cmd.startswith("ray::ServeReplica"):
                out[cmd.split(":")[-1].strip()] = {k: proc.environ().get(k) for k in OFFLINE_ENV}
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return out


@needs_strace
def test_loraretriever_up_talks_to_loopback_only(tiny_zoo, tmp_path):
    from cluster.redis_server import free_port

    home, logs = tmp_path / "home", tmp_path / "strace"
    home.mkdir()
    logs.mkdir()
    port = free_port()
    config = tmp_path / "cluster.yaml"
    config.write_text(yaml.safe_dump({
        "base_model": {"path": str(tiny_zoo.base), "name": "tiny-random-llama"},
        "adapter_store": {"path": str(tmp_path / "store")},
        "redis": {"url": f"redis://127.0.0.1:{free_port()}/0"},
        "deployments": {name: {"num_cpus": 0.1} for name in ("ingress", "retriever", "composer")},
    }))
    env = user_env(home)
    out_file = tmp_path / "up.out"
    with open(out_file, "w") as out:
        up = subprocess.Popen(traced(logs, "up", ["up", "--config", str(config), "--no-demo", "--port", str(port)]),
                              env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_serving(up, out_file)
        serving_since = time.monotonic()
        flags = replica_offline_flags(up)
        url = f"http://127.0.0.1:{port}"
        ops = env | {"LORARETRIEVER_ADMIN_KEY": (home / "admin-key").read_text().strip(), "LORARETRIEVER_URL": url}
        for card in tiny_zoo.cards:
            card_file = tmp_path / f"{card.model_name}.card.json"
            card_file.write_text(json.dumps(card.model_dump(mode="json")))
            run_cli(logs, f"add-{card.model_name}", ["adapters", "add", card.model_name,
                                                     str(tiny_zoo.adapters[card.model_name]), "--card", str(card_file)],
                    ops)
        run_cli(logs, "status", ["status", "--config", str(config)], ops)
        user = httpx.Client(base_url=url, timeout=120,
                            headers={"Authorization": f"Bearer {(home / 'demo-api-key').read_text().strip()}"})
        named = tiny_zoo.cards[0].model_name
        checks = [
            user.post("/v1/chat/completions", json={"model": "auto", "max_tokens": 4,
                                                    "messages": [{"role": "user", "content": "hello"}]}),
            user.post("/v1/chat/completions", json={"model": "auto", "max_tokens": 4, "stream": True,
                                                    "messages": [{"role": "user", "content": "hello"}]}),
            user.post("/v1/completions", json={"model": named, "prompt": ["1 + 2", "hi"], "max_tokens": 4}),
            user.post("/v1/retrieve", json={"input": ["hello", "1 + 2"]}),
            user.get("/v1/models"),
        ]
        assert [r.status_code for r in checks] == [200] * len(checks), [r.text[:300] for r in checks]
        time.sleep(max(0.0, serving_since + MIN_SERVING_S - time.monotonic()))
        run_cli(logs, "down", ["down"], env)
        assert up.wait(120) == 0, out_file.read_text()[-3000:]
    finally:
        if up.poll() is None:
            up.terminate()
            up.wait(120)

    found, lookups = [], []
    for log_file in sorted(logs.glob("*.log")):
        log = log_file.read_text(errors="replace")
        found += [(log_file.stem, *call) for call in inet_destinations(log)]
        lookups += [(log_file.stem, lookup) for lookup in dns_lookups(log)]
    foreign = sorted({(cmd, call, addr, port) for cmd, _, call, addr, port in found if not is_loopback(addr)})
    outside_names = sorted({(cmd, lookup.resolver, lookup.name) for cmd, lookup in lookups
                            if not is_local_name(lookup.name)}, key=str)
    print(f"EGRESS-REPORT {len(found)} inet calls from {len({(c, t) for c, t, *_ in found})} processes and threads "
          f"in {len(list(logs.glob('*.log')))} traced commands; DNS queries: {len(lookups)} "
          f"({sorted({str(lk.name) for _, lk in lookups})}); foreign: {foreign}; outside names: {outside_names}; "
          f"replica offline flags: {flags}")
    # The trace really covered the cluster: Ray's processes, Redis and HTTP on loopback.
    assert len({t for c, t, *_ in found if c == "up"}) >= 4 and len(found) >= 20
    assert foreign == [], f"calls to non-loopback addresses: {foreign}"
    assert outside_names == [], f"DNS queries for names outside this machine: {outside_names}"
    # The product set the offline flags itself: the user's environment had none.
    assert set(flags) >= {"Ingress", "Retriever", "Composer"}, flags
    assert all(v == OFFLINE_ENV for v in flags.values()), flags
