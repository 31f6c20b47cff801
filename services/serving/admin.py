"""Operator actions behind the /admin endpoints: adapter rollout and tenants.

They need the admin key (never a tenant key). Plain Python: the Ingress deployment's
routes call these methods with the request's Authorization header."""
from __future__ import annotations

import base64
import binascii
import contextlib
import hmac
import logging
import os
from typing import Awaitable, Callable
import tempfile
from pathlib import Path

from pydantic import Field

from services.composition import AdapterKey
from services.registry.store import StoreError, check_name
from services.rollout import canary as canary_stats
from services.rollout.quality_gate import GateSamples, centroid_cosine, composer_answers, run_gate, split_card
from services.schemas import AdapterCard, Strict
from services.errors import InvalidRequest, NotPermitted, NotAuthenticated, Unavailable
from services.tenancy.gate import bearer_token
from services.tenancy.tenants import TenantLimits, TenantStore

log = logging.getLogger(__name__)

ALLOWED_UPLOAD_FILES = {"adapter_config.json", "adapter_model.safetensors"}
MAX_UPLOAD_BYTES = 512 * 1024 * 1024


class AdapterUpload(Strict):
    name: str = Field(min_length=1, max_length=128)
    card: AdapterCard
    # min_length: an empty path once passed the one-of check below and crashed the upload branch (500).
    path: str | None = Field(None, min_length=1, description="a folder the cluster can read (e.g. on the adapter "
                             "volume), or an object store URI (s3://bucket/path), registered where it is")
    files: dict[str, str] | None = Field(None, description="file name -> base64 content (adapter_config.json, adapter_model.safetensors)")
    tenant: str | None = Field(None, description="owner; with visibility=private only that tenant sees it")
    visibility: str = Field("shared", pattern="^(shared|private)$")
    activate: bool = Field(True, description="make this version active at once (else staged: the quality gate "
                           "scores it, promote later)")
    evaluation: GateSamples | None = Field(None, description="held-out samples and metric for the quality gate")


class VersionRef(Strict):
    version: str = Field(min_length=1, max_length=64)


class PromoteRequest(VersionRef):
    force: bool = Field(False, description="override a failed quality gate (written to the audit log)")


class CanaryRequest(PromoteRequest):
    percent: float = Field(gt=0, lt=100, description="share of the adapter's traffic; promote for 100")
    auto: bool = Field(False, description="promote or roll back on its own after min_requests canary requests")
    min_requests: int | None = Field(None, ge=1, description="default: rollout.canary_min_requests")


class VisibilityRequest(Strict):
    visibility: str = Field(pattern="^(shared|private)$")
    tenant: str | None = Field(None, description="owner tenant; required for private")


