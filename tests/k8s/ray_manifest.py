"""Where k8s/ lives, and reading a rendered overlay: its objects, the RayService's groups,
pod templates and Serve config."""
from __future__ import annotations

from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
KUSTOMIZATIONS = {"base": REPO / "k8s" / "base", "dev": REPO / "k8s" / "overlays" / "dev",
                  "gpu": REPO / "k8s" / "overlays" / "gpu"}


def one(objects: list[dict], kind: str, name: str | None = None) -> dict:
    found = [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def ray_groups(rayservice: dict) -> dict[str, dict]:
    """'head' and each worker groupName -> its group spec."""
    cluster = rayservice["spec"]["rayClusterConfig"]
    return {"head": cluster["headGroupSpec"], **{g["groupName"]: g for g in cluster.get("workerGroupSpecs", [])}}


def pod_templates(objects: list[dict]) -> dict[str, dict]:
    """'<Kind>/<name>[/<group>]' -> pod template, for workloads and the RayService's groups."""
    out = {}
    for obj in objects:
        if obj["kind"] in ("StatefulSet", "Deployment"):
            out[f"{obj['kind']}/{obj['metadata']['name']}"] = obj["spec"]["template"]
        elif obj["kind"] == "RayService":
            for group, spec in ray_groups(obj).items():
                out[f"RayService/{obj['metadata']['name']}/{group}"] = spec["template"]
    return out


def serve_config(rayservice: dict) -> dict:
    return yaml.safe_load(rayservice["spec"]["serveConfigV2"])


def app_args(rayservice: dict) -> dict:
    (application,) = serve_config(rayservice)["applications"]
    return application["args"]
