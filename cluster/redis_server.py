"""A redis-server process owned by the caller (local runs and tests).

Binds 127.0.0.1 only. Given a data directory, it keeps its data there with append-only
persistence (every write logged, fsync once a second, replayed at the next start), so a
stop and start keeps tenants, keys, adapters and audit logs; without one it persists nothing.
"""
from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import redis

from cluster.errors import UserError


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """Start with `start()`, stop with `stop()`; `url` points at it."""

    def __init__(self, port: int | None = None, data_dir: str | Path | None = None, password: str | None = None):
        self.port = port or free_port()
        self.password = password  # requirepass; given to redis-server through its stdin, never argv
        self.data_dir = Path(data_dir) if data_dir else Path(tempfile.mkdtemp(prefix="lr-redis-"))
        self._owns_dir = data_dir is None
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 10.0) -> "RedisServer":
        binary = shutil.which("redis-server")
        if binary is None:
            raise UserError("redis-server is not on PATH; run `bash cluster/setup.sh` (it installs it)")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        # Config from stdin ("-"): a password on the command line would show in `ps` for every user.
        config = f"requirepass {self.password}\n" if self.password else ""
        self.proc = subprocess.Popen(
            [binary, "-", "--bind", "127.0.0.1", "--port", str(self.port), "--dir", str(self.data_dir),
             "--save", "", "--appendonly", "no" if self._owns_dir else "yes", "--appendfsync", "everysec",
             "--protected-mode", "yes"],
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        self.proc.stdin.write(config.encode())
        self.proc.stdin.close()
        client = self.client()
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                client.ping()
                return self
            except redis.ConnectionError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise UserError(f"redis-server did not start on 127.0.0.1:{self.port}")
                time.sleep(0.05)

    def client(self, **kwargs) -> redis.Redis:
        return redis.Redis.from_url(self.url, password=self.password, **kwargs)

    def stop(self) -> None:
        """SIGTERM: redis-server flushes its append-only file before it exits."""
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.proc = None
        if self._owns_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)
