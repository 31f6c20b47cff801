"""The request pipeline of the HTTP API: authenticate -> admit -> plan (retrieve) -> compose -> format.

No Ray here: the retriever and composer calls are injected (the Ingress passes Serve handle calls,
the unit tests pass plain functions), so the whole path runs in a test. One `RequestScope` per
generation request holds its tenant lease, its token usage and its outcome, and is closed exactly
once: by the pipeline for a JSON answer, by the event stream when a streamed answer ends or the
client goes away.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Awaitable, Callable, Protocol

from services.errors import InvalidRequest, LimitExceeded, NotAuthenticated, NotFound, ServiceError, TimedOut
from services.schemas import ChatCompletionRequest, CompletionRequest, CompositionPlan, LoraOptions, RetrievalResult
from services.serving import openai_format as fmt
from services.serving.catalog import Catalog
from services.serving.composer_service import ComposeJob
from services.serving.planner import AUTO_MODEL, PlanDefaults, needs_retrieval, plan_composition
from services.tenancy.gate import TenantGate
from services.tenancy.limits import Lease
from services.tenancy.tenants import Tenant

log = logging.getLogger("ray.serve")

# retrieve(text, *, top_k, exclude, min_similarity, tenant) -> a RetrievalResult as a dict
RetrieveFn = Callable[..., Awaitable[dict]]
# compose(job) -> the composer's GenerationResult as a dict
ComposeFn = Callable[[ComposeJob], Awaitable[dict]]
# stream(job) -> text pieces (str), then the GenerationResult dict; a part lost midway raises
StreamFn = Callable[[ComposeJob], AsyncIterator[Any]]


class Metrics(Protocol):
    """What the pipeline reports (deployments/metrics.py exports it through Ray Serve)."""

    def observe_retrieval(self, seconds: float, top1_score: float | None) -> None: ...
    def observe_request(self, tenant: str | None, composition: str, adapters: int, status: int) -> None: ...
    def observe_rejection(self, tenant: str | None, reason: str) -> None: ...
    def observe_ttft(self, seconds: float) -> None: ...
    def observe_versions(self, plans: list[CompositionPlan], status: int, seconds: float) -> None: ...


@dataclass
class JsonReply:
    body: dict
    headers: dict[str, str]


@dataclass
class StreamReply:
    events: AsyncIterator[str]  # server-sent events, ending with [DONE]
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class RequestScope:
    """One generation request's lease, usage and outcome; `close` releases and records them once."""

    gate: TenantGate
    metrics: Metrics
    tenant: Tenant | None
    lease: Lease | None
    started: float = field(default_factory=time.perf_counter)
    plans: list[CompositionPlan] = field(default_factory=list)
    status: int = 500  # until an answer or an error says otherwise
    prompt_tokens: int = 0
    completion_tokens: int = 0
    closed: bool = False

    def count(self, result: dict, *, prompt: bool = True) -> None:
        """Add one row's tokens; prompt=False for a prompt's second and later answers (n > 1),
        whose prompt is billed once."""
        self.prompt_tokens += result["prompt_tokens"] if prompt else 0
        self.completion_tokens += result["completion_tokens"]

    def usage(self) -> dict:
        return fmt.usage(self.prompt_tokens, self.completion_tokens)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.gate.finish(self.tenant, self.lease, requests=1, prompt_tokens=self.prompt_tokens,
                         completion_tokens=self.completion_tokens)
        plans = self.plans
        self.metrics.observe_request(tenant_name(self.tenant), plans[0].composition.value if plans else UNPLANNED,
                                     max((len(p.adapters) for p in plans), default=0), self.status)
        self.metrics.observe_versions(plans, self.status, time.perf_counter() - self.started)  # canary verdicts too


UNPLANNED = "unplanned"  # the composition label of a request that failed before planning


def tenant_name(tenant: Tenant | None) -> str | None:
    return tenant.name if tenant else None


