# No `from __future__ import annotations`: Serve re-wraps the endpoints and FastAPI must see real types.
"""Ingress: the OpenAI-compatible HTTP API (FastAPI inside Ray Serve).

Routes only: generation and retrieval go through services.serving.pipeline.RequestPipeline
(auth, limits, planning, fan-out, formatting), whose retriever and composer calls are the
Serve handle calls of deployments.fanout.ReplicaCalls; admin routes call
services.serving.admin.AdminService."""

import asyncio
import logging
import uuid

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.serve.context import _get_serve_request_context
from ray.serve.handle import DeploymentHandle

from deployments import metrics
from deployments.fanout import ReplicaCalls
from deployments.http_app import REQUEST_ID_HEADER, app, http_status
from services.config import AppConfig
from services.registry.compatibility import CompatibilityCache, CompatibilityStore
from services.rollout.compatibility import refresh_compatibility
from services.schemas import ChatCompletionRequest, CompletionRequest, RetrieveRequest
from services.rollout.canary import CanaryJudge
from services.serving.admin import (AdapterUpload, AdminService, CanaryRequest, PromoteRequest, TenantCreate,
                                    VisibilityRequest)
from services.serving.catalog import CatalogCache
from services.serving.pipeline import JsonReply, RequestPipeline, checked
from services.serving.planner import PlanDefaults
from services.tenancy.gate import TenantGate
from services.tenancy.limits import TenantLimiter
from services.tenancy.tenants import TenantStore
from services.wiring import base_model_name, make_registry, redis_client
from deployments.retriever_tuning import TuningLauncher
from services.retrieval.model_versions import RetrieverModels

log = logging.getLogger("ray.serve")


def http_reply(reply) -> JSONResponse | StreamingResponse:
    if isinstance(reply, JsonReply):
        return JSONResponse(reply.body, headers=reply.headers)
    return StreamingResponse(reply.events, media_type="text/event-stream", headers=reply.headers)


def request_id(request: Request) -> str:
    """Serve's id for this request: the client's X-Request-Id if it sent one, else generated.
    Serve's proxy echoes it in the response header; we carry it to logs and composers."""
    return _get_serve_request_context().request_id or request.headers.get(REQUEST_ID_HEADER) or (
        f"req-{uuid.uuid4().hex}")