class TenantCreate(Strict):
    name: str
    limits: TenantLimits = Field(default_factory=TenantLimits)


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
                 admin_key_env: str, compose: Callable[..., Awaitable[dict]] | None = None, rollout=None,
                 on_active_change: Callable[[str | None], Awaitable[dict]] | None = None, compatibility=None):
        """embed(texts) -> (n, dim) card embeddings (the retriever group's embedder); compose(ComposeJob)
        -> its result dict (the quality gate answers through it); rollout: RolloutConfig."""
        from services.config import RolloutConfig

        self.registry = registry
        self.tenants = tenants
        self.limiter = limiter
        self.embed = embed
        self.admin_key_env = admin_key_env
        self.rollout = rollout or RolloutConfig()
        self.answers = composer_answers(compose, self.rollout.gate_max_tokens) if compose else None
        self.on_active_change = on_active_change  # compatibility scores and policy calibration follow
        self.compatibility = compatibility  # services.registry.compatibility.CompatibilityStore

    async def _active_changed(self, name: str | None, out: dict) -> dict:
        """Re-measure `name`'s compatibility (None: recalibrate only); the action itself has landed,
        so a failure here is reported in the answer and logged, never raised."""
        if self.on_active_change is not None:
            try:
                out["compatibility"] = await self.on_active_change(name)
            except Exception as err:
                log.warning("compatibility refresh after a change of %s failed: %s", name, err)
                out["compatibility"] = {"error": str(err)[:300]}
        return out

    def require_admin(self, authorization: str | None) -> str:
        """The actor name for the audit log; 401/403 unless the admin key is given."""
        expected = os.environ.get(self.admin_key_env)
        if not expected:
            raise NotPermitted(f"the admin API is disabled: set {self.admin_key_env} on the cluster")
        given = bearer_token(authorization)
        if given is None:
            raise NotAuthenticated("missing admin key: send 'Authorization: Bearer <admin key>'")
        if not hmac.compare_digest(given.encode(), expected.encode()):
            raise NotPermitted("this endpoint needs the admin key")
        return "admin"

    # ---- adapters ----------------------------------------------------------
    async def list_adapters(self, authorization: str | None) -> dict:
        self.require_admin(authorization)
        records = self.registry.snapshot()
        return {"data": [r.model_dump(mode="json") for r in records]}

    async def show_adapter(self, name: str, authorization: str | None) -> dict:
        self.require_admin(authorization)
        record = self.registry.get(name)
        out = record.model_dump(mode="json")
        if self.compatibility is not None:  # per version: its gain table (None: not measured)
            out["compatibility"] = {v: self.compatibility.of(str(AdapterKey(name, v))) for v in record.versions}
        return out

    async def add_adapter(self, body: AdapterUpload, authorization: str | None) -> dict:
        actor = self.require_admin(authorization)
        if (body.path is None) == (body.files is None):
            raise InvalidRequest("give exactly one of 'path' (a folder the cluster reads) or 'files' (uploaded)")
        if body.visibility == "private" and not body.tenant:
            raise InvalidRequest("a private adapter needs its owner 'tenant'")
        try:  # before the embedding call: a bad name costs nothing
            check_name(body.name)
        except StoreError as err:
            raise InvalidRequest(str(err), param="name") from err
        card, evaluation, source = split_card(body.card, body.evaluation)
        embeddings = await self.embed([s.inputs for s in card.sample])
        with tempfile.TemporaryDirectory(prefix="lr-upload-") as tmp:
            src = body.path if body.path else self._unpack_upload(body.files, Path(tmp))
            version = self.registry.add_version(body.name, src, card, embeddings, tenant=body.tenant,
                                                visibility=body.visibility, activate=body.activate, actor=actor)
        out = version.model_dump(mode="json", exclude={"card"})
        if not body.activate and self.answers is not None:
            report = await self._quality_gate(body.name, version.version, evaluation, source)
            out["quality"] = report.model_dump(mode="json")
        return await self._active_changed(body.name, out) if body.activate else out

    async def _quality_gate(self, name: str, version: str, evaluation: GateSamples, source: str):
        """Score a staged version against the active one and the base model; stored with the version."""
        record = self.registry.get(name)
        active = record.active_version
        cosine = None
        if active is not None:
            cosine = centroid_cosine(self.registry.card_embeddings(name, version),
                                     self.registry.card_embeddings(name, active))
        cfg = self.rollout
        report = await run_gate(self.answers, name=name, version=version, active_version=active,
                                evaluation=evaluation, source=source, margin=cfg.gate_margin,
                                max_samples=cfg.gate_max_samples, cosine=cosine, moved_below=cfg.card_moved_cosine)
        self.registry.set_quality(name, version, report)
        return report

    @staticmethod
    def _unpack_upload(files: dict[str, str], dest: Path) -> Path:
        total = 0
        for fname, content in files.items():
            if fname not in ALLOWED_UPLOAD_FILES:
                raise InvalidRequest(f"upload file '{fname}' is not allowed; send only {sorted(ALLOWED_UPLOAD_FILES)}")
            try:
                data = base64.b64decode(content, validate=True)
            except (binascii.Error, ValueError) as err:
                raise InvalidRequest(f"upload file '{fname}' is not valid base64") from err
            total += len(data)
            if total > MAX_UPLOAD_BYTES:
                raise InvalidRequest(f"upload larger than {MAX_UPLOAD_BYTES // 2**20} MiB")
            (dest / fname).write_bytes(data)
        return dest

    async def promote(self, name: str, body: PromoteRequest, authorization: str | None) -> dict:
        actor = self.require_admin(authorization)
        self.registry.activate(name, body.version, actor=actor, force=body.force)
        return await self._active_changed(name, {"name": name, "active_version": body.version})

    async def canary(self, name: str, body: CanaryRequest, authorization: str | None) -> dict:
        actor = self.require_admin(authorization)
        min_requests = (body.min_requests or self.rollout.canary_min_requests) if body.auto else None
        canary_stats.reset(self.registry.r, name, body.version)
        record = self.registry.set_canary(name, body.version, body.percent, actor=actor, auto=body.auto,
                                          min_requests=min_requests, force=body.force)
        return {"name": name, "canary": record.canary.model_dump(mode="json")}

    async def clear_canary(self, name: str, authorization: str | None) -> dict:
        actor = self.require_admin(authorization)
        self.registry.clear_canary(name, actor=actor)
        return {"name": name, "canary": None}

    async def set_visibility(self, name: str, body: VisibilityRequest, authorization: str | None) -> dict:
        actor = self.require_admin(authorization)
        record = self.registry.set_visibility(name, body.visibility, body.tenant, actor=actor)
        return {"name": name, "visibility": record.visibility, "owner_tenant": record.owner_tenant}

    async def retire_version(self, name: str, version: str, authorization: str | None) -> dict:
        actor = self.require_admin(authorization)
        record = self.registry.retire_version(name, version, actor=actor)
        return await self._active_changed(None, {"name": name, "retired_version": version,
                                                 "versions": sorted(record.versions)})

    async def collect_garbage(self, authorization: str | None) -> dict:
        """Delete store folders of retired versions that no composer replica holds."""
        self.require_admin(authorization)
        return {"deleted": self.registry.collect_garbage_unheld()}

    async def rollback(self, name: str, authorization: str | None) -> dict:
        actor = self.require_admin(authorization)
        version = self.registry.rollback(name, actor=actor)
        return await self._active_changed(name, {"name": name, "active_version": version})

    async def retire(self, name: str, authorization: str | None) -> dict:
        actor = self.require_admin(authorization)
        self.registry.retire(name, actor=actor)
        return await self._active_changed(None, {"name": name, "retired": True})

    async def pin(self, name: str, authorization: str | None) -> dict:
        actor = self.require_admin(authorization)
        self.registry.set_pinned(name, True, actor=actor)
        return {"name": name, "pinned": True}

    async def unpin(self, name: str, authorization: str | None) -> dict:
        actor = self.require_admin(authorization)
        self.registry.set_pinned(name, False, actor=actor)
        return {"name": name, "pinned": False}

    async def history(self, name: str, authorization: str | None) -> dict:
        self.require_admin(authorization)
        return {"data": self.registry.history(name)}

    # ---- tenants -----------------------------------------------------------
    async def add_tenant(self, body: TenantCreate, authorization: str | None) -> dict:
        self.require_admin(authorization)
        with tenant_store_call(f"add tenant '{body.name}'"):
            key = self.tenants.add(body.name, body.limits)
        return {"name": body.name, "api_key": key}

    async def list_tenants(self, authorization: str | None) -> dict:
        self.require_admin(authorization)
        with tenant_store_call("list tenants"):
            return {"data": [t.model_dump() for t in self.tenants.list()]}

    async def revoke_tenant(self, name: str, authorization: str | None) -> dict:
        self.require_admin(authorization)
        with tenant_store_call(f"revoke tenant '{name}'"):
            return {"name": name, "revoked_keys": self.tenants.revoke(name)}

    async def usage(self, name: str, authorization: str | None) -> dict:
        self.require_admin(authorization)
        with tenant_store_call(f"read the usage of tenant '{name}'"):
            return {"name": name, "usage": self.limiter.usage(name)}
