"""The request pipeline without Ray: a real Redis behind the tenant gate, plain async functions as
the retriever and composer, and the outcomes a caller and an operator see (answers, errors, leases,
billed usage, metrics) when retrieval fails, a composer fails, or the client cuts a stream."""
from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

import pytest

from services.errors import (InvalidRequest, LimitExceeded, NotAuthenticated, NotFound, ServiceError, TimedOut,
                             Unavailable)
from services.schemas import ChatCompletionRequest, CompletionRequest, CompositionMode, Weighting
from services.serving.catalog import Catalog
from services.serving.pipeline import JsonReply, RequestPipeline, StreamReply
from services.serving.planner import PlanDefaults
from services.tenancy.gate import TenantGate
from services.tenancy.limits import TenantLimiter
from services.tenancy.tenants import TenantLimits, TenantStore

STATUS = {InvalidRequest: 400, NotAuthenticated: 401, NotFound: 404, LimitExceeded: 429, Unavailable: 503,
          TimedOut: 504}


def status_of(err: ServiceError) -> int:
    return next(STATUS[k] for k in type(err).__mro__ if k in STATUS)


def record(name):
    return SimpleNamespace(name=name, active_version="2", versions={"2": {}}, owner_tenant=None, visibility="shared",
                           canary=None, base_model="base", domain="d", pinned=False)


CATALOG = Catalog.of([record("upper"), record("lower")], generation=1)


class RecordingMetrics:
    def __init__(self):
        self.requests, self.rejections, self.retrievals, self.ttft, self.versions = [], [], [], [], []

    def observe_retrieval(self, seconds, top1_score):
        self.retrievals.append(top1_score)

    def observe_request(self, tenant, composition, adapters, status):
        self.requests.append((tenant, composition, adapters, status))

    def observe_rejection(self, tenant, reason):
        self.rejections.append((tenant, reason))

    def observe_ttft(self, seconds):
        self.ttft.append(seconds)

    def observe_versions(self, plans, status, seconds):
        self.versions.append(({key for plan in plans for key in plan.keys()}, status))


def result(job, text):
    return {"text": text, "token_ids": [1] * len(text.split()), "finish_reason": "stop",
            "prompt_tokens": len((job.prompt or "").split()) or 3, "completion_tokens": len(text.split()),
            "queue_seconds": 0.01, "batch_seconds": 0.02}


class Parts:
    """The injected retriever and composer calls; each test swaps in the behaviour it needs."""

    def __init__(self):
        self.jobs, self.stream_closed = [], 0

    async def retrieve(self, text, *, top_k, exclude, min_similarity, tenant):
        hits = [{"name": "upper", "score": 0.9}, {"name": "lower", "score": 0.4}][:top_k]
        return {"adapters": hits}

    async def compose(self, job):
        self.jobs.append(job)
        return result(job, " ".join(job.plan.keys()) or "base answer")

    async def stream(self, job):
        self.jobs.append(job)
        try:
            for piece in ("HELLO", " WORLD"):
                yield piece
            yield result(job, "HELLO WORLD")
        finally:
            self.stream_closed += 1


@pytest.fixture
def world(redis_client):
    tenants, limiter = TenantStore(redis_client), TenantLimiter(redis_client)
    key = tenants.add("acme", TenantLimits(max_concurrent=1))
    parts, metrics = Parts(), RecordingMetrics()
    pipeline = RequestPipeline(
        gate=TenantGate(tenants, limiter), catalog=SimpleNamespace(get=lambda **_: CATALOG),
        retrieve=lambda *a, **kw: parts.retrieve(*a, **kw), compose=lambda job: parts.compose(job),
        stream=lambda job: parts.stream(job), metrics=metrics, status_of=status_of,
        defaults=PlanDefaults(top_k=2, composition=CompositionMode.mixture, weighting=Weighting.uniform,
                              temperature=1.0, min_similarity=0.0),
        base_model_id="base", max_tokens_limit=64, request_timeout_s=2.0)
    tenant = pipeline.authenticate(f"Bearer {key}")
    return SimpleNamespace(pipeline=pipeline, parts=parts, metrics=metrics, limiter=limiter, tenant=tenant)


def run(coro):
    return asyncio.run(coro)


