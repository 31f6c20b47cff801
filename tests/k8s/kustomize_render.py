"""A small kustomize: renders k8s/ overlays in Python, offline.

Debian's kubernetes-client (kubectl 1.20, kustomize v2.0.3) cannot be installed next to
another kubectl and predates the `patches` field, so the tests render with this instead.
It implements exactly the kustomize features k8s/ uses (resources, namespace, images,
JSON 6902 patches with a target) and refuses any other field, so a manifest change that
needs more fails loudly here instead of rendering differently from `kubectl kustomize`;
test_render_matches_kubectl checks the two agree wherever a kubectl is installed.
"""
from __future__ import annotations

import copy
from pathlib import Path

import yaml

SUPPORTED_FIELDS = {"apiVersion", "kind", "resources", "namespace", "images", "patches"}


class KustomizeError(ValueError):
    """A kustomization this renderer cannot render, or a patch that does not apply."""


def render(directory: str | Path) -> list[dict]:
    """The objects `kubectl kustomize DIRECTORY` prints, in file order."""
    directory = Path(directory)
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unknown = set(kustomization) - SUPPORTED_FIELDS
    if unknown:
        raise KustomizeError(f"{directory}/kustomization.yaml: unsupported fields {sorted(unknown)}")
    objects: list[dict] = []
    for entry in kustomization.get("resources", []):
        path = directory / entry
        if path.is_dir():
            objects.extend(render(path))
        else:
            objects.extend(doc for doc in yaml.safe_load_all(path.read_text()) if doc)
    for patch in kustomization.get("patches", []):
        _apply_patch(objects, directory, patch)
    for image in kustomization.get("images", []):
        for obj in objects:
            _set_images(obj, image)
    if "namespace" in kustomization:
        for obj in objects:
            obj["metadata"]["namespace"] = kustomization["namespace"]
    return objects


def _apply_patch(objects: list[dict], directory: Path, patch: dict) -> None:
    if set(patch) != {"path", "target"}:
        raise KustomizeError(f"{directory}: only patches with 'path' and 'target' are supported, got {sorted(patch)}")
    ops = yaml.safe_load((directory / patch["path"]).read_text())
    if not isinstance(ops, list):
        raise KustomizeError(f"{directory / patch['path']}: only JSON 6902 patches (a list of ops) are supported")
    target = patch["target"]
    matched = [o for o in objects if o["kind"] == target["kind"] and o["metadata"]["name"] == target["name"]]
    if not matched:
        raise KustomizeError(f"{directory / patch['path']}: no {target['kind']} named {target['name']}")
    for obj in matched:
        for op in ops:
            json_patch_op(obj, op)


def json_patch_op(doc: dict, op: dict) -> None:
    """Apply one RFC 6902 add, replace or remove operation in place."""
    keys = [k.replace("~1", "/").replace("~0", "~") for k in op["path"].lstrip("/").split("/")]
    parent = doc
    for key in keys[:-1]:
        parent = parent[int(key)] if isinstance(parent, list) else parent[key]
    last = keys[-1]
    kind = op["op"]
    if kind not in ("add", "replace", "remove"):
        raise KustomizeError(f"unsupported JSON patch op {kind!r} at {op['path']}")
    if isinstance(parent, list):
        if kind == "add":
            parent.insert(len(parent) if last == "-" else int(last), copy.deepcopy(op["value"]))
            return
        index = int(last)
        if not 0 <= index < len(parent):
            raise KustomizeError(f"JSON patch path {op['path']} is past the end of a list of {len(parent)}")
        if kind == "remove":
            del parent[index]
        else:
            parent[index] = copy.deepcopy(op["value"])
        return
    if kind != "add" and last not in parent:
        raise KustomizeError(f"JSON patch path {op['path']} does not exist")
    if kind == "remove":
        del parent[last]
    else:
        parent[last] = copy.deepcopy(op["value"])


def _set_images(node, image: dict) -> None:
    """kustomize's images transformer: every containers/initContainers image, at any depth."""
    if isinstance(node, list):
        for item in node:
            _set_images(item, image)
        return
    if not isinstance(node, dict):
        return
    for key, value in node.items():
        if key in ("containers", "initContainers") and isinstance(value, list):
            for container in value:
                name, tag = split_image(container["image"])
                if name == image["name"]:
                    tag = image.get("newTag", tag)
                    container["image"] = image.get("newName", name) + (f":{tag}" if tag else "")
        else:
            _set_images(value, image)


def split_image(ref: str) -> tuple[str, str | None]:
    """'registry:5000/repo/name:tag' -> ('registry:5000/repo/name', 'tag'); no tag -> None."""
    slash = ref.rfind("/")
    colon = ref.rfind(":")
    if colon > slash:
        return ref[:colon], ref[colon + 1:]
    return ref, None
