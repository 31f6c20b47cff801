"""Image, ports, env names, Secrets, volumes and selectors agree across the Dockerfile, the
manifests, the Serve args, pyproject.toml and docs/kubernetes.md."""
from __future__ import annotations

import json
import re
import tomllib
from urllib.parse import urlparse

import pytest
import ray

from services.config import AppConfig
from ray_manifest import REPO, app_args, one, pod_templates, ray_groups, serve_config

IMAGE_REPO = "ghcr.io/loraretriever/loraretriever"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
VERSION = PYPROJECT["project"]["version"]
DOCKERFILE = (REPO / "Dockerfile").read_text()
DOCS = (REPO / "docs" / "kubernetes.md").read_text()
VARIANTS = {"dev": "cpu", "gpu": "cuda"}


def ray_containers(objects: list[dict]) -> dict[str, dict]:
    rayservice = one(objects, "RayService")
    return {group: spec["template"]["spec"]["containers"][0] for group, spec in ray_groups(rayservice).items()}


def config(objects: list[dict]) -> AppConfig:
    return AppConfig.model_validate(app_args(one(objects, "RayService")))


def matches(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector["matchLabels"].items())


def secret_ref(container: dict, env_name: str) -> tuple[str, str]:
    (var,) = [e for e in container["env"] if e["name"] == env_name]
    ref = var["valueFrom"]["secretKeyRef"]
    return ref["name"], ref["key"]


@pytest.mark.parametrize("overlay", VARIANTS)
def test_image_tags_agree_with_pyproject_dockerfile_and_docs(rendered, overlay):
    tag = f"{VERSION}-{VARIANTS[overlay]}"
    images = {c["image"] for c in ray_containers(rendered[overlay]).values()}
    assert images == {f"{IMAGE_REPO}:{tag}"}
    build_arg = "" if VARIANTS[overlay] == "cpu" else f"--build-arg VARIANT={VARIANTS[overlay]} "
    command = f"docker build {build_arg}-t {IMAGE_REPO}:{tag} ."
    assert command in DOCKERFILE and command in DOCS
    assert f"{VARIANTS[overlay]})" in DOCKERFILE  # the variant is a case of the build's RUN


def test_ray_version_matches_the_pinned_ray():
    pins = [d for d in PYPROJECT["project"]["dependencies"] if d.startswith("ray[")]
    (pin,) = pins
    pinned = pin.split("==")[1]
    assert pinned == ray.__version__
    for path in ("k8s/base/rayservice.yaml",):
        assert f'rayVersion: "{pinned}"' in (REPO / path).read_text()
    assert f"Ray {pinned}" in DOCKERFILE and f"Ray {pinned}" in DOCS


@pytest.mark.parametrize("overlay", VARIANTS)
def test_ports_agree(rendered, overlay):
    objects = rendered[overlay]
    cfg = config(objects)
    assert serve_config(one(objects, "RayService"))["http_options"]["port"] == cfg.server.port
    exposed = {int(p) for p in re.search(r"^EXPOSE (.+)$", DOCKERFILE, re.M).group(1).split()}
    for group, container in ray_containers(objects).items():
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports["serve"] == cfg.server.port, group  # KubeRay's serve Service targets the port named serve
        params = ray_groups(one(objects, "RayService"))[group]["rayStartParams"]
        assert int(params["metrics-export-port"]) == ports["metrics"], group
        assert set(ports.values()) <= exposed, group
        for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
            if probe in container:
                assert container[probe]["httpGet"]["port"] in ports, (group, probe)


@pytest.mark.parametrize("overlay", VARIANTS)
@pytest.mark.parametrize("service, field", [("loraretriever-redis", "redis"), ("loraretriever-qdrant", "qdrant")])
def test_service_urls_point_at_the_services(rendered, overlay, service, field):
    objects = rendered[overlay]
    url = urlparse(getattr(config(objects), field).url)
    svc = one(objects, "Service", service)
    assert url.hostname == svc["metadata"]["name"]
    (port,) = [p for p in svc["spec"]["ports"] if p["port"] == url.port]
    pod = one(objects, "StatefulSet", service)["spec"]["template"]
    container_ports = {p["name"]: p["containerPort"] for c in pod["spec"]["containers"] for p in c["ports"]}
    assert container_ports[port["targetPort"]] == url.port
    assert matches({"matchLabels": svc["spec"]["selector"]}, pod["metadata"]["labels"])


