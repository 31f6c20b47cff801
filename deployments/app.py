"""The Serve application: `serve run deployments.app:build_app` or KubeRay's serveConfigV2.

`build_app` validates its args with services.config.AppConfig (the same model that checks
the YAML of `loraretriever up` and the args in k8s/), then wires the three deployments."""
from __future__ import annotations

from ray.serve import Application
from ray.serve.config import RequestRouterConfig

from services.config import AppConfig, DeploymentConfig
from deployments.composer import Composer
from deployments.ingress import Ingress
from deployments.retriever import Retriever
from services.offline import OFFLINE_ENV

ROUTER_CLASS = "deployments.router:AdapterAffinityRouter"


def deployment_options(dep: DeploymentConfig) -> dict:
    return {
        "autoscaling_config": dep.autoscaling.to_serve(),
        # Offline wherever the replica runs (local Ray, KubeRay, a user's own Ray cluster).
        "ray_actor_options": {"num_cpus": dep.num_cpus, "num_gpus": dep.num_gpus,
                              **({"resources": dict(dep.resources)} if dep.resources else {}),
                              "runtime_env": {"env_vars": OFFLINE_ENV}},
        "max_ongoing_requests": dep.max_ongoing_requests,
    }


def build_app(args: dict | AppConfig | None = None) -> Application:
    cfg = args if isinstance(args, AppConfig) else AppConfig.model_validate(args or {})
    config = cfg.model_dump(mode="json")
    deps = cfg.deployments
    # Routing stats (resident adapters, placement heartbeat, stale-version sync) are collected
    # with either router; only the replica choice differs.
    router = {"request_router_class": ROUTER_CLASS} if deps.composer_router == "adapter_affinity" else {}
    composer = Composer.options(
        **deployment_options(deps.composer),
        request_router_config=RequestRouterConfig(
            **router, request_routing_stats_period_s=2.0, request_routing_stats_timeout_s=5.0
        ),
    ).bind(config)
    retriever = Retriever.options(**deployment_options(deps.retriever)).bind(config)
    return Ingress.options(**deployment_options(deps.ingress)).bind(config, retriever, composer)