def admitted_again(w) -> bool:
    """max_concurrent is 1: a new request is admitted only if the last lease was released."""
    for swapped in ("retrieve", "compose", "stream"):
        vars(w.parts).pop(swapped, None)  # the working parts again
    reply = run(w.pipeline.complete(CompletionRequest(model="upper", prompt="x"), w.tenant, "probe"))
    return isinstance(reply, JsonReply)


def test_completion_plans_composes_and_bills(world):
    body = CompletionRequest(model="auto", prompt=["make it loud", "and quiet"], max_tokens=8)
    reply = run(world.pipeline.complete(body, world.tenant, "r1"))
    assert isinstance(reply, JsonReply) and "Server-Timing" in reply.headers
    choices = reply.body["choices"]
    assert [c["text"] for c in choices] == ["upper@2 lower@2"] * 2
    assert choices[0]["lora"]["composition"] == "mixture"
    assert [(a["name"], a["weight"], a["score"]) for a in choices[0]["lora"]["adapters"]] == [
        ("upper", 0.5, 0.9), ("lower", 0.5, 0.4)]
    assert reply.body["usage"] == {"prompt_tokens": 5, "completion_tokens": 4, "total_tokens": 9}
    assert all(job.request_id == "r1" and job.max_tokens == 8 for job in world.parts.jobs)
    assert world.limiter.usage("acme") == {"requests": 1, "prompt_tokens": 5, "completion_tokens": 4}
    assert world.metrics.requests == [("acme", "mixture", 2, 200)] and world.metrics.retrievals == [0.9, 0.9]
    assert world.metrics.versions == [({"upper@2", "lower@2"}, 200)]
    assert admitted_again(world)


def test_retrieval_failure_answers_with_its_error_and_releases_the_lease(world):
    async def down(*args, **kwargs):
        raise Unavailable("retriever replica lost and 3 retries failed; retry shortly")

    world.parts.retrieve = down
    with pytest.raises(Unavailable, match="retriever"):
        run(world.pipeline.complete(CompletionRequest(model="auto", prompt="hi"), world.tenant, "r2"))
    assert world.parts.jobs == []  # nothing reached a composer
    assert world.metrics.requests == [("acme", "unplanned", 0, 503)]
    assert world.limiter.usage("acme") == {"requests": 1, "prompt_tokens": 0, "completion_tokens": 0}
    assert admitted_again(world)


def test_composer_failure_fails_the_request_with_its_status(world):
    async def missing(job):
        raise NotFound(f"adapter '{job.plan.keys()[0]}' has no files in the adapter store")

    world.parts.compose = missing
    with pytest.raises(NotFound, match="upper@2"):
        run(world.pipeline.chat(ChatCompletionRequest(model="upper", messages=[{"role": "user", "content": "hi"}]),
                                world.tenant, "r3"))
    assert world.metrics.requests == [("acme", "selection", 1, 404)]
    assert world.metrics.versions == [({"upper@2"}, 404)]  # what canary verdicts count as an error
    assert admitted_again(world)


def test_stream_interleaves_chunks_and_bills_prompt_and_completion(world):
    body = CompletionRequest(model="auto", prompt="hi there", stream=True, lora={"composition": "selection"})

    async def open_and_drain():
        reply = await world.pipeline.complete(body, world.tenant, "r4")
        assert isinstance(reply, StreamReply)
        assert world.metrics.requests == []  # the request is open until the stream ends
        return [event async for event in reply.events]

    events = run(open_and_drain())
    assert events[-1] == "data: [DONE]\n\n" and len(events) == 4, events
    assert '"lora"' in events[0] and '"lora"' not in events[1]  # the first chunk names the adapters
    assert world.limiter.usage("acme") == {"requests": 1, "prompt_tokens": 2, "completion_tokens": 2}
    assert world.metrics.requests == [("acme", "selection", 1, 200)] and len(world.metrics.ttft) == 1


def test_cut_stream_stops_the_composer_stream_and_releases_the_lease(world):
    async def endless(job):
        try:
            while True:
                yield "token "
                await asyncio.sleep(0)
        finally:
            world.parts.stream_closed += 1

    world.parts.stream = endless
    body = CompletionRequest(model="upper", prompt="go", stream=True)

    async def read_two_then_leave():
        reply = await world.pipeline.complete(body, world.tenant, "r5")
        events = [await anext(reply.events), await anext(reply.events)]
        await reply.events.aclose()  # what Starlette does when the client disconnects
        return events

    events = run(read_two_then_leave())
    assert all("token" in e for e in events)
    assert world.parts.stream_closed == 1
    assert world.limiter.usage("acme")["requests"] == 1
    assert world.metrics.requests == [("acme", "selection", 1, 200)]
    assert admitted_again(world)


