"""`loraretriever up`: everything on this machine, loopback only.

Order: Redis (owned), Ray (local, no dashboard), the Serve app on 127.0.0.1, then the
demo adapters registered one by one as the zoo build finishes them, so the first
requests are answered by the base model while training goes on."""
from __future__ import annotations

import json
import logging
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

import httpx

from services.config import AppConfig, data_home
from cluster.errors import UserError
from cluster.local_ray import RAY_HOME, init_local_ray
from cluster.redis_server import RedisServer
from cluster.serve_start import PATIENCE_ENV, not_ready, retried, startup_patience_s

log = logging.getLogger("loraretriever.up")
APP_NAME = "loraretriever"
STATE_FILE = RAY_HOME.parent / "up.json"
ADMIN_KEY_FILE = RAY_HOME.parent / "admin-key"
DEMO_KEY_FILE = RAY_HOME.parent / "demo-api-key"


def read_state() -> dict | None:
    try:
        return json.loads(STATE_FILE.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


class LocalCluster:
    def __init__(self, cfg: AppConfig, *, demo: bool = True):
        # Replicas run in other working directories: relative paths mean the caller's.
        cfg.adapter_store.path = str(Path(cfg.adapter_store.path).resolve())
        if cfg.base_model.path != "demo" and "://" not in cfg.base_model.path:  # a URI is fetched per node
            cfg.base_model.path = str(Path(cfg.base_model.path).resolve())
        self.cfg = cfg
        self.demo = demo and cfg.base_model.path == "demo"
        self.redis: RedisServer | None = None
        self.build: subprocess.Popen | None = None

    # ---- start -----------------------------------------------------------
    def start(self) -> None:
        self._start_redis()
        self._reconcile_store()
        self._ensure_admin_key()
        if self.demo:
            self._start_demo_build()
        patience = startup_patience_s()
        log.info("starting Ray and Serve; they get %.0f s to start on this machine (%s)", patience, PATIENCE_ENV)
        init_local_ray(num_cpus=max(2, os.cpu_count() or 2), patience_s=patience)
        from ray import serve

        from deployments.app import build_app

        host, port = self.cfg.server.host, self.cfg.server.port
        deadline = time.monotonic() + patience
        fix = (f"free some CPU or memory and run `loraretriever up` again, or give it longer with "
               f"{PATIENCE_ENV} (Ray's logs: {RAY_HOME})")
        retried("Serve's HTTP proxy", lambda: serve.start(http_options={"host": host, "port": port}), deadline, fix)
        log.info("deploying the Serve app (loads the base model and the embedder)")
        retried("the Serve app", lambda: serve.run(build_app(self.cfg), name=APP_NAME, route_prefix="/",
                                                   blocking=False), deadline, fix)
        self._wait_ready(deadline, fix)
        STATE_FILE.write_text(json.dumps({"pid": os.getpid(), "url": self.url, "redis": self.cfg.redis.url}))
        log.info("serving on %s", self.url)

    @property
    def url(self) -> str:
        return f"http://{self.cfg.server.host}:{self.cfg.server.port}"

    def _start_redis(self) -> None:
        if not self.cfg.redis.start_local:
            return
        parsed = urlparse(self.cfg.redis.url)
        if parsed.hostname not in ("127.0.0.1", "localhost"):
            raise UserError(f"redis.start_local needs a loopback redis.url, not {self.cfg.redis.url}")
        data_dir = data_home() / "redis"  # append-only file here: state survives `down` and `up`
        self.redis = RedisServer(port=parsed.port or 6379, data_dir=data_dir).start()
        log.info("redis-server on %s", self.redis.url)

    def _reconcile_store(self) -> None:
        """Make the adapter store agree with the registry before anything serves: version folders
        the registry does not know (left by a Redis that lost its data, or an add cut short) are
        deleted, so version numbers continue from what the registry knows instead of drifting.
        Only with the Redis `up` owns: nobody else adds versions then."""
        if self.redis is None:
            return
        from services.registry.registry import AdapterRegistry
        from services.registry.store import AdapterStore
        from services.wiring import redis_client

        registry = AdapterRegistry(redis_client(self.cfg), AdapterStore(self.cfg.adapter_store.path), base_model="")
        deleted = registry.collect_garbage(min_age_s=0)
        if deleted:
            log.info("deleted adapter files the registry does not know: %s", ", ".join(deleted))
        missing = registry.missing_files()
        if missing:
            log.warning("registered versions without files in the adapter store (retire them with "
                        "`loraretriever adapters retire NAME@VERSION`): %s", ", ".join(missing))

    def _ensure_admin_key(self) -> None:
        """An admin key for the operator commands: the env var's, else one kept (0600) in the home."""
        env = self.cfg.server.admin_key_env
        if os.environ.get(env):
            return
        if not ADMIN_KEY_FILE.exists():
            ADMIN_KEY_FILE.write_text(secrets.token_urlsafe(32))
            ADMIN_KEY_FILE.chmod(0o600)
        os.environ[env] = ADMIN_KEY_FILE.read_text().strip()
        log.info("admin key in %s (export %s=$(cat %s) for `loraretriever adapters ...`)",
                 ADMIN_KEY_FILE, env, ADMIN_KEY_FILE)

    def demo_api_key(self) -> str | None:
        """A tenant 'demo' for the newcomer's first requests (None when auth is off); its key is
        kept (0600) in the home, re-issued if Redis lost it."""
        if not self.cfg.server.auth_enabled:
            return None
        from services.wiring import redis_client
        from services.tenancy.tenants import TenantError, TenantStore

        tenants = TenantStore(redis_client(self.cfg))
        if DEMO_KEY_FILE.exists() and tenants.authenticate(DEMO_KEY_FILE.read_text().strip()):
            return DEMO_KEY_FILE.read_text().strip()
        try:
            key = tenants.add("demo")
        except TenantError:  # the tenant exists but the saved key is gone
            key = tenants.issue_key("demo")
        DEMO_KEY_FILE.write_text(key)
        DEMO_KEY_FILE.chmod(0o600)
        return key

    def _start_demo_build(self) -> None:
        from cluster.demo.zoo import default_root

        base = default_root() / "base" / "config.json"
        logfile = open(RAY_HOME.parent / "demo-build.log", "ab")
        self.build = subprocess.Popen([sys.executable, "-m", "cluster.cli", "demo", "build"],
                                      stdout=logfile, stderr=subprocess.STDOUT)
        log.info("demo zoo build running in the background (log: %s)", logfile.name)
        while not base.is_file():
            if self.build.poll() not in (None, 0):
                raise UserError(f"the demo build failed; see {logfile.name}")
            time.sleep(1)

    def _wait_ready(self, deadline: float, fix: str) -> None:
        """Until /readyz answers 200 (every deployment has a replica that answers), or the deadline."""
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/readyz", timeout=10).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1)
        raise UserError(f"the cluster did not become ready in time: {not_ready(APP_NAME)}; {fix}")

    # ---- demo adapters -----------------------------------------------------
    def register_demo_adapters(self) -> list[str]:
        """Register every finished demo adapter the registry lacks; returns the new names."""
        from cluster.adapter_admin import AdapterAdmin
        from cluster.demo.zoo import default_root, load_zoo

        zoo = load_zoo(default_root())
        admin = AdapterAdmin.from_config(self.cfg)
        known = {r.name for r in admin.registry.snapshot()}
        added = []
        for card in zoo.cards:
            path = zoo.adapters.get(card.model_name)
            if path is None or card.model_name in known:
                continue
            admin.add(card.model_name, path, card, actor="loraretriever-up")
            added.append(card.model_name)
        return added

    def run_until_stopped(self) -> None:
        """Register demo adapters as they appear, until SIGTERM/SIGINT (see exit_on_signals)."""
        while True:
            if self.demo:
                for name in self.register_demo_adapters():
                    log.info("registered demo adapter %s", name)
            time.sleep(5)

    # ---- stop --------------------------------------------------------------
    def stop(self) -> None:
        if self.build and self.build.poll() is None:
            self.build.terminate()
        try:
            from ray import serve

            serve.shutdown()
            import ray

            ray.shutdown()
        finally:
            if self.redis:
                self.redis.stop()
            STATE_FILE.unlink(missing_ok=True)
        log.info("stopped")


def exit_on_signals() -> None:
    """SIGTERM (`down`) and SIGINT unwind the stack, so `finally: cluster.stop()` runs, also
    mid-start. Set again after Ray starts: Ray installs handlers of its own."""
    def _exit(signum, frame):
        raise SystemExit(0)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _exit)


def sample_request(url: str, prompt: str, api_key: str | None) -> dict:
    """One chat completion with retrieval, as a newcomer's first request would be (the demo
    adapters were trained on the chat template). It asks for top-1 selection: on the demo zoo,
    mixing a task's adapter with its same-domain siblings garbles answers (docs/results.md)."""
    body = {"model": "auto", "messages": [{"role": "user", "content": prompt}], "max_tokens": 24,
            "lora": {"composition": "selection"}}
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    resp = httpx.post(f"{url}/v1/chat/completions", json=body, headers=headers, timeout=120)
    resp.raise_for_status()
    return resp.json()


def stop_running(timeout_s: float = 60) -> bool:
    """`down`: signal the `up` process and wait for it to finish stopping."""
    state = read_state()
    if state is None:
        return False
    try:
        os.kill(state["pid"], signal.SIGTERM)
    except ProcessLookupError:
        STATE_FILE.unlink(missing_ok=True)
        return False
    deadline = time.monotonic() + timeout_s
    while STATE_FILE.exists() and time.monotonic() < deadline:
        time.sleep(0.5)
    return not STATE_FILE.exists()