@pytest.mark.parametrize("overlay", VARIANTS)
def test_secret_env_names_agree(rendered, overlay):
    objects = rendered[overlay]
    cfg = config(objects)
    refs = set()
    for group, container in ray_containers(objects).items():
        refs.add(secret_ref(container, cfg.redis.password_env))
        refs.add(secret_ref(container, cfg.server.admin_key_env))
        if cfg.adapter_store.uri:  # adapters in object storage: every Ray pod reaches the bucket
            refs.update(secret_ref(container, env) for env in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"))
    redis = one(objects, "StatefulSet", "loraretriever-redis")["spec"]["template"]["spec"]["containers"][0]
    assert secret_ref(redis, "REDIS_PASSWORD") in refs
    for name, key in refs:
        assert re.search(rf"kubectl -n loraretriever create secret generic {name}( --from-literal=\S+)* "
                         rf"--from-literal={key}=", DOCS), (name, key)
        if overlay == "dev":
            assert key in one(objects, "Secret", name)["stringData"]
    assert len(refs) == (4 if cfg.adapter_store.uri else 2)


@pytest.mark.parametrize("overlay", VARIANTS)
def test_custom_resources_keep_ingress_and_retrievers_off_gpu_nodes(rendered, overlay):
    """Each deployment's `resources` are offered by some group (rayStartParams resources), the
    Ingress and Retrievers never by a group with GPUs, and on the gpu overlay Composers only there."""
    cfg = config(rendered[overlay])
    groups = ray_groups(one(rendered[overlay], "RayService"))
    offered = {g: json.loads(json.loads(spec["rayStartParams"].get("resources", '"{}"'))) for g, spec in groups.items()}
    with_gpus = {g for g, spec in groups.items() if spec["rayStartParams"].get("num-gpus", "0") != "0"}
    hosts = {}
    for name in ("ingress", "retriever", "composer"):
        wanted = getattr(cfg.deployments, name).resources
        assert wanted, f"{name} names no custom resource: it could land on any node"
        hosts[name] = {g for g, res in offered.items() if all(res.get(k, 0) >= v for k, v in wanted.items())}
        assert hosts[name], f"no group offers {wanted} for {name}"
    assert not (hosts["ingress"] | hosts["retriever"]) & with_gpus
    assert hosts["composer"] == (with_gpus or hosts["composer"])


@pytest.mark.parametrize("overlay", VARIANTS)
def test_the_node_cache_is_node_local(rendered, overlay):
    """adapter_store.cache_path sits on an emptyDir of every Ray pod, never on the shared claim."""
    cfg = config(rendered[overlay])
    for group, spec in ray_groups(one(rendered[overlay], "RayService")).items():
        pod = spec["template"]["spec"]
        (mount,) = [m for m in pod["containers"][0]["volumeMounts"] if cfg.adapter_store.cache_path.startswith(
            m["mountPath"].rstrip("/") + "/") or cfg.adapter_store.cache_path == m["mountPath"]]
        (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
        assert "emptyDir" in volume and volume["emptyDir"].get("medium") != "Memory", group


@pytest.mark.parametrize("overlay", VARIANTS)
def test_data_paths_are_on_the_shared_volume(rendered, overlay):
    objects = rendered[overlay]
    cfg = config(objects)
    claim = one(objects, "PersistentVolumeClaim")["metadata"]["name"]
    for group, spec in ray_groups(one(objects, "RayService")).items():
        pod = spec["template"]["spec"]
        (volume,) = [v["name"] for v in pod["volumes"] if v.get("persistentVolumeClaim", {}).get("claimName") == claim]
        (mount,) = [m["mountPath"] for m in pod["containers"][0]["volumeMounts"] if m["name"] == volume]
        for path in (cfg.adapter_store.path, cfg.base_model.path):
            assert path.startswith(mount.rstrip("/") + "/"), (group, path)


@pytest.mark.parametrize("overlay", VARIANTS)
def test_network_policies_admit_only_ray_pods(rendered, overlay):
    objects = rendered[overlay]
    templates = pod_templates(objects)
    ray_pods = {k for k in templates if k.startswith("RayService/")}
    policies = [o for o in objects if o["kind"] == "NetworkPolicy"]
    protected = set()
    for policy in policies:
        targets = {k for k, t in templates.items() if matches(policy["spec"]["podSelector"], t["metadata"]["labels"])}
        (target,) = targets  # one StatefulSet's pods each
        protected.add(target)
        container_ports = {p["containerPort"] for c in templates[target]["spec"]["containers"] for p in c["ports"]}
        (rule,) = policy["spec"]["ingress"]
        assert {p["port"] for p in rule["ports"]} == container_ports
        admitted = {k for k, t in templates.items() for peer in rule["from"]
                    if matches(peer["podSelector"], t["metadata"]["labels"])}
        assert admitted == ray_pods
    assert protected == {"StatefulSet/loraretriever-redis", "StatefulSet/loraretriever-qdrant"}


@pytest.mark.parametrize("overlay", VARIANTS)
def test_every_disruption_budget_covers_pods(rendered, overlay):
    templates = pod_templates(rendered[overlay])
    budgets = [o for o in rendered[overlay] if o["kind"] == "PodDisruptionBudget"]
    covered = set()
    for budget in budgets:
        hits = {k for k, t in templates.items() if matches(budget["spec"]["selector"], t["metadata"]["labels"])}
        assert len(hits) == 1, budget["metadata"]["name"]
        covered |= hits
    assert covered == set(templates)


def test_gpus_only_in_the_gpu_overlay(rendered):
    gpu_limits = {
        name: {g: c["resources"]["limits"].get("nvidia.com/gpu", 0) for g, c in ray_containers(rendered[name]).items()}
        for name in VARIANTS
    }
    assert set(gpu_limits["dev"].values()) == {0}
    assert gpu_limits["gpu"] == {"head": 0, "cpu": 0, "gpu": 1}
    assert config(rendered["gpu"]).deployments.composer.num_gpus == gpu_limits["gpu"]["gpu"]
