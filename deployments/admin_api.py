# No `from __future__ import annotations`: Serve re-wraps the endpoints and FastAPI must see real types.
"""Operator endpoints (/admin/...): adapter rollout and tenants. A separate admin key,
never a tenant key. Mixed into the Ingress deployment, which supplies registry, tenants,
limiter and the retriever handle."""

import base64
import binascii
import hmac
import os
import tempfile
from pathlib import Path

from fastapi import Request
from pydantic import Field

from deployments.http_app import app
from services.schemas import AdapterCard, Strict
from services.serving.errors import BadRequest, NotFound, ServingError, Unavailable
from services.tenancy.gate import Unauthorized, bearer_token
from services.tenancy.tenants import TenantError, TenantLimits

ALLOWED_UPLOAD_FILES = {"adapter_config.json", "adapter_model.safetensors"}
MAX_UPLOAD_BYTES = 512 * 1024 * 1024


class Forbidden(ServingError):
    status = 403
    type = "permission_error"


class AdapterUpload(Strict):
    name: str = Field(min_length=1, max_length=128)
    card: AdapterCard
    path: str | None = Field(None, description="a folder the cluster can read (e.g. on the adapter volume)")
    files: dict[str, str] | None = Field(None, description="file name -> base64 content (adapter_config.json, adapter_model.safetensors)")
    tenant: str | None = Field(None, description="owner; with visibility=private only that tenant sees it")
    visibility: str = Field("shared", pattern="^(shared|private)$")
    activate: bool = Field(True, description="make this version active at once (else staged: promote later)")


class VersionRef(Strict):
    version: str = Field(min_length=1, max_length=64)


class CanaryRequest(VersionRef):
    percent: float = Field(ge=0, le=100)


class TenantCreate(Strict):
    name: str
    limits: TenantLimits = Field(default_factory=TenantLimits)


def registry_error(err: Exception) -> ServingError:
    """Registry exceptions -> HTTP errors with the registry's own message."""
    from services.registry.registry import AdapterNotFound, RegistryUnavailable

    if isinstance(err, AdapterNotFound):
        return NotFound(str(err))
    if isinstance(err, RegistryUnavailable):
        return Unavailable(str(err))
    return BadRequest(str(err))


