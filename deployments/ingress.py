# No `from __future__ import annotations`: Serve re-wraps the endpoints and FastAPI must see real types.
"""Ingress: the OpenAI-compatible HTTP API (FastAPI inside Ray Serve).

Authenticates the tenant, validates, plans each prompt's composition (retrieval or named
adapters) against one registry snapshot, fans prompts out to the composer group and
streams or collects the answers. Business logic lives in services/; this class is glue."""

import asyncio
import json
import logging
import time
import uuid
from typing import Awaitable, Callable

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.serve.context import _get_serve_request_context
from ray.exceptions import RayActorError, RayTaskError
from ray.serve.handle import DeploymentHandle

from cluster.config import AppConfig
from cluster.wiring import base_model_name, make_registry, redis_client
from deployments import metrics
from deployments.fanout import call_with_own_id
from deployments.http_app import REQUEST_ID_HEADER, app, unwrap
from services.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    CompositionPlan,
    RetrievalResult,
    RetrieveRequest,
)
from services.serving import openai_format as fmt
from services.serving.admin import AdapterUpload, AdminService, CanaryRequest, TenantCreate, VersionRef
from services.serving.catalog import AdapterUnavailable, Catalog, CatalogCache
from services.serving.composer_service import ComposeJob
from services.serving.errors import (BadRequest, NotFound, ServingError, Timeout, TooManyRequests, Unauthorized,
                                     Unavailable)
from services.serving.planner import AUTO_MODEL, PlanDefaults, needs_retrieval, plan_composition
from services.tenancy.gate import TenantGate
from services.tenancy.limits import TenantLimiter
from services.tenancy.tenants import Tenant, TenantStore

log = logging.getLogger("ray.serve")


def replica_lost(err: BaseException) -> bool:
    """The replica serving a call died or became unreachable (not an error of the call itself)."""
    return isinstance(err, RayActorError) or (isinstance(err, RayTaskError) and isinstance(err.cause, RayActorError))


