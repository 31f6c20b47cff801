"""Fuzz the HTTP API from its own OpenAPI schema (schemathesis) against a real cluster.

For every operation in /openapi.json, schemathesis generates requests that fit the schema and
requests that do not (wrong types, missing fields, absurd numbers, garbage bodies); each is sent
over real HTTP with a valid key, with no key, and with a wrong key (the tenant key for /admin).
Every answer must come within the per-request timeout, be below 500, and, when it is an error,
carry the OpenAI error shape ({"error": {"message", "type", "param", "code"}}); no protected
endpoint may answer 2xx without its key. Hand-written hostile bodies (invalid UTF-8, lone
surrogates, JSON nested 100,000 deep, 10 MB prompts, thousands of prompts, huge numbers) follow.

Counts: LORARETRIEVER_FUZZ_EXAMPLES distinct requests per public operation (/v1/*, /healthz,
/readyz) and LORARETRIEVER_FUZZ_ADMIN_EXAMPLES per /admin one (15 of the 21 operations), both
1000 by default; e.g. 100 and 20 for a quick run. Distinct means different on the wire (method,
URL, query, headers, body; the credential is counted apart): generation runs in rounds until an
operation has that many, or until a round of at least 100 draws finds nothing new, which means
its schema allows no more (an operation without parameters allows one); those few are then
sent with every credential. Generation is derandomized (round n draws with seed n: the same requests every run,
so CI fails only for a change in the code); LORARETRIEVER_FUZZ_EXPLORE=1 draws new ones each run.
"""
from __future__ import annotations

import json
import os
import random
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from services.schemas import ErrorResponse

PUBLIC_EXAMPLES = int(os.environ.get("LORARETRIEVER_FUZZ_EXAMPLES", "1000"))
ADMIN_EXAMPLES = int(os.environ.get("LORARETRIEVER_FUZZ_ADMIN_EXAMPLES", "1000"))
EXPLORE = os.environ.get("LORARETRIEVER_FUZZ_EXPLORE") == "1"
REQUEST_TIMEOUT_S = 30.0  # a request without an answer by then counts as a hang
SENDERS = 8  # concurrent HTTP clients
MAX_ROUNDS = 12  # generation rounds per operation before it must have its count or be exhausted
MIN_ROUND = 100  # draws in a round at least: that many finding nothing new means the schema allows no more
FUZZ_MAX_TOKENS = 64  # the fuzz tenant's cap: valid generation requests stay cheap on 2 cores
UNPROTECTED = {"/healthz", "/readyz", "/openapi.json"}


@pytest.fixture(scope="module")
def schema(serve_cluster):
    import schemathesis

    return schemathesis.openapi.from_url(f"{serve_cluster.url}/openapi.json")


@pytest.fixture(scope="module")
def fuzz_key(serve_cluster):
    """A tenant whose rate limits the fuzzer never reaches (429s would hide the deeper code)."""
    import redis

    from services.tenancy.tenants import TenantLimits, TenantStore

    limits = TenantLimits(requests_per_second=1e5, burst=10**6, max_concurrent=1000, max_tokens=FUZZ_MAX_TOKENS)
    return TenantStore(redis.Redis.from_url(serve_cluster.redis_url)).add("fuzz", limits)


CHAT_ROLES = ("user", "system", "assistant")


def fitted(case, model: str | None):
    """A fitting case made to reach generation: `model` (when given) names one that exists, and chat
    messages get roles and text parts the server takes, the first one a user's with some text (the
    schema types role and part type as free strings and cannot say a user must speak, so generated
    conversations almost never pass)."""
    body = case.body if isinstance(case.body, dict) else {}
    if model is None:
        return case
    if "model" in body:
        body["model"] = model
    messages = body.get("messages")
    for i, message in enumerate(m for m in (messages if isinstance(messages, list) else []) if isinstance(m, dict)):
        message["role"] = CHAT_ROLES[i % len(CHAT_ROLES)]
        if i == 0 and not message.get("content"):
            message["content"] = "hello"
        parts = message.get("content")
        for part in parts if isinstance(parts, list) else []:
            if isinstance(part, dict):
                part.update(type="text", text=part.get("text") or "hello")
    return case


def request_key(case) -> str:
    """What a case puts on the wire apart from the credential (and schemathesis' own case id)."""
    kwargs = case.as_transport_kwargs(base_url="http://fuzz")
    headers = sorted((k.lower(), v) for k, v in kwargs.get("headers", {}).items()
                     if k.lower() != "authorization" and not k.lower().startswith("x-schemathesis"))
    return repr((kwargs["method"], kwargs["url"], kwargs.get("params"), headers, kwargs.get("json", kwargs.get("data"))))