def checked(fn):
    """Call a schema method whose ValueError means a bad request."""
    try:
        return fn()
    except ValueError as err:
        raise InvalidRequest(str(err), param=getattr(err, "param", None)) from err


def include_usage(body) -> bool:
    return bool(body.stream and body.stream_options and body.stream_options.include_usage)


def ignored_header(body) -> dict[str, str]:
    """Unknown request fields, named back to the caller (accepted and ignored)."""
    ignored = body.ignored_fields()
    # JSON-escaped: a header carries ASCII only
    return {fmt.IGNORED_FIELDS_HEADER: ", ".join(json.dumps(n)[1:-1] for n in ignored)[:2000]} if ignored else {}


class RequestPipeline:
    def __init__(self, *, gate: TenantGate, catalog, retrieve: RetrieveFn, compose: ComposeFn, stream: StreamFn,
                 metrics: Metrics, status_of: Callable[[ServiceError], int], defaults: PlanDefaults,
                 base_model_id: str, max_tokens_limit: int, request_timeout_s: float, compat=None):
        """catalog: has get(wanted=refs) -> Catalog (one registry snapshot, re-read if it lacks a ref);
        status_of: the HTTP status of an error;
        compat: has get() -> the compatibility snapshot composition auto reads (None: no scores)."""
        self.gate, self.catalog, self.metrics, self.status_of = gate, catalog, metrics, status_of
        self.compat = compat
        self._retrieve_call, self._compose, self._stream = retrieve, compose, stream
        self.defaults, self.base_model_id = defaults, base_model_id
        self.max_tokens_limit, self.request_timeout_s = max_tokens_limit, request_timeout_s

    # ---- the door --------------------------------------------------------
    def authenticate(self, authorization: str | None) -> Tenant | None:
        try:
            return self.gate.authenticate(authorization)
        except NotAuthenticated:
            self.metrics.observe_rejection(None, "unauthorized")
            raise

    def _admit(self, tenant: Tenant | None, request_id: str, max_tokens: int) -> Lease | None:
        try:
            return self.gate.admit(tenant, request_id, max_tokens)
        except LimitExceeded:
            self.metrics.observe_rejection(tenant_name(tenant), "limited")
            raise

    # ---- endpoints -------------------------------------------------------
    def models(self, tenant: Tenant | None) -> dict:
        return fmt.models_body(self.base_model_id, self.catalog.get().visible(tenant_name(tenant)))

    def model(self, tenant: Tenant | None, model_id: str) -> dict:
        """GET /v1/models/{id}: one entry of the caller's list."""
        catalog = self.catalog.get(wanted=[] if model_id == self.base_model_id else [model_id])
        entries = fmt.model_entries(self.base_model_id, catalog.visible(tenant_name(tenant)))
        found = next((e for e in entries if e["id"] == model_id), None)
        if found is None:
            raise NotFound(f"model '{model_id}' does not exist or is not available to you", param="model")
        return found

    async def retrieve(self, prompts: list[str], opts: LoraOptions, tenant: Tenant | None) -> list[dict]:
        return await self._timed(asyncio.gather(*(self._retrieve(p, opts, tenant_name(tenant)) for p in prompts)))

    async def complete(self, body: CompletionRequest, tenant: Tenant | None, request_id: str) -> JsonReply | StreamReply:
        prompts = checked(body.prompts)
        shape = fmt.ReplyShape(chat=False, logprobs=body.logprobs is not None, include_usage=include_usage(body),
                               echo=tuple(p for p in prompts for _ in range(body.n)) if body.echo else None)
        return await self._generate(body, tenant, request_id, [{"prompt": p} for p in prompts], prompts, shape)

    async def chat(self, body: ChatCompletionRequest, tenant: Tenant | None, request_id: str) -> JsonReply | StreamReply:
        text = checked(body.retrieval_text)
        shape = fmt.ReplyShape(chat=True, logprobs=bool(body.logprobs), include_usage=include_usage(body))
        return await self._generate(body, tenant, request_id, [{"messages": body.messages}], [text], shape)

    # ---- generation ------------------------------------------------------
    def _sampling(self, body) -> dict:
        """The ComposeJob fields every row of the request shares."""
        checked(body.check_supported)
        max_tokens = body.token_limit()
        if max_tokens > self.max_tokens_limit:
            raise InvalidRequest(f"max_tokens may be at most {self.max_tokens_limit}", param="max_tokens")
        return {"max_tokens": max_tokens, "temperature": body.temperature, "top_p": body.top_p,
                "stop": checked(body.stop_list), "presence_penalty": body.presence_penalty,
                "frequency_penalty": body.frequency_penalty, "logit_bias": checked(body.bias),
                "logprobs": body.top_logprobs_count(), "prompt_logprobs": body.prompt_logprobs(),
                "response_format": body.response_format.wire() if body.response_format else None}

    async def _generate(self, body, tenant: Tenant | None, request_id: str, inputs: list[dict], texts: list[str],
                        shape: fmt.ReplyShape) -> JsonReply | StreamReply:
        sampling = self._sampling(body)
        headers = ignored_header(body)
        scope = RequestScope(self.gate, self.metrics, tenant, self._admit(tenant, request_id, sampling["max_tokens"]))
        handed_to_stream = False
        try:
            catalog = self.catalog.get(wanted=self._named_adapters(body))  # one snapshot per request: one version per adapter throughout
            scope.plans = await self._timed(asyncio.gather(
                *(self._plan(body.model, body.lora, text, request_id, catalog, tenant_name(tenant)) for text in texts)))
            planned = time.perf_counter()
            # n rows per prompt, sent together (one batch); row j samples with seed + j
            rows = [(p, j) for p in range(len(texts)) for j in range(body.n)]
            jobs = [ComposeJob(request_id=request_id, plan=scope.plans[p], **inputs[p], **sampling,
                               seed=None if body.seed is None else (body.seed + j) % 2**63) for p, j in rows]
            first_rows = [j == 0 for _, j in rows]  # a prompt is billed once, however many answers
            plans = [scope.plans[p] for p, _ in rows]
            if body.stream:
                streams = [self._stream(job) for job in jobs]
                try:
                    firsts = await self._timed(asyncio.gather(*(anext(s) for s in streams)))
                except BaseException:
                    await asyncio.gather(*(s.aclose() for s in streams), return_exceptions=True)
                    raise
                self.metrics.observe_ttft(time.perf_counter() - scope.started)
                scope.status, handed_to_stream = 200, True
                events = self._events(request_id, body.model, streams, firsts, scope, plans, first_rows, shape)
                return StreamReply(events, headers)
            results = await self._timed(asyncio.gather(*(self._compose(job) for job in jobs)))
            for result, first in zip(results, first_rows):
                scope.count(result, prompt=first)
            reply = fmt.completion_body(request_id, body.model, results, plans, shape, scope.usage())
            self._log_request(request_id, scope)
            scope.status = 200
            timing = fmt.server_timing(plan_s=planned - scope.started, total_s=time.perf_counter() - scope.started,
                                       results=results)
            return JsonReply(reply, {"Server-Timing": timing, **headers})
        except ServiceError as err:
            scope.status = self.status_of(err)
            raise
        finally:
            if not handed_to_stream:
                scope.close()

    async def _events(self, request_id: str, model: str, streams: list[AsyncIterator], firsts: list,
                      scope: RequestScope, plans: list[CompositionPlan], first_rows: list[bool],
                      shape: fmt.ReplyShape) -> AsyncIterator[str]:
        """Interleave the rows' streams as OpenAI chunks; each choice's first chunk names its
        adapters. Closing this generator early (the client went away) stops the streams."""
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(i: int, stream: AsyncIterator, first) -> None:
            try:
                await queue.put((i, first))
                async for item in stream:
                    await queue.put((i, item))
            except Exception as err:
                await queue.put((i, err))
            await queue.put((i, None))

        tasks = [asyncio.ensure_future(pump(i, s, f)) for i, (s, f) in enumerate(zip(streams, firsts))]
        started, open_streams = set(), len(streams)
        offsets = [len(shape.echo[i]) if shape.echo else 0 for i in range(len(streams))]  # legacy text_offset
        deadline = time.monotonic() + self.request_timeout_s
        try:
            while open_streams:
                i, item = await asyncio.wait_for(queue.get(), max(0.0, deadline - time.monotonic()))
                plan = None if i in started else plans[i]
                if item is None:
                    open_streams -= 1
                    continue
                if isinstance(item, BaseException):
                    yield fmt.sse(fmt.error_body(str(item)[:500], type="server_error"))
                    continue
                if isinstance(item, str) or "finish_reason" not in item:  # a text piece, not the row's result
                    text, logprobs = (item, None) if isinstance(item, str) else (item["text"], item["logprobs"])
                    yield fmt.stream_chunk(request_id, model, i, shape, text=text, logprobs=logprobs,
                                           offset=offsets[i], plan=plan)
                    offsets[i] += sum(len(e["token"]) for e in logprobs or [])
                else:
                    scope.count(item, prompt=first_rows[i])
                    yield fmt.stream_chunk(request_id, model, i, shape, finish_reason=item["finish_reason"],
                                           plan=plan)
                started.add(i)
            if shape.include_usage:
                yield fmt.usage_chunk(request_id, model, shape, scope.usage())
            yield fmt.STREAM_DONE
        except asyncio.TimeoutError:
            yield fmt.sse(fmt.error_body("request timed out", type="timeout_error"))
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            scope.close()

    # ---- planning --------------------------------------------------------
    def _named_adapters(self, body) -> list[str]:
        """The adapters a request names itself (as `model` or in lora.adapters), not retrieved ones."""
        named = [] if body.model in (AUTO_MODEL, self.base_model_id) else [body.model]
        return named + list(body.lora.adapters or [])

    async def _plan(self, model: str, opts: LoraOptions, text: str, request_id: str, catalog: Catalog,
                    tenant: str | None) -> CompositionPlan:
        retrieved = None
        if needs_retrieval(model, opts):
            retrieved = RetrievalResult.model_validate(await self._retrieve(text, opts, tenant))
        return plan_composition(model=model, base_model_id=self.base_model_id, opts=opts, defaults=self.defaults,
                                catalog=catalog, tenant=tenant, request_id=request_id, retrieved=retrieved,
                                compat=self.compat.get() if self.compat is not None else None)

    async def _retrieve(self, text: str, opts: LoraOptions, tenant: str | None) -> dict:
        min_sim = opts.min_similarity if opts.min_similarity is not None else self.defaults.min_similarity
        started = time.perf_counter()
        result = await self._retrieve_call(text, top_k=opts.top_k or self.defaults.top_k, exclude=list(opts.exclude),
                                           min_similarity=min_sim, tenant=tenant)
        self.metrics.observe_retrieval(time.perf_counter() - started,
                                       result["adapters"][0]["score"] if result["adapters"] else None)
        return result

    async def _timed(self, awaitable):
        try:
            return await asyncio.wait_for(awaitable, self.request_timeout_s)
        except asyncio.TimeoutError:
            raise TimedOut(f"no answer within {self.request_timeout_s:g} s") from None

    @staticmethod
    def _log_request(request_id: str, scope: RequestScope) -> None:
        log.info(json.dumps({
            "event": "request", "request_id": request_id, "tenant": tenant_name(scope.tenant),
            "adapters": [p.keys() for p in scope.plans], "composition": [p.composition.value for p in scope.plans],
            "prompt_tokens": scope.prompt_tokens, "completion_tokens": scope.completion_tokens,
            "seconds": round(time.perf_counter() - scope.started, 4),
        }))