@serve.deployment(name="Ingress")
@serve.ingress(app)
class Ingress:
    def __init__(self, config: dict, retriever: DeploymentHandle, composer: DeploymentHandle):
        self.cfg = AppConfig.model_validate(config)
        self.retriever = retriever
        self.composer = composer
        self.registry = make_registry(self.cfg)
        self.catalog = CatalogCache(self.registry)
        redis = redis_client(self.cfg)
        self.tenants = TenantStore(redis)
        self.limiter = TenantLimiter(redis)
        self.gate = TenantGate(self.tenants, self.limiter, enabled=self.cfg.server.auth_enabled)
        self.admin = AdminService(registry=self.registry, tenants=self.tenants, limiter=self.limiter,
                                  embed=lambda texts: retriever.embed.remote(texts),
                                  admin_key_env=self.cfg.server.admin_key_env)
        self.base_name = base_model_name(self.cfg)
        r, c = self.cfg.retrieval, self.cfg.composition
        self.defaults = PlanDefaults(top_k=r.top_k, composition=c.mode, weighting=c.weighting,
                                     temperature=c.temperature, min_similarity=r.min_similarity)

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

    # ---- catalog ---------------------------------------------------------
    @app.get("/v1/models")
    async def models(self, request: Request) -> dict:
        tenant = self._tenant_name(self._authenticate(request))
        now = int(time.time())
        entries = [{"id": self.base_name, "object": "model", "created": now, "owned_by": "base"},
                   {"id": AUTO_MODEL, "object": "model", "created": now, "owned_by": "loraretriever"}]
        for rec in self.catalog.get().visible(tenant):
            entries.append({"id": rec.name, "object": "model", "created": now, "owned_by": rec.owner_tenant or "shared",
                            "version": rec.active_version, "domain": rec.domain})
        return {"object": "list", "data": entries}

    @app.post("/v1/retrieve")
    async def retrieve(self, body: RetrieveRequest, request: Request) -> JSONResponse:
        tenant = self._tenant_name(self._authenticate(request))
        prompts = self._checked(body.prompts)
        results = await self._with_timeout(asyncio.gather(*(self._retrieve(p, body.lora, tenant) for p in prompts)))
        return JSONResponse({"object": "list", "data": [{"index": i, **r} for i, r in enumerate(results)]})

    # ---- generation ------------------------------------------------------
    @app.post("/v1/completions")
    async def completions(self, body: CompletionRequest, request: Request):
        prompts = self._checked(body.prompts)
        return await self._generate(body, request, [{"prompt": p} for p in prompts], prompts, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(self, body: ChatCompletionRequest, request: Request):
        text = self._checked(body.retrieval_text)
        return await self._generate(body, request, [{"messages": body.messages}], [text], chat=True)

    async def _generate(self, body, request: Request, inputs: list[dict], texts: list[str], *, chat: bool):
        request_id = self._request_id(request)
        tenant = self._authenticate(request)
        stops = self._checked(body.stop_list)
        if body.max_tokens > self.cfg.composition.max_tokens_limit:
            raise BadRequest(f"max_tokens may be at most {self.cfg.composition.max_tokens_limit}", param="max_tokens")
        lease = self._admit(tenant, request_id, body.max_tokens)
        started, usage, streaming, plans, status = time.perf_counter(), {}, False, [], 500
        try:
            catalog = self.catalog.get()  # one snapshot per request: one version per adapter throughout
            plans = await self._with_timeout(asyncio.gather(
                *(self._plan(body.model, body.lora, text, request_id, catalog, self._tenant_name(tenant))
                  for text in texts)))
            planned = time.perf_counter()
            jobs = [ComposeJob(request_id=request_id, plan=plan, max_tokens=body.max_tokens,
                               temperature=body.temperature, top_p=body.top_p, stop=stops, seed=body.seed,
                               **inp).model_dump()
                    for inp, plan in zip(inputs, plans)]
            if body.stream:
                opened = await self._with_timeout(asyncio.gather(*(self._open_stream(job) for job in jobs)))
                streams, firsts = [s for s, _ in opened], [f for _, f in opened]
                metrics.observe_ttft(time.perf_counter() - started)
                events = self._sse(request_id, body.model, streams, firsts, plans, chat, tenant, lease)
                streaming, status = True, 200  # the stream releases the lease when it ends
                return StreamingResponse(events, media_type="text/event-stream")
            results = await self._with_timeout(asyncio.gather(*(self._compose(job) for job in jobs)))
            reply = fmt.completion_body(request_id, body.model, results, plans, chat=chat)
            usage = {k: reply["usage"][k] for k in ("prompt_tokens", "completion_tokens")}
            self._log_request(request_id, tenant, plans, usage, started)
            status = 200
            timing = fmt.server_timing(plan_s=planned - started, total_s=time.perf_counter() - started, results=results)
            return JSONResponse(reply, headers={"Server-Timing": timing})
        except ServingError as err:
            status = err.status
            raise
        finally:
            if not streaming:
                self.gate.finish(tenant, lease, requests=1, **usage)
            metrics.observe_request(self._tenant_name(tenant), plans[0].composition.value if plans else metrics.UNPLANNED,
                                    max((len(p.adapters) for p in plans), default=0), status)

    def _authenticate(self, request: Request) -> Tenant | None:
        try:
            return self.gate.authenticate(request.headers.get("authorization"))
        except Unauthorized:
            metrics.observe_rejection(None, "unauthorized")
            raise

    def _admit(self, tenant: Tenant | None, request_id: str, max_tokens: int):
        """A concurrency lease (None without tenants); 429 over a limit, 400 over max_tokens."""
        try:
            return self.gate.admit(tenant, request_id, max_tokens)
        except TooManyRequests:
            metrics.observe_rejection(self._tenant_name(tenant), "limited")
            raise
        except ValueError as err:
            raise BadRequest(str(err), param="max_tokens") from err

    async def _sse(self, request_id, model, streams, firsts, plans, chat, tenant, lease):
        """Interleave the prompts' streams as OpenAI chunks; each choice's first chunk names its adapters."""
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(i: int, stream, first):
            try:
                item = first
                while item is not None:
                    await queue.put((i, item))
                    item = await self._next(stream)
            except Exception as err:
                if replica_lost(err):  # part of the answer reached the client: nothing to send again
                    err = Unavailable("the composer replica serving this stream was lost; the answer is "
                                      "incomplete, retry the request")
                await queue.put((i, unwrap(err)))
            await queue.put((i, None))

        tasks = [asyncio.ensure_future(pump(i, s, f)) for i, (s, f) in enumerate(zip(streams, firsts))]
        started, open_streams, completion_tokens = set(), len(streams), 0
        deadline = time.monotonic() + self.cfg.server.request_timeout_s
        try:
            while open_streams:
                i, item = await asyncio.wait_for(queue.get(), max(0.0, deadline - time.monotonic()))
                plan = None if i in started else plans[i]
                if item is None:
                    open_streams -= 1
                    continue
                if isinstance(item, BaseException):
                    yield f"data: {json.dumps(fmt.error_body(str(item)[:500], type='server_error'))}\n\n"
                    continue
                if isinstance(item, str):
                    yield fmt.stream_chunk(request_id, model, i, chat=chat, text=item, plan=plan, first=plan is not None)
                else:
                    completion_tokens += item["completion_tokens"]
                    yield fmt.stream_chunk(request_id, model, i, chat=chat, finish_reason=item["finish_reason"],
                                           plan=plan, first=plan is not None)
                started.add(i)
            yield fmt.STREAM_DONE
        except asyncio.TimeoutError:
            yield f"data: {json.dumps(fmt.error_body('request timed out', type='timeout_error'))}\n\n"
        finally:
            for t in tasks:
                t.cancel()
            self.gate.finish(tenant, lease, requests=1, completion_tokens=completion_tokens)

    # ---- operators (admin key) --------------------------------------------
    # Routes are declared here, on the class Serve wraps; the work is in services.serving.admin.
    @app.get("/admin/status")
    async def admin_status(self, request: Request) -> dict:
        """Serve's view of the app (deployments, replica states) and one composer's pool."""
        self.admin.require_admin(request.headers.get("authorization"))
        app_status = serve.status().applications[serve.get_replica_context().app_name]
        composer = await self.composer.status.remote()
        return {
            "status": app_status.status.value,
            "deployments": {name: {"status": d.status.value,
                                   "replicas": dict(d.replica_states)}
                            for name, d in app_status.deployments.items()},
            "composers": [composer],
        }

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
    async def admin_promote(self, name: str, body: VersionRef, request: Request) -> dict:
        return await self.admin.promote(name, body, request.headers.get("authorization"))

    @app.post("/admin/adapters/{name}/canary")
    async def admin_canary(self, name: str, body: CanaryRequest, request: Request) -> dict:
        return await self.admin.canary(name, body, request.headers.get("authorization"))

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

    # ---- helpers ---------------------------------------------------------
    async def _plan(self, model: str, opts, text: str, request_id: str, catalog: Catalog,
                    tenant: str | None) -> CompositionPlan:
        retrieved = None
        if needs_retrieval(model, opts):
            retrieved = RetrievalResult.model_validate(await self._retrieve(text, opts, tenant))
        try:
            return plan_composition(model=model, base_model_id=self.base_name, opts=opts, defaults=self.defaults,
                                    catalog=catalog, tenant=tenant, request_id=request_id, retrieved=retrieved)
        except AdapterUnavailable as err:
            raise NotFound(str(err), param="model") from err

    async def _retrieve(self, text: str, opts, tenant: str | None) -> dict:
        min_sim = opts.min_similarity if opts.min_similarity is not None else self.defaults.min_similarity
        started = time.perf_counter()
        # a lost retriever replica (and its embedded index): ask another
        result = await self._resent_on_replica_loss("retriever", lambda: call_with_own_id(
            self.retriever.retrieve.remote, text, top_k=opts.top_k or self.defaults.top_k,
            exclude=list(opts.exclude), min_similarity=min_sim, tenant=tenant))
        metrics.observe_retrieval(time.perf_counter() - started,
                                  result["adapters"][0]["score"] if result["adapters"] else None)
        return result

    @staticmethod
    async def _next(stream):
        """The stream's next item, None at its end, replica errors unwrapped."""
        try:
            return await stream.__anext__()
        except StopAsyncIteration:
            return None
        except RayTaskError as err:
            raise unwrap(err) from None

    # A replica lost mid-call (process killed, OOM, node gone) surfaces as RayActorError. Serve's
    # router then drops that replica and waits for a live one (Ray restarts the dead one), so a
    # call whose output has not reached the client yet is sent again instead of failing the
    # request: retrieval and generation have no side effects. Bounded by count here and by
    # server.request_timeout_s around every call.
    REPLICA_RETRIES = 3

    async def _resent_on_replica_loss(self, what: str, call: Callable[[], Awaitable]):
        """await call(), made again (with backoff) while the replica serving it is lost."""
        for attempt in range(self.REPLICA_RETRIES + 1):
            try:
                return await call()
            except Exception as err:
                if not replica_lost(err):
                    raise
                if attempt >= self.REPLICA_RETRIES:
                    raise Unavailable(f"{what} replica lost and {attempt} retries failed; retry shortly") from err
                log.warning("%s replica lost (%s), sending the call again (retry %d)", what, type(err).__name__,
                            attempt + 1)
                await asyncio.sleep(0.25 * 2 ** attempt)

    def _composer_stream(self, job: dict):
        return call_with_own_id(self.composer.options(stream=True).generate.remote, job)

    async def _open_stream(self, job: dict):
        """A composer stream and its first item. Sent again if the replica is lost before the
        first item (nothing reached the client yet); a loss after it ends the stream with an error."""
        async def open_once():
            stream = self._composer_stream(job)
            return stream, await self._next(stream)

        return await self._resent_on_replica_loss("composer", open_once)

    async def _compose(self, job: dict) -> dict:
        """A non-streamed job's result; the whole job is sent again if its replica is lost midway."""
        return await self._resent_on_replica_loss("composer", lambda: self._collect(self._composer_stream(job)))

    async def _collect(self, stream) -> dict:
        result = None
        while (item := await self._next(stream)) is not None:
            if isinstance(item, dict):
                result = item
        return result

    async def _with_timeout(self, awaitable):
        try:
            return await asyncio.wait_for(awaitable, self.cfg.server.request_timeout_s)
        except asyncio.TimeoutError:
            raise Timeout(f"no answer within {self.cfg.server.request_timeout_s:g} s") from None

    def _log_request(self, request_id: str, tenant: Tenant | None, plans, usage: dict, started: float) -> None:
        log.info(json.dumps({
            "event": "request", "request_id": request_id, "tenant": self._tenant_name(tenant),
            "adapters": [p.keys() for p in plans], "composition": [p.composition.value for p in plans],
            "completion_tokens": usage["completion_tokens"], "seconds": round(time.perf_counter() - started, 4),
        }))

    @staticmethod
    def _tenant_name(tenant: Tenant | None) -> str | None:
        return tenant.name if tenant else None

    @staticmethod
    def _checked(fn):
        """Call a schema method whose ValueError means a bad request."""
        try:
            return fn()
        except ValueError as err:
            raise BadRequest(str(err)) from err

    @staticmethod
    def _request_id(request: Request) -> str:
        """Serve's id for this request: the client's X-Request-Id if it sent one, else generated.
        Serve's proxy echoes it in the response header; we carry it to logs and composers."""
        return _get_serve_request_context().request_id or request.headers.get(REQUEST_ID_HEADER) or (
            f"req-{uuid.uuid4().hex}")
