"""Start Serve's proxy and the app on a machine that may be busy.

Serve gives its HTTP proxy 5 s to answer its first readiness check, then kills it (`ray.kill`)
and starts another; `serve.start` waiting on the killed one fails with `ActorDiedError`
("cancelled before it started running"). With one other CPU-bound job on a 2-core machine that
happened twice in a row. Here the checks get a patience that suits the machine (its cores and
its load when the cluster starts), the calls that are safe to repeat are repeated until that
patience is spent, and what could not start is said in one sentence (UserError), never a
traceback."""
from __future__ import annotations

import logging
import os
import time
from typing import Callable

from cluster.errors import UserError

log = logging.getLogger("loraretriever.up")

PATIENCE_ENV = "LORARETRIEVER_STARTUP_TIMEOUT_S"
IDLE_PATIENCE_S = 120.0  # a cold start (base model, embedder export) on idle cores takes 15-60 s here
MAX_PATIENCE_S = 900.0


def startup_patience_s(cores: int | None = None, load: float | None = None) -> float:
    """Seconds the proxy and the replicas get to start: LORARETRIEVER_STARTUP_TIMEOUT_S if set,
    else 120 s on idle cores, stretched by the run queue per core (1-minute load average / cores:
    a second CPU-bound job on 2 cores halves what each gets), at most 900 s."""
    if os.environ.get(PATIENCE_ENV):
        try:
            value = float(os.environ[PATIENCE_ENV])
        except ValueError:
            raise UserError(f"{PATIENCE_ENV}={os.environ[PATIENCE_ENV]!r} is not a number of seconds") from None
        if value <= 0:
            raise UserError(f"{PATIENCE_ENV} must be positive, not {value}")
        return value
    cores = cores or os.cpu_count() or 1
    load = current_load() if load is None else load
    return min(MAX_PATIENCE_S, IDLE_PATIENCE_S * max(1.0, 1.0 + load / cores))


def current_load() -> float:
    """The larger of the 1-minute load average and the processes runnable right now (less this
    one): the average trails by a minute, so jobs that started just before `up` count too."""
    try:
        running = int(open("/proc/loadavg").read().split()[3].split("/")[0]) - 1
    except (OSError, IndexError, ValueError):  # no /proc (macOS): the average alone
        running = 0
    return max(os.getloadavg()[0], float(running))


def serve_timeouts_env(patience_s: float) -> dict[str, str]:
    """Serve's own proxy checks, read by its controller at start (they travel in Ray's env): the
    first readiness check may take a quarter of the patience instead of 5 s, a health check a
    tenth instead of 10 s, so a busy machine's slow proxy is waited for, not killed."""
    return {
        "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": f"{max(5.0, patience_s / 4):.0f}",
        "RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S": f"{max(10.0, patience_s / 10):.0f}",
    }


def retried(what: str, call: Callable[[], object], deadline: float, fix: str):
    """call() until it returns, while the error is one of Ray's 'an actor died or did not answer in
    time' (safe to repeat: `serve.start` and `serve.run` converge on the same state) and time is left;
    then one sentence naming `what` and `fix`."""
    from ray.exceptions import GetTimeoutError, RayActorError

    attempt = 0
    while True:
        try:
            return call()
        except (RayActorError, GetTimeoutError, TimeoutError) as err:
            attempt += 1
            reason = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
            if time.monotonic() + 2 >= deadline:
                raise UserError(f"{what} did not start in time ({type(err).__name__}: {reason}); {fix}") from err
            wait = min(2.0 ** attempt, 15.0, max(0.0, deadline - time.monotonic() - 2))
            log.warning("%s did not start (%s: %s); trying again in %.0f s (attempt %d)",
                        what, type(err).__name__, reason, wait, attempt + 1)
            time.sleep(wait)


def not_ready(app_name: str) -> str:
    """Which deployments of the app are not running, and why, as Serve reports them."""
    from ray import serve

    try:
        app = serve.status().applications.get(app_name)
    except Exception as err:  # the controller itself is gone
        return f"Serve's controller does not answer ({type(err).__name__})"
    if app is None:
        return f"the application {app_name!r} is not deployed"
    parts = [f"{name} is {d.status.value}" + (f" ({d.message.strip().splitlines()[0][:160]})" if d.message else "")
             for name, d in app.deployments.items() if d.status.value != "HEALTHY"]
    return ", ".join(parts) or f"the application is {app.status.value}"