# Helpers above stand before the class: Serve wraps the routes while this module is still executing.
@serve.deployment(name="Ingress")
@serve.ingress(app)
class Ingress:
    async def __init__(self, config: dict, retriever: DeploymentHandle, composer: DeploymentHandle):
        self.cfg = cfg = AppConfig.model_validate(config)
        self.retriever, self.composer = retriever, composer
        self.registry = make_registry(cfg)
        redis = redis_client(cfg)
        self.tenants, self.limiter = TenantStore(redis), TenantLimiter(redis)
        r, c = cfg.retrieval, cfg.composition
        calls = ReplicaCalls(retriever, composer)
        compatibility = CompatibilityStore(redis)

        async def measure(jobs, cards):
            return await composer.measure_gains.remote(jobs, cards)

        async def on_active_change(name):
            return await refresh_compatibility(self.registry, compatibility, measure, name=name,
                                               neighbours=c.compatibility_neighbours,
                                               max_samples=c.compatibility_samples)

        async def after_auto_promotion(name):
            try:
                await on_active_change(name)
            except Exception as err:  # the promotion has landed; scores catch up on the next change
                log.warning("compatibility refresh after the automatic promotion of %s failed: %s", name, err)

        self._background: set[asyncio.Task] = set()

        def on_promote(name):  # called inside a request's pipeline, on this replica's event loop
            task = asyncio.get_running_loop().create_task(after_auto_promotion(name))
            self._background.add(task)
            task.add_done_callback(self._background.discard)

        self.admin = AdminService(registry=self.registry, tenants=self.tenants, limiter=self.limiter,
                                  embed=lambda texts: retriever.embed.remote(texts),
                                  admin_key_env=cfg.server.admin_key_env, compose=calls.compose, rollout=cfg.rollout,
                                  on_active_change=on_active_change, compatibility=compatibility)
        self.pipeline = RequestPipeline(
            gate=TenantGate(self.tenants, self.limiter, enabled=cfg.server.auth_enabled),
            catalog=CatalogCache(self.registry), retrieve=calls.retrieve, compose=calls.compose, stream=calls.stream,
            metrics=metrics.VersionedMetrics(CanaryJudge(self.registry, cfg.rollout, on_promote),
                                            cfg.rollout.metrics_max_versions),
            status_of=lambda err: http_status(err)[0],
            defaults=PlanDefaults(top_k=r.top_k, composition=c.mode, weighting=c.weighting,
                                  temperature=c.temperature, min_similarity=r.min_similarity),
            base_model_id=base_model_name(cfg), max_tokens_limit=c.max_tokens_limit,
            request_timeout_s=cfg.server.request_timeout_s, compat=CompatibilityCache(compatibility))
        self.tuning = TuningLauncher(cfg, self.registry, RetrieverModels(redis, cfg.retriever_tuning.root()))
        if cfg.retriever_tuning.auto:
            task = asyncio.get_running_loop().create_task(self.tuning.watch())
            self._background.add(task)

    # ---- health ----------------------------------------------------------
    @app.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz(self) -> JSONResponse:
        try:
            await asyncio.wait_for(asyncio.gather(self.retriever.status.remote(), self.composer.status.remote()), 10)
        except Exception as err:
            return JSONResponse({"status": "not ready", "reason": str(err)[:200]}, status_code=503)
        return JSONResponse({"status": "ready"})

    # ---- inference -------------------------------------------------------
    @app.get("/v1/models")
    async def models(self, request: Request) -> dict:
        return self.pipeline.models(self.pipeline.authenticate(request.headers.get("authorization")))

    @app.get("/v1/models/{model_id}")
    async def model(self, model_id: str, request: Request) -> dict:
        return self.pipeline.model(self.pipeline.authenticate(request.headers.get("authorization")), model_id)

    @app.post("/v1/retrieve")
    async def retrieve(self, body: RetrieveRequest, request: Request) -> JSONResponse:
        tenant = self.pipeline.authenticate(request.headers.get("authorization"))
        results = await self.pipeline.retrieve(checked(body.prompts), body.lora, tenant)
        return JSONResponse({"object": "list", "data": [{"index": i, **r} for i, r in enumerate(results)]})

    @app.post("/v1/completions")
    async def completions(self, body: CompletionRequest, request: Request):
        tenant = self.pipeline.authenticate(request.headers.get("authorization"))
        return http_reply(await self.pipeline.complete(body, tenant, request_id(request)))

    @app.post("/v1/chat/completions")
    async def chat_completions(self, body: ChatCompletionRequest, request: Request):
        tenant = self.pipeline.authenticate(request.headers.get("authorization"))
        return http_reply(await self.pipeline.chat(body, tenant, request_id(request)))

    # ---- operators (admin key) --------------------------------------------
    # Routes are declared here, on the class Serve wraps; the work is in services.serving.admin.
    @app.get("/admin/status")
    async def admin_status(self, request: Request) -> dict:
        """Serve's view of the app (deployments, replica states) and one composer's pool."""
        self.admin.require_admin(request.headers.get("authorization"))
        app_status = serve.status().applications[serve.get_replica_context().app_name]
        composer, retriever = await asyncio.gather(self.composer.status.remote(), self.retriever.status.remote())
        return {
            "status": app_status.status.value,
            "deployments": {name: {"status": d.status.value,
                                   "replicas": dict(d.replica_states)}
                            for name, d in app_status.deployments.items()},
            "composers": [composer],
            "retrievers": [retriever],
        }

    @app.post("/admin/retriever/tune")
    async def admin_retriever_tune(self, request: Request) -> dict:
        """Start a tuning run of the retriever on the registry's cards (docs/retrieval.md)."""
        self.admin.require_admin(request.headers.get("authorization"))
        return self.tuning.start("operator")

    @app.get("/admin/retriever/models")
    async def admin_retriever_models(self, request: Request) -> dict:
        self.admin.require_admin(request.headers.get("authorization"))
        return self.tuning.report()

    @app.post("/admin/retriever/rollback")
    async def admin_retriever_rollback(self, request: Request) -> dict:
        self.admin.require_admin(request.headers.get("authorization"))
        return self.tuning.rollback()

    @app.get("/admin/adapters")
    async def admin_list_adapters(self, request: Request) -> dict:
        return await self.admin.list_adapters(request.headers.get("authorization"))

    @app.get("/admin/adapters/{name}")
    async def admin_show_adapter(self, name: str, request: Request) -> dict:
        return await self.admin.show_adapter(name, request.headers.get("authorization"))

    @app.post("/admin/adapters")
    async def admin_add_adapter(self, body: AdapterUpload, request: Request) -> dict:
        return await self.admin.add_adapter(body, request.headers.get("authorization"))

    @app.post("/admin/adapters/{name}/promote")
    async def admin_promote(self, name: str, body: PromoteRequest, request: Request) -> dict:
        return await self.admin.promote(name, body, request.headers.get("authorization"))

    @app.post("/admin/adapters/{name}/canary")
    async def admin_canary(self, name: str, body: CanaryRequest, request: Request) -> dict:
        return await self.admin.canary(name, body, request.headers.get("authorization"))

    @app.delete("/admin/adapters/{name}/canary")
    async def admin_clear_canary(self, name: str, request: Request) -> dict:
        return await self.admin.clear_canary(name, request.headers.get("authorization"))

    @app.post("/admin/adapters/{name}/visibility")
    async def admin_set_visibility(self, name: str, body: VisibilityRequest, request: Request) -> dict:
        return await self.admin.set_visibility(name, body, request.headers.get("authorization"))

    @app.delete("/admin/adapters/{name}/versions/{version}")
    async def admin_retire_version(self, name: str, version: str, request: Request) -> dict:
        return await self.admin.retire_version(name, version, request.headers.get("authorization"))

    @app.post("/admin/gc")
    async def admin_collect_garbage(self, request: Request) -> dict:
        return await self.admin.collect_garbage(request.headers.get("authorization"))

    @app.post("/admin/adapters/{name}/rollback")
    async def admin_rollback(self, name: str, request: Request) -> dict:
        return await self.admin.rollback(name, request.headers.get("authorization"))

    @app.delete("/admin/adapters/{name}")
    async def admin_retire(self, name: str, request: Request) -> dict:
        return await self.admin.retire(name, request.headers.get("authorization"))

    @app.post("/admin/adapters/{name}/pin")
    async def admin_pin(self, name: str, request: Request) -> dict:
        return await self.admin.pin(name, request.headers.get("authorization"))

    @app.post("/admin/adapters/{name}/unpin")
    async def admin_unpin(self, name: str, request: Request) -> dict:
        return await self.admin.unpin(name, request.headers.get("authorization"))

    @app.get("/admin/adapters/{name}/history")
    async def admin_history(self, name: str, request: Request) -> dict:
        return await self.admin.history(name, request.headers.get("authorization"))

    @app.post("/admin/tenants")
    async def admin_add_tenant(self, body: TenantCreate, request: Request) -> dict:
        return await self.admin.add_tenant(body, request.headers.get("authorization"))

    @app.get("/admin/tenants")
    async def admin_list_tenants(self, request: Request) -> dict:
        return await self.admin.list_tenants(request.headers.get("authorization"))

    @app.delete("/admin/tenants/{name}")
    async def admin_revoke_tenant(self, name: str, request: Request) -> dict:
        return await self.admin.revoke_tenant(name, request.headers.get("authorization"))

    @app.get("/admin/tenants/{name}/usage")
    async def admin_usage(self, name: str, request: Request) -> dict:
        return await self.admin.usage(name, request.headers.get("authorization"))

