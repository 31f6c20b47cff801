"""The RayService's serveConfigV2 is a valid Ray Serve config whose args the project's own
AppConfig accepts, and it names code that exists. Ray Serve's schema ignores unknown keys,
so a strict key check runs on top of it."""
from __future__ import annotations

import ast
import copy
import typing

import pydantic
import pytest
from ray.serve.schema import ServeDeploySchema

from services.config import AppConfig
from ray_manifest import REPO, app_args, one, serve_config

OVERLAYS = ["base", "dev", "gpu"]


def unknown_serve_keys(model: type[pydantic.BaseModel], data: dict, where: str = "serveConfigV2") -> list[str]:
    """Keys of `data` that `model` (a Serve schema) does not define, at any depth except args."""
    found = []
    for key, value in data.items():
        field = model.model_fields.get(key)
        if field is None:
            found.append(f"{where}.{key}")
            continue
        nested = _schema_in(field.annotation)
        if nested is None or key == "args":
            continue
        items = value if isinstance(value, list) else [value]
        for i, item in enumerate(items):
            if isinstance(item, dict):
                found += unknown_serve_keys(nested, item, f"{where}.{key}[{i}]" if isinstance(value, list) else f"{where}.{key}")
    return found


def _schema_in(annotation) -> type[pydantic.BaseModel] | None:
    """The pydantic model inside Optional[...] / list[...] / the annotation itself."""
    if isinstance(annotation, type) and issubclass(annotation, pydantic.BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        model = _schema_in(arg)
        if model is not None:
            return model
    return None


def validate_serve_config(config: dict) -> AppConfig:
    """Ray Serve's schema, then the strict key check, then the app's own args model."""
    ServeDeploySchema.model_validate(config)
    unknown = unknown_serve_keys(ServeDeploySchema, config)
    if unknown:
        raise ValueError(f"unknown Serve config keys: {unknown}")
    (application,) = config["applications"]
    return AppConfig.model_validate(application["args"])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_serve_config_validates(rendered, overlay):
    rayservice = one(rendered[overlay], "RayService")
    config = serve_config(rayservice)
    cfg = validate_serve_config(config)
    (application,) = config["applications"]
    assert (application["name"], application["route_prefix"], application["import_path"]) == (
        "loraretriever", "/", "deployments.app:build_app")
    assert cfg.redis.start_local is False and cfg.qdrant.url is not None  # cluster services, not embedded
    assert config["http_options"]["port"] == cfg.server.port


def test_gpu_overlay_puts_composers_on_gpus(rendered):
    cfg = AppConfig.model_validate(app_args(one(rendered["gpu"], "RayService")))
    assert cfg.deployments.composer.num_gpus == 1 and cfg.base_model.device == "cuda"
    assert cfg.deployments.ingress.num_gpus == cfg.deployments.retriever.num_gpus == 0
    dev = AppConfig.model_validate(app_args(one(rendered["dev"], "RayService")))
    assert dev.deployments.composer.num_gpus == 0 and dev.base_model.device == "cpu"


@pytest.mark.parametrize(
    "section, key",
    [("redis", "pasword_env"), ("deployments", "router"), (None, "adapter_pool")],
)
def test_unknown_args_key_is_rejected(rendered, section, key):
    config = serve_config(one(rendered["gpu"], "RayService"))
    args = config["applications"][0]["args"]
    (args[section] if section else args)[key] = "x"
    with pytest.raises(pydantic.ValidationError, match=key):
        validate_serve_config(config)


@pytest.mark.parametrize(
    "mutate, key",
    [
        (lambda c: c.update(proxy_locaton="EveryNode"), "serveConfigV2.proxy_locaton"),
        (lambda c: c["http_options"].update(prot=8000), "serveConfigV2.http_options.prot"),
        (lambda c: c["applications"][0].update(improt_path="x:y"), "serveConfigV2.applications[0].improt_path"),
        (lambda c: c["applications"][0].update(deployments=[{"name": "Composer", "num_replica": 2}]),
         "serveConfigV2.applications[0].deployments[0].num_replica"),
    ],
)
def test_unknown_serve_key_is_rejected(rendered, mutate, key):
    config = copy.deepcopy(serve_config(one(rendered["dev"], "RayService")))
    mutate(config)
    ServeDeploySchema.model_validate(config)  # Ray Serve alone would accept the typo
    with pytest.raises(ValueError, match=key.replace("[", r"\[").replace("]", r"\]")):
        validate_serve_config(config)


def _module(relative: str) -> ast.Module:
    return ast.parse((REPO / relative).read_text())


def test_import_path_and_deployment_names_exist():
    """The code the config names, read statically: importing it needs the engines' packages."""
    module, attr = "deployments.app:build_app".split(":")
    functions = {n.name for n in _module(module.replace(".", "/") + ".py").body if isinstance(n, ast.FunctionDef)}
    assert attr in functions
    names = set()
    for path in (REPO / "deployments").glob("*.py"):
        for call in ast.walk(ast.parse(path.read_text())):
            if isinstance(call, ast.Call) and ast.unparse(call.func) == "serve.deployment":
                names |= {kw.value.value for kw in call.keywords if kw.arg == "name"}
    assert {"Ingress", "Retriever", "Composer"} <= names


def test_probe_paths_are_ingress_routes(rendered):
    routes = {
        dec.args[0].value
        for node in ast.walk(_module("deployments/ingress.py"))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        for dec in node.decorator_list
        if isinstance(dec, ast.Call) and ast.unparse(dec.func).endswith(".get") and dec.args
    }
    rayservice = one(rendered["gpu"], "RayService")
    probed = {
        probe["httpGet"]["path"]
        for group in rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"]
        for container in group["template"]["spec"]["containers"]
        for probe in (container["readinessProbe"], container["livenessProbe"], container["startupProbe"])
    }
    assert probed == {"/readyz", "/healthz"} and probed <= routes