def generated_cases(operation, count: int, models: list[str]) -> tuple[list, bool]:
    """Up to `count` distinct schemathesis cases for one operation, about half fitting its schema
    and half not, and whether its schema allows no more (a round found nothing new). Of the
    fitting ones, three in four name a model that exists (`models`) and get chat roles the server
    knows (`fitted`): otherwise they would stop at validation instead of reaching generation."""
    from hypothesis import HealthCheck, Phase, given, seed, settings
    from hypothesis import strategies as st
    from schemathesis import GenerationMode

    positive = st.tuples(operation.as_strategy(generation_mode=GenerationMode.POSITIVE),
                         st.sampled_from([None, *models])).map(lambda pair: fitted(*pair))
    strategy = st.one_of(positive, operation.as_strategy(generation_mode=GenerationMode.NEGATIVE))
    distinct: dict[str, object] = {}
    for round_ in range(MAX_ROUNDS):
        before = len(distinct)

        @seed(random.getrandbits(64) if EXPLORE else round_)
        @settings(max_examples=max(count - len(distinct), min(count, MIN_ROUND)), phases=[Phase.generate],
                  database=None, deadline=None, suppress_health_check=list(HealthCheck))
        @given(strategy)
        def collect(case):
            if len(distinct) < count:
                distinct.setdefault(request_key(case), case)

        collect()
        if len(distinct) == count or len(distinct) == before:
            return list(distinct.values()), len(distinct) < count
    return list(distinct.values()), False


def send(client: httpx.Client, case, base_url: str, authorization: str | None) -> tuple[int, bytes, float]:
    """Send one case over HTTP; (status, body, seconds). Status 0: the client could not even send it."""
    kwargs = case.as_transport_kwargs(base_url=base_url)
    headers = {k: v for k, v in kwargs.get("headers", {}).items() if k.lower() != "authorization"}
    if authorization:
        headers["Authorization"] = authorization
    body = {"json": kwargs["json"]} if "json" in kwargs else {"content": kwargs.get("data")}
    started = time.perf_counter()
    try:
        r = client.request(kwargs["method"], kwargs["url"], params=kwargs.get("params"), headers=headers, **body)
    except (httpx.InvalidURL, httpx.LocalProtocolError, UnicodeEncodeError):
        return 0, b"", 0.0  # a header or URL no HTTP client puts on the wire
    except httpx.TimeoutException:
        return -1, b"", time.perf_counter() - started
    return r.status_code, r.content, time.perf_counter() - started


def problems(path: str, credential: str, status: int, body: bytes) -> list[str]:
    """What is wrong with one answer (empty: nothing)."""
    if status == -1:
        return [f"no answer within {REQUEST_TIMEOUT_S:g} s"]
    found = []
    if status >= 500:
        found.append(f"server error {status}")
    if status >= 400:
        try:
            ErrorResponse.model_validate(json.loads(body))
        except ValueError:
            found.append(f"error body not in the OpenAI shape: {body[:200]!r}")
    if 200 <= status < 300 and credential != "valid" and path not in UNPROTECTED:
        found.append(f"{status} with a {credential} key")
    return found


@pytest.fixture(scope="module")
def fuzz_report():
    report = {}
    yield report
    if report:
        print("\nfuzz: operation | distinct cases | all the schema allows | distinct requests (with the "
              "credential) | sent | seconds | statuses")
        for label, r in sorted(report.items()):
            print(f"fuzz: {label} | {r['cases']} | {'yes' if r['exhausted'] else '-'} | {r['distinct_requests']} | "
                  f"{r['sent']} | {r['seconds']:.1f} | {dict(sorted(r['statuses'].items()))}")


def test_schema_lists_every_route_and_documents_errors(schema, serve_cluster):
    raw = httpx.get(f"{serve_cluster.url}/openapi.json", timeout=30).json()
    for path, ops in raw["paths"].items():
        for method, op in ops.items():
            assert "422" not in op["responses"], f"{method} {path} documents FastAPI's 422, we answer 400"
            assert op["responses"]["4XX"]["content"]["application/json"]["schema"] == {
                "$ref": "#/components/schemas/ErrorResponse"}
    assert {"/v1/completions", "/v1/chat/completions", "/v1/retrieve", "/v1/models", "/admin/adapters"} <= set(
        raw["paths"])