def test_a_stream_broken_midway_ends_with_an_error_event(world):
    async def broken(job):
        yield "partial"
        raise Unavailable("the composer replica serving this stream was lost; the answer is incomplete")

    world.parts.stream = broken

    async def open_and_drain():
        reply = await world.pipeline.complete(CompletionRequest(model="upper", prompt="go", stream=True),
                                              world.tenant, "r6")
        return [event async for event in reply.events]

    events = run(open_and_drain())
    assert "partial" in events[0] and "answer is incomplete" in events[1] and events[-1] == "data: [DONE]\n\n"
    assert admitted_again(world)


def test_slow_retrieval_times_out_with_504(world):
    async def slow(*args, **kwargs):
        await asyncio.sleep(10)

    world.parts.retrieve = slow
    world.pipeline.request_timeout_s = 0.2
    with pytest.raises(TimedOut):
        run(world.pipeline.complete(CompletionRequest(model="auto", prompt="hi"), world.tenant, "r7"))
    assert world.metrics.requests == [("acme", "unplanned", 0, 504)]


def test_door_refusals_are_counted(world):
    with pytest.raises(NotAuthenticated):
        world.pipeline.authenticate("Bearer lr-nobody")
    with pytest.raises(InvalidRequest, match="max_tokens"):
        run(world.pipeline.complete(CompletionRequest(model="upper", prompt="x", max_tokens=65), world.tenant, "r8"))
    assert world.metrics.rejections == [(None, "unauthorized")]
    assert world.limiter.usage("acme") == {}  # refused before admission: nothing billed


def entry(token, logprob):
    return {"token": token, "bytes": list(token.encode()), "logprob": logprob,
            "top": [] if logprob is None else [{"token": token, "bytes": list(token.encode()), "logprob": logprob}]}


def test_unknown_fields_are_ignored_and_named_in_a_header(world):
    body = ChatCompletionRequest.model_validate({
        "model": "upper", "future_knob": 1, "parallel_tool_calls": False, "user": "u1",
        "stream_options": None, "messages": [
            {"role": "developer", "content": "be brief", "cache_hint": True},
            {"role": "user", "name": "ann", "content": [{"type": "text", "text": "make it "}, {"type": "text", "text": "loud"}]}]})
    reply = run(world.pipeline.chat(body, world.tenant, "r9"))
    assert reply.headers["X-Ignored-Fields"] == "future_knob, messages[0].cache_hint"
    [job] = world.parts.jobs
    assert [m.template_turn() for m in job.messages] == [{"role": "system", "content": "be brief"},
                                                         {"role": "user", "content": "make it loud"}]


@pytest.mark.parametrize("extra, param", [
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"modalities": ["text", "audio"]}, "modalities"),
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": 5, "max_completion_tokens": 6}, "max_completion_tokens"),
    ({"logit_bias": {"the": 1}}, "logit_bias"),
])
def test_fields_that_would_change_the_answer_are_refused_by_name(world, extra, param):
    body = ChatCompletionRequest.model_validate({"model": "upper", "messages": [{"role": "user", "content": "x"}],
                                                 **extra})
    with pytest.raises(InvalidRequest) as refused:
        run(world.pipeline.chat(body, world.tenant, "r10"))
    assert refused.value.param == param and param in refused.value.message
    assert world.parts.jobs == [] and world.limiter.usage("acme") == {}  # refused before admission


@pytest.mark.parametrize("extra, param", [({"suffix": "tail"}, "suffix"), ({"best_of": 3}, "best_of"),
                                          ({"stream": True, "echo": True, "logprobs": 1}, "echo")])
def test_completion_fields_refused_by_name(world, extra, param):
    with pytest.raises(InvalidRequest) as refused:
        run(world.pipeline.complete(CompletionRequest(model="upper", prompt="x", **extra), world.tenant, "r11"))
    assert refused.value.param == param