class AdminRoutes:
    """Needs self.cfg, self.registry, self.tenants, self.limiter, self.retriever."""

    def _require_admin(self, request: Request) -> str:
        expected = os.environ.get(self.cfg.server.admin_key_env)
        if not expected:
            raise Forbidden(f"the admin API is disabled: set {self.cfg.server.admin_key_env} on the cluster")
        given = bearer_token(request.headers.get("authorization"))
        if given is None:
            raise Unauthorized("missing admin key: send 'Authorization: Bearer <admin key>'")
        if not hmac.compare_digest(given.encode(), expected.encode()):
            raise Forbidden("this endpoint needs the admin key")
        return "admin"

    def _registry_call(self, fn, *args, **kwargs):
        from services.registry.registry import RegistryError

        try:
            return fn(*args, **kwargs)
        except RegistryError as err:
            raise registry_error(err) from err

    # ---- adapters ----------------------------------------------------------
    @app.get("/admin/adapters")
    async def admin_list_adapters(self, request: Request) -> dict:
        self._require_admin(request)
        records = self._registry_call(self.registry.snapshot)
        return {"data": [r.model_dump(mode="json") for r in records]}

    @app.get("/admin/adapters/{name}")
    async def admin_show_adapter(self, name: str, request: Request) -> dict:
        self._require_admin(request)
        return self._registry_call(self.registry.get, name).model_dump(mode="json")

    @app.post("/admin/adapters")
    async def admin_add_adapter(self, body: AdapterUpload, request: Request) -> dict:
        actor = self._require_admin(request)
        if (body.path is None) == (body.files is None):
            raise BadRequest("give exactly one of 'path' (a folder the cluster reads) or 'files' (uploaded)")
        if body.visibility == "private" and not body.tenant:
            raise BadRequest("a private adapter needs its owner 'tenant'")
        embeddings = await self.retriever.embed.remote([s.inputs for s in body.card.sample])
        with tempfile.TemporaryDirectory(prefix="lr-upload-") as tmp:
            src = Path(body.path) if body.path else self._unpack_upload(body.files, Path(tmp))
            version = self._registry_call(
                self.registry.add_version, body.name, src, body.card, embeddings, tenant=body.tenant,
                visibility=body.visibility, activate=body.activate, actor=actor)
        return version.model_dump(mode="json", exclude={"card"})

    @staticmethod
    def _unpack_upload(files: dict[str, str], dest: Path) -> Path:
        total = 0
        for fname, content in files.items():
            if fname not in ALLOWED_UPLOAD_FILES:
                raise BadRequest(f"upload file '{fname}' is not allowed; send only {sorted(ALLOWED_UPLOAD_FILES)}")
            try:
                data = base64.b64decode(content, validate=True)
            except (binascii.Error, ValueError) as err:
                raise BadRequest(f"upload file '{fname}' is not valid base64") from err
            total += len(data)
            if total > MAX_UPLOAD_BYTES:
                raise BadRequest(f"upload larger than {MAX_UPLOAD_BYTES // 2**20} MiB")
            (dest / fname).write_bytes(data)
        return dest

    @app.post("/admin/adapters/{name}/promote")
    async def admin_promote(self, name: str, body: VersionRef, request: Request) -> dict:
        actor = self._require_admin(request)
        self._registry_call(self.registry.activate, name, body.version, actor=actor)
        return {"name": name, "active_version": body.version}

    @app.post("/admin/adapters/{name}/canary")
    async def admin_canary(self, name: str, body: CanaryRequest, request: Request) -> dict:
        actor = self._require_admin(request)
        self._registry_call(self.registry.set_canary, name, body.version, body.percent, actor=actor)
        return {"name": name, "canary": body.model_dump()}

    @app.post("/admin/adapters/{name}/rollback")
    async def admin_rollback(self, name: str, request: Request) -> dict:
        actor = self._require_admin(request)
        version = self._registry_call(self.registry.rollback, name, actor=actor)
        return {"name": name, "active_version": version}

    @app.delete("/admin/adapters/{name}")
    async def admin_retire(self, name: str, request: Request) -> dict:
        actor = self._require_admin(request)
        self._registry_call(self.registry.retire, name, actor=actor)
        return {"name": name, "retired": True}

    @app.post("/admin/adapters/{name}/pin")
    async def admin_pin(self, name: str, request: Request) -> dict:
        actor = self._require_admin(request)
        self._registry_call(self.registry.set_pinned, name, True, actor=actor)
        return {"name": name, "pinned": True}

    @app.post("/admin/adapters/{name}/unpin")
    async def admin_unpin(self, name: str, request: Request) -> dict:
        actor = self._require_admin(request)
        self._registry_call(self.registry.set_pinned, name, False, actor=actor)
        return {"name": name, "pinned": False}

    @app.get("/admin/adapters/{name}/history")
    async def admin_history(self, name: str, request: Request) -> dict:
        self._require_admin(request)
        return {"data": self._registry_call(self.registry.history, name)}

    # ---- tenants -----------------------------------------------------------
    @app.post("/admin/tenants")
    async def admin_add_tenant(self, body: TenantCreate, request: Request) -> dict:
        self._require_admin(request)
        try:
            key = self.tenants.add(body.name, body.limits)
        except TenantError as err:
            raise BadRequest(str(err)) from err
        return {"name": body.name, "api_key": key}

    @app.get("/admin/tenants")
    async def admin_list_tenants(self, request: Request) -> dict:
        self._require_admin(request)
        return {"data": [t.model_dump() for t in self.tenants.list()]}

    @app.delete("/admin/tenants/{name}")
    async def admin_revoke_tenant(self, name: str, request: Request) -> dict:
        self._require_admin(request)
        try:
            return {"name": name, "revoked_keys": self.tenants.revoke(name)}
        except TenantError as err:
            raise NotFound(str(err)) from err

    @app.get("/admin/tenants/{name}/usage")
    async def admin_usage(self, name: str, request: Request) -> dict:
        self._require_admin(request)
        return {"name": name, "usage": self.limiter.usage(name)}