def test_fuzz_every_operation_from_the_openapi_schema(schema, serve_cluster, fuzz_key, fuzz_report):
    """PUBLIC_EXAMPLES distinct requests per public operation, ADMIN_EXAMPLES per admin one (or all
    its schema allows, each with every credential); no 5xx, no hang, every error in the OpenAI
    shape, no 2xx without a key."""
    from schemathesis.core.result import Ok

    admin_auth = serve_cluster.admin["Authorization"]
    credentials = {  # per endpoint family: (label, Authorization) cycled over the cases
        "public": [("valid", f"Bearer {fuzz_key}"), ("valid", f"Bearer {fuzz_key}"), ("missing", None),
                   ("wrong", "Bearer not-a-key")],
        "admin": [("valid", admin_auth), ("valid", admin_auth), ("missing", None),
                  ("tenant", f"Bearer {fuzz_key}")],
    }
    models = ["auto", serve_cluster.cfg.base_model.name, serve_cluster.zoo.cards[0].model_name]
    failures, generation_s = [], 0.0
    with httpx.Client(timeout=REQUEST_TIMEOUT_S, limits=httpx.Limits(max_connections=SENDERS)) as client, \
            ThreadPoolExecutor(SENDERS) as pool:
        for result in schema.get_all_operations():
            assert isinstance(result, Ok), result
            operation = result.ok()
            family = "admin" if operation.path.startswith("/admin") else "public"
            count = ADMIN_EXAMPLES if family == "admin" else PUBLIC_EXAMPLES
            generation_started = time.perf_counter()
            distinct, exhausted = generated_cases(operation, count, models)
            generation_s += time.perf_counter() - generation_started
            if exhausted:  # all the schema allows: each with every credential
                pairs = [(c, cred) for c in distinct for cred in dict.fromkeys(credentials[family])]
            else:  # half with the valid key, cycled
                pairs = [(c, credentials[family][i % 4]) for i, c in enumerate(distinct)]
            cases, creds = [c for c, _ in pairs], [cred for _, cred in pairs]
            started = time.perf_counter()
            answers = list(pool.map(lambda cc: send(client, cc[0], serve_cluster.url, cc[1][1]), pairs))
            statuses = Counter(status for status, _, _ in answers)
            fuzz_report[f"{operation.method.upper()} {operation.path}"] = {
                "cases": len(distinct), "exhausted": exhausted, "seconds": time.perf_counter() - started,
                "distinct_requests": len({(request_key(c), cred[1]) for c, cred in pairs}),
                "attempted": len(pairs), "sent": sum(n for s, n in statuses.items() if s != 0), "statuses": statuses}
            for case, (label, _), (status, body, _) in zip(cases, creds, answers):
                for problem in problems(operation.path, label, status, body):
                    failures.append(f"{operation.method.upper()} {operation.path} [{label} key] {problem}\n"
                                    f"  {case.as_curl_command()}")
    raw = httpx.get(f"{serve_cluster.url}/openapi.json", timeout=30).json()
    assert len(fuzz_report) == sum(len(ops) for ops in raw["paths"].values())
    print(f"\nfuzz: {sum(r['distinct_requests'] for r in fuzz_report.values())} distinct requests, "
          f"{sum(r['sent'] for r in fuzz_report.values())} sent; generation {generation_s:.0f} s, "
          f"HTTP {sum(r['seconds'] for r in fuzz_report.values()):.0f} s")
    for label, r in fuzz_report.items():
        wanted = ADMIN_EXAMPLES if " /admin" in label else PUBLIC_EXAMPLES
        assert r["cases"] == wanted or r["exhausted"], (
            f"{label}: {r['cases']} distinct cases after {MAX_ROUNDS} rounds, neither {wanted} nor all")
        assert r["sent"] >= 0.95 * r["attempted"], f"{label}: only {r['sent']} of {r['attempted']} could be sent"
    assert not failures, f"{len(failures)} bad answers, first ones:\n" + "\n".join(failures[:10])
    # The fuzzer reached the handlers, not only the validator: some requests with a key succeeded.
    for label in ("POST /v1/completions", "POST /v1/chat/completions", "POST /v1/retrieve", "GET /v1/models"):
        assert fuzz_report[label]["statuses"][200] > 0, f"{label}: no generated request got through"


NESTED = b"[" * 100_000 + b"]" * 100_000