def test_n_rows_share_the_plan_take_consecutive_seeds_and_bill_the_prompt_once(world):
    body = CompletionRequest(model="auto", prompt=["one two", "three"], n=3, seed=40, max_completion_tokens=1,
                             max_tokens=7, presence_penalty=0.5, frequency_penalty=-0.5, logit_bias={"17": -100})
    reply = run(world.pipeline.complete(body, world.tenant, "r12"))
    jobs = world.parts.jobs
    assert [c["index"] for c in reply.body["choices"]] == list(range(6))
    assert [j.seed for j in jobs] == [40, 41, 42, 40, 41, 42] and [j.prompt for j in jobs] == ["one two"] * 3 + ["three"] * 3
    assert all(j.max_tokens == 7 and j.logit_bias == {17: -100} and j.presence_penalty == 0.5 for j in jobs)
    completion = sum(len(" ".join(j.plan.keys()).split()) for j in jobs)
    assert reply.body["usage"] == {"prompt_tokens": 2 + 1, "completion_tokens": completion,
                                   "total_tokens": 3 + completion}
    assert world.limiter.usage("acme") == {"requests": 1, "prompt_tokens": 3, "completion_tokens": completion}


def test_stream_with_include_usage_ends_with_the_usage_chunk(world):
    body = ChatCompletionRequest(model="upper", messages=[{"role": "user", "content": "hi"}], stream=True,
                                 stream_options={"include_usage": True})

    async def drain():
        reply = await world.pipeline.chat(body, world.tenant, "r13")
        return [event async for event in reply.events]

    events = run(drain())
    last = json.loads(events[-2].removeprefix("data: "))
    assert last["choices"] == [] and last["usage"] == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    assert world.limiter.usage("acme") == {"requests": 1, "prompt_tokens": 3, "completion_tokens": 2}


def test_echo_and_logprobs_in_the_completions_shape(world):
    async def compose(job):
        world.parts.jobs.append(job)
        return {**result(job, "C"), "prompt_tokens": 2, "completion_tokens": 1,
                "prompt_logprobs": [entry("ab", None), entry("cd", -0.5)], "logprobs": [entry("C", -0.25)]}

    world.parts.compose = compose
    body = CompletionRequest(model="upper", prompt="abcd", echo=True, logprobs=1, max_tokens=0)
    choice = run(world.pipeline.complete(body, world.tenant, "r14")).body["choices"][0]
    [job] = world.parts.jobs
    assert job.prompt_logprobs and job.logprobs == 1 and job.max_tokens == 0
    assert choice["text"] == "abcdC"
    assert choice["logprobs"] == {"tokens": ["ab", "cd", "C"], "token_logprobs": [None, -0.5, -0.25],
                                  "top_logprobs": [None, {"cd": -0.5}, {"C": -0.25}], "text_offset": [0, 2, 4]}


def test_chat_logprobs_in_the_chat_shape_streamed_and_not(world):
    async def stream(job):
        yield {"text": "HI", "logprobs": [entry("HI", -0.1)]}
        yield {**result(job, "HI"), "logprobs": [entry("HI", -0.1)]}

    async def compose(job):
        return {**result(job, "HI"), "logprobs": [entry("HI", -0.1)]}

    world.parts.stream, world.parts.compose = stream, compose
    expected = {"content": [{"token": "HI", "logprob": -0.1, "bytes": [72, 73],
                             "top_logprobs": [{"token": "HI", "logprob": -0.1, "bytes": [72, 73]}]}], "refusal": None}
    body = dict(model="upper", messages=[{"role": "user", "content": "hi"}], logprobs=True, top_logprobs=1)
    reply = run(world.pipeline.chat(ChatCompletionRequest(**body), world.tenant, "r15"))
    assert reply.body["choices"][0]["logprobs"] == expected

    async def drain():
        streamed = await world.pipeline.chat(ChatCompletionRequest(**body, stream=True), world.tenant, "r16")
        return [event async for event in streamed.events]

    first = json.loads(run(drain())[0].removeprefix("data: "))
    assert first["choices"][0]["logprobs"] == expected and first["choices"][0]["delta"]["content"] == "HI"


def test_model_entries_carry_lineage_and_an_unknown_id_is_not_found(world):
    assert world.pipeline.model(world.tenant, "upper")["root"] == "base"
    assert world.pipeline.model(world.tenant, "upper")["parent"] == "base"
    assert world.pipeline.model(world.tenant, "base")["parent"] is None
    with pytest.raises(NotFound, match="nope"):
        world.pipeline.model(world.tenant, "nope")
