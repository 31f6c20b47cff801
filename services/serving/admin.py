"""Operator actions behind the /admin endpoints: adapter rollout and tenants.

They need the admin key (never a tenant key). Plain Python: the Ingress deployment's
routes call these methods with the request's Authorization header."""
from __future__ import annotations

import base64
import binascii
import contextlib
import hmac
import os
from typing import Awaitable, Callable
import tempfile
from pathlib import Path

from pydantic import Field

from services.registry.store import StoreError, check_name
from services.schemas import AdapterCard, Strict
from services.serving.errors import BadRequest, Conflict, Forbidden, NotFound, ServingError, Unauthorized, Unavailable
from services.tenancy.gate import bearer_token
from services.tenancy.tenants import TenantError, TenantLimits, TenantStore

ALLOWED_UPLOAD_FILES = {"adapter_config.json", "adapter_model.safetensors"}
MAX_UPLOAD_BYTES = 512 * 1024 * 1024


class AdapterUpload(Strict):
    name: str = Field(min_length=1, max_length=128)
    card: AdapterCard
    # min_length: an empty path once passed the one-of check below and crashed the upload branch (500).
    path: str | None = Field(None, min_length=1, description="a folder the cluster can read (e.g. on the adapter volume)")
    files: dict[str, str] | None = Field(None, description="file name -> base64 content (adapter_config.json, adapter_model.safetensors)")
    tenant: str | None = Field(None, description="owner; with visibility=private only that tenant sees it")
    visibility: str = Field("shared", pattern="^(shared|private)$")
    activate: bool = Field(True, description="make this version active at once (else staged: promote later)")


class VersionRef(Strict):
    version: str = Field(min_length=1, max_length=64)


class CanaryRequest(VersionRef):
    percent: float = Field(gt=0, lt=100, description="share of the adapter's traffic; promote for 100")


class TenantCreate(Strict):
    name: str
    limits: TenantLimits = Field(default_factory=TenantLimits)


def registry_error(err: Exception) -> ServingError:
    """Registry exceptions -> HTTP errors with the registry's own message."""
    from services.registry.registry import AccessDenied, AdapterNotFound, RegistryUnavailable, VersionConflict

    if isinstance(err, AdapterNotFound):
        return NotFound(str(err))
    if isinstance(err, RegistryUnavailable):
        return Unavailable(str(err))
    if isinstance(err, VersionConflict):
        return Conflict(str(err))
    if isinstance(err, AccessDenied):
        return Forbidden(str(err))
    return BadRequest(str(err))


@contextlib.contextmanager
def tenant_store_call(action: str):
    """Tenant store calls with Redis away become a clear 503 (as registry writes do), not a 500."""
    import redis

    try:
        yield
    except redis.RedisError as err:
        raise Unavailable(f"cannot {action}: Redis is unavailable ({type(err).__name__}); retry shortly") from err


class AdminService:
    def __init__(self, *, registry, tenants: TenantStore, limiter, embed: Callable[[list[str]], Awaitable],
                 admin_key_env: str):
        """embed(texts) -> (n, dim) card embeddings (the retriever group's embedder)."""
        self.registry = registry
        self.tenants = tenants
        self.limiter = limiter
        self.embed = embed
        self.admin_key_env = admin_key_env

    def require_admin(self, authorization: str | None) -> str:
        """The actor name for the audit log; 401/403 unless the admin key is given."""
        expected = os.environ.get(self.admin_key_env)
        if not expected:
            raise Forbidden(f"the admin API is disabled: set {self.admin_key_env} on the cluster")
        given = bearer_token(authorization)
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
    async def list_adapters(self, authorization: str | None) -> dict:
        self.require_admin(authorization)
        records = self._registry_call(self.registry.snapshot)
        return {"data": [r.model_dump(mode="json") for r in records]}

    async def show_adapter(self, name: str, authorization: str | None) -> dict:
        self.require_admin(authorization)
        return self._registry_call(self.registry.get, name).model_dump(mode="json")

    async def add_adapter(self, body: AdapterUpload, authorization: str | None) -> dict:
        actor = self.require_admin(authorization)
        if (body.path is None) == (body.files is None):
            raise BadRequest("give exactly one of 'path' (a folder the cluster reads) or 'files' (uploaded)")
        if body.visibility == "private" and not body.tenant:
            raise BadRequest("a private adapter needs its owner 'tenant'")
        try:  # before the embedding call: a bad name costs nothing
            check_name(body.name)
        except StoreError as err:
            raise BadRequest(str(err), param="name") from err
        embeddings = await self.embed([s.inputs for s in body.card.sample])
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

    async def promote(self, name: str, body: VersionRef, authorization: str | None) -> dict:
        actor = self.require_admin(authorization)
        self._registry_call(self.registry.activate, name, body.version, actor=actor)
        return {"name": name, "active_version": body.version}

    async def canary(self, name: str, body: CanaryRequest, authorization: str | None) -> dict:
        actor = self.require_admin(authorization)
        self._registry_call(self.registry.set_canary, name, body.version, body.percent, actor=actor)
        return {"name": name, "canary": body.model_dump()}

    async def rollback(self, name: str, authorization: str | None) -> dict:
        actor = self.require_admin(authorization)
        version = self._registry_call(self.registry.rollback, name, actor=actor)
        return {"name": name, "active_version": version}

    async def retire(self, name: str, authorization: str | None) -> dict:
        actor = self.require_admin(authorization)
        self._registry_call(self.registry.retire, name, actor=actor)
        return {"name": name, "retired": True}

    async def pin(self, name: str, authorization: str | None) -> dict:
        actor = self.require_admin(authorization)
        self._registry_call(self.registry.set_pinned, name, True, actor=actor)
        return {"name": name, "pinned": True}

    async def unpin(self, name: str, authorization: str | None) -> dict:
        actor = self.require_admin(authorization)
        self._registry_call(self.registry.set_pinned, name, False, actor=actor)
        return {"name": name, "pinned": False}

    async def history(self, name: str, authorization: str | None) -> dict:
        self.require_admin(authorization)
        return {"data": self._registry_call(self.registry.history, name)}

    # ---- tenants -----------------------------------------------------------
    async def add_tenant(self, body: TenantCreate, authorization: str | None) -> dict:
        self.require_admin(authorization)
        try:
            with tenant_store_call(f"add tenant '{body.name}'"):
                key = self.tenants.add(body.name, body.limits)
        except TenantError as err:
            raise BadRequest(str(err)) from err
        return {"name": body.name, "api_key": key}

    async def list_tenants(self, authorization: str | None) -> dict:
        self.require_admin(authorization)
        with tenant_store_call("list tenants"):
            return {"data": [t.model_dump() for t in self.tenants.list()]}

    async def revoke_tenant(self, name: str, authorization: str | None) -> dict:
        self.require_admin(authorization)
        try:
            with tenant_store_call(f"revoke tenant '{name}'"):
                return {"name": name, "revoked_keys": self.tenants.revoke(name)}
        except TenantError as err:
            raise NotFound(str(err)) from err

    async def usage(self, name: str, authorization: str | None) -> dict:
        self.require_admin(authorization)
        with tenant_store_call(f"read the usage of tenant '{name}'"):
            return {"name": name, "usage": self.limiter.usage(name)}