@pytest.mark.parametrize("path, body, status, fragment", [
    ("/v1/completions", b'{"model": "auto", "prompt": "\xff\xfe bad utf-8"}', 400, "parsing the body"),
    ("/v1/completions", b'{"model": "auto", "prompt": "lone \\ud800 surrogate"}', 400, "prompt: "),
    ("/v1/chat/completions", b'{"model": "auto", "messages": [{"role": "user", "content": "\\udfff"}]}', 400,
     "messages.0.content: "),
    ("/v1/retrieve", b'{"input": ["fine", "\\ud800"]}', 400, "input.1: "),
    ("/v1/completions", b'{"model": "auto", "prompt": ' + NESTED + b"}", 400, "parsing the body"),
    ("/v1/completions", b'{"model": "auto", "prompt": "hi", "lora": ' + b'{"a": ' * 5000 + b"1" + b"}" * 5000 + b"}",
     400, ""),
    ("/v1/completions", json.dumps({"model": "auto", "prompt": "x" * 10_000_000}).encode(), 400, "32000"),
    ("/v1/completions", json.dumps({"model": "auto", "prompt": "hi", "max_tokens": 10**30}).encode(), 400,
     "max_tokens"),
    ("/v1/completions", json.dumps({"model": "auto", "prompt": "hi", "max_tokens": 513}).encode(), 400,
     "max_tokens"),
    ("/v1/completions", json.dumps({"model": "auto", "prompt": "hi", "max_tokens": -5}).encode(), 400, "max_tokens"),
    ("/v1/completions", json.dumps({"model": "auto", "prompt": "hi", "max_tokens": True}).encode(), 400,
     "max_tokens"),
    ("/v1/completions", json.dumps({"model": "auto", "prompt": "hi", "max_tokens": "5"}).encode(), 400,
     "max_tokens"),
    ("/v1/completions", b'{"model": "auto", "prompt": "hi", "temperature": NaN}', 400, "temperature"),
    ("/v1/completions", b'{"model": "auto", "prompt": "hi", "lora": {"min_similarity": NaN}}', 400,
     "min_similarity"),
    ("/v1/completions", b'{"model": "auto", "prompt": "hi", "top_p": Infinity}', 400, "top_p"),
    ("/v1/completions", json.dumps({"model": "auto", "prompt": "hi", "seed": 2**64}).encode(), 400, "seed"),
    ("/v1/completions", json.dumps({"model": "auto", "prompt": ["x"] * 5000}).encode(), 400, "1 to 64"),
    ("/v1/retrieve", json.dumps({"input": ["x"] * 5000}).encode(), 400, "1 to 64"),
    ("/v1/chat/completions", json.dumps({"model": "auto", "messages": [{"role": "user", "content": "x"}] * 5000}
                                        ).encode(), 400, "messages"),
    ("/v1/completions", json.dumps({"model": "auto", "prompt": {"nested": "dict"}}).encode(), 400, "prompt"),
    ("/v1/completions", json.dumps({"model": ["auto"], "prompt": "hi"}).encode(), 400, "model"),
    ("/v1/completions", json.dumps({"model": "auto", "prompt": "hi", "lora": {"top_k": 10**6}}).encode(), 400,
     "top_k"),
    ("/v1/completions", b"[1, 2, 3]", 400, ""),
    ("/v1/completions", b"null", 400, ""),
    ("/v1/completions", b"", 400, ""),
    ("/v1/no/such/route", b"{}", 404, "Not Found"),
])
def test_hostile_bodies_get_a_clear_4xx(serve_cluster, fuzz_key, path, body, status, fragment):
    r = httpx.post(f"{serve_cluster.url}{path}", content=body, timeout=REQUEST_TIMEOUT_S,
                   headers={"Authorization": f"Bearer {fuzz_key}", "Content-Type": "application/json"})
    assert r.status_code == status, r.text[:300]
    error = ErrorResponse.model_validate(r.json()).error
    assert fragment in error.message and error.type


def test_wrong_method_and_garbage_content_types_are_4xx(serve_cluster, fuzz_key):
    auth = {"Authorization": f"Bearer {fuzz_key}"}
    for method, path, kwargs, status in [
        ("GET", "/v1/completions", {}, 405),
        ("DELETE", "/v1/models", {}, 405),
        ("POST", "/v1/completions", {"data": {"model": "auto"}}, 400),  # a form, not JSON
        ("POST", "/v1/completions", {"content": b"\x00\x01\x02", "headers": {"Content-Type": "text/plain"}}, 400),
    ]:
        headers = {**auth, **kwargs.pop("headers", {})}
        r = httpx.request(method, f"{serve_cluster.url}{path}", headers=headers, timeout=REQUEST_TIMEOUT_S, **kwargs)
        assert r.status_code == status, (method, path, r.text[:300])
        ErrorResponse.model_validate(r.json())


def test_a_hostile_prompt_does_not_fail_its_batch_neighbours(serve_cluster, fuzz_key):
    """A lone surrogate once crashed the batched embedding call, failing every request batched with it."""
    auth = {"Authorization": f"Bearer {fuzz_key}"}
    good = {"input": "Write this in capital letters: silver dragon"}
    bad = b'{"input": "\\ud800"}'
    with ThreadPoolExecutor(8) as pool:
        goods = [pool.submit(httpx.post, f"{serve_cluster.url}/v1/retrieve", json=good, headers=auth,
                             timeout=REQUEST_TIMEOUT_S) for _ in range(4)]
        bads = [pool.submit(httpx.post, f"{serve_cluster.url}/v1/retrieve", content=bad, timeout=REQUEST_TIMEOUT_S,
                            headers={**auth, "Content-Type": "application/json"}) for _ in range(4)]
        assert [f.result().status_code for f in goods] == [200] * 4
        assert [f.result().status_code for f in bads] == [400] * 4
