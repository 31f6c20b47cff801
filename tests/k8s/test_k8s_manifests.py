"""Every rendered object validates against the Kubernetes schemas (offline, strict), the
RayService against KubeRay's structure, and every container has sizes and probes."""
from __future__ import annotations

import copy
import shutil
import subprocess

import kubernetes_validate
import pytest
import yaml

from kustomize_render import KustomizeError, json_patch_op, render
from ray_manifest import KUSTOMIZATIONS, one, pod_templates, ray_groups

K8S_VERSION = "1.33.0"  # kubernetes-validate ships this schema set; KubeRay 1.4 supports it

# KubeRay ray.io/v1 fields k8s/ may use; anything else is a typo KubeRay would ignore.
RAYSERVICE_SPEC = {"serveConfigV2", "rayClusterConfig", "upgradeStrategy", "excludeHeadPodFromServeSvc"}
RAYCLUSTER_SPEC = {"rayVersion", "enableInTreeAutoscaling", "autoscalerOptions", "headGroupSpec", "workerGroupSpecs"}
HEAD_GROUP = {"rayStartParams", "template", "serviceType"}
WORKER_GROUP = {"groupName", "replicas", "minReplicas", "maxReplicas", "rayStartParams", "template"}
AUTOSCALER_OPTIONS = {"resources", "idleTimeoutSeconds", "upscalingMode", "image", "env"}


def validate_rayservice(obj: dict) -> None:
    """KubeRay's RayService is not a built-in kind: check its structure here, and each pod
    template (and the autoscaler's resources) as core/v1 objects."""
    if obj.get("apiVersion") != "ray.io/v1":
        raise ValueError(f"RayService apiVersion must be ray.io/v1, got {obj.get('apiVersion')!r}")
    spec = obj["spec"]
    _fields("RayService.spec", spec, RAYSERVICE_SPEC, required={"serveConfigV2", "rayClusterConfig"})
    if not isinstance(spec["serveConfigV2"], str):
        raise ValueError("RayService.spec.serveConfigV2 must be a YAML string")
    if spec.get("upgradeStrategy", {}).get("type", "NewCluster") not in ("NewCluster", "None"):
        raise ValueError(f"unknown upgradeStrategy {spec['upgradeStrategy']}")
    cluster = spec["rayClusterConfig"]
    _fields("rayClusterConfig", cluster, RAYCLUSTER_SPEC, required={"rayVersion", "headGroupSpec"})
    options = cluster.get("autoscalerOptions", {})
    _fields("autoscalerOptions", options, AUTOSCALER_OPTIONS, required={"resources"})
    _validate_core({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "autoscaler"},
                    "template": {"spec": {"containers": [{"name": "autoscaler", "resources": options["resources"]}]}}})
    _fields("headGroupSpec", cluster["headGroupSpec"], HEAD_GROUP, required={"rayStartParams", "template"})
    for group in cluster.get("workerGroupSpecs", []):
        _fields(f"workerGroupSpecs[{group.get('groupName')}]", group, WORKER_GROUP, required=WORKER_GROUP)
        if not group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]:
            raise ValueError(f"worker group {group['groupName']}: need minReplicas <= replicas <= maxReplicas")
    for name, group in ray_groups(obj).items():
        params = group["rayStartParams"]
        if not all(isinstance(v, str) for v in params.values()):
            raise ValueError(f"{name} rayStartParams values must be strings: {params}")
        _validate_core({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": name}, "template": group["template"]})


def _fields(where: str, mapping: dict, allowed: set[str], required: set[str]) -> None:
    if set(mapping) - allowed:
        raise ValueError(f"{where}: unknown fields {sorted(set(mapping) - allowed)}")
    if required - set(mapping):
        raise ValueError(f"{where}: missing fields {sorted(required - set(mapping))}")


def _validate_core(obj: dict) -> None:
    kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def validate(obj: dict) -> None:
    if obj["kind"] == "RayService":
        validate_rayservice(obj)
    else:
        _validate_core(obj)


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_every_object_validates_strictly(rendered, name):
    kinds = set()
    for obj in rendered[name]:
        validate(obj)
        kinds.add(obj["kind"])
    assert {"RayService", "StatefulSet", "Service", "PersistentVolumeClaim", "PodDisruptionBudget",
            "NetworkPolicy"} <= kinds


def test_strict_validation_rejects_unknown_fields(rendered):
    statefulset = copy.deepcopy(one(rendered["dev"], "StatefulSet", "loraretriever-redis"))
    statefulset["spec"]["template"]["spec"]["containers"][0]["livenesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError, match="livenesProbe"):
        validate(statefulset)


@pytest.mark.parametrize(
    "path, value, message",
    [
        ("/apiVersion", "ray.io/v1alpha1", "ray.io/v1"),
        ("/spec/serveConfigv2", "x", "unknown fields"),
        ("/spec/rayClusterConfig/workerGroupSpecs/0/replicas", 9, "minReplicas <= replicas"),
        ("/spec/rayClusterConfig/headGroupSpec/rayStartParams/num-cpus", 0, "must be strings"),
        ("/spec/rayClusterConfig/headGroupSpec/template/spec/containers/0/resource", {}, "resource"),
    ],
)
def test_rayservice_structure_is_checked(rendered, path, value, message):
    rayservice = copy.deepcopy(one(rendered["gpu"], "RayService"))
    json_patch_op(rayservice, {"op": "add", "path": path, "value": value})
    with pytest.raises((ValueError, kubernetes_validate.ValidationError), match=message):
        validate(rayservice)


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_every_container_has_requests_limits_and_probes(rendered, name):
    templates = pod_templates(rendered[name])
    assert len(templates) >= 4  # redis, qdrant, ray head, ray cpu workers
    for where, template in templates.items():
        for container in template["spec"]["containers"]:
            resources = container["resources"]
            assert {"cpu", "memory"} <= set(resources["requests"]), where
            assert {"cpu", "memory"} <= set(resources["limits"]), where
            assert "readinessProbe" in container and "livenessProbe" in container, where


@pytest.mark.parametrize("name", ["dev", "gpu"])
def test_ray_workers_probe_the_app_health_routes(rendered, name):
    rayservice = one(rendered[name], "RayService")
    for group, spec in ray_groups(rayservice).items():
        if group == "head":
            continue  # serves no requests (num-cpus 0, excluded from the serve Service)
        (container,) = spec["template"]["spec"]["containers"]
        assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
        assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
        assert container["startupProbe"]["httpGet"]["path"] == "/healthz"


def test_renderer_refuses_what_it_does_not_implement(tmp_path):
    (tmp_path / "kustomization.yaml").write_text("resources: []\ncommonLabels: {a: b}\n")
    with pytest.raises(KustomizeError, match="commonLabels"):
        render(tmp_path)


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="no kubectl on PATH to compare the renderer with")
@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_render_matches_kubectl(rendered, name):
    out = subprocess.run(["kubectl", "kustomize", str(KUSTOMIZATIONS[name])],
                         capture_output=True, text=True, timeout=60, check=True).stdout
    by_id = lambda objs: {(o["kind"], o["metadata"]["name"]): o for o in objs}  # noqa: E731
    assert by_id(yaml.safe_load_all(out)) == by_id(rendered[name])
