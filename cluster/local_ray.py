"""Start Ray on this machine so that it touches loopback only.

Ray otherwise binds the machine's outward address and its dashboard probes a cloud
metadata address; both are off-limits for local runs and tests.
"""
from __future__ import annotations

import os
import re
import sys
from pathlib import Path

from services.offline import OFFLINE_ENV

RAY_HOME = Path(os.environ.get("LORARETRIEVER_HOME", Path.home() / ".cache" / "loraretriever")) / "ray-home"

# Read by Ray (and the model libraries) when first imported: set them before any `import ray`
# (cli.main, the benchmarks, tests).
LOOPBACK_IMPORT_ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # single-node mode: 127.0.0.1, not the outward address
    "RAY_USAGE_STATS_ENABLED": "0",
    **OFFLINE_ENV,
}


# Names of variables that hold secrets (admin key, Redis password, Qdrant API key): never put in
# runtime_env, whose env_vars Ray writes in clear to logs/runtime_env_agent.log.
SECRET_NAME = re.compile(r"KEY|PASSWORD|TOKEN|SECRET", re.IGNORECASE)


def loopback_ray_env() -> dict[str, str]:
    """Environment a local Ray needs, with the LORARETRIEVER_* variables of this process (admin
    key, home) so replicas see what the driver sees: workers inherit it from the raylet, and the
    non-secret part also goes in runtime_env."""
    RAY_HOME.mkdir(parents=True, exist_ok=True)
    (RAY_HOME / "ray_bootstrap_config.yaml").write_text("provider: {type: local}\n")
    own = {k: v for k, v in os.environ.items() if k.startswith("LORARETRIEVER_")}
    return own | LOOPBACK_IMPORT_ENV | {
        "HOME": str(RAY_HOME),
        "LORARETRIEVER_HOME": str(RAY_HOME.parent),  # replicas find the demo zoo under the real home
        "TOKENIZERS_PARALLELISM": "false",
    }


def init_local_ray(num_cpus: int = 2, patience_s: float | None = None, **kwargs):
    """ray.init on 127.0.0.1 with no dashboard; idempotent. patience_s: how long Serve's proxy may
    take to start (cluster/serve_start.py; default: what suits this machine now)."""
    import ray

    from cluster.serve_start import serve_timeouts_env, startup_patience_s

    serve_env = serve_timeouts_env(patience_s or startup_patience_s())
    env = loopback_ray_env() | {k: os.environ.get(k, v) for k, v in serve_env.items()}
    if "ray._private.ray_constants" in sys.modules and os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER") != "0":
        raise RuntimeError("Ray was imported before LOOPBACK_IMPORT_ENV was set; it would bind the outward address")
    os.environ.update(env)  # the raylet ray.init starts inherits this, and its workers from it
    if ray.is_initialized():
        return ray
    ray.init(
        num_cpus=num_cpus,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        runtime_env={"env_vars": {k: v for k, v in env.items() if not SECRET_NAME.search(k)}},
        log_to_driver=kwargs.pop("log_to_driver", False),
        **kwargs,
    )
    return ray
