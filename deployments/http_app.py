"""The FastAPI app the Ingress deployment serves, and how errors become OpenAI-shaped bodies."""
from __future__ import annotations

import logging
import re

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from ray.exceptions import RayTaskError
from ray.serve.context import _get_serve_request_context
from starlette.exceptions import HTTPException

from services.schemas import ErrorResponse
from services.serving import openai_format as fmt
from services.errors import (Conflict, InvalidRequest, LimitExceeded, NotAuthenticated, NotFound, NotPermitted,
                             ServiceError, TimedOut, Unavailable)

REQUEST_ID_HEADER = "X-Request-Id"

# The one place a domain error becomes an HTTP answer: status code and OpenAI error type by kind.
# A subclass (AdapterNotFound, TenantError, ...) answers as the first kind in its MRO.
HTTP_ERRORS: dict[type[ServiceError], tuple[int, str]] = {
    InvalidRequest: (400, "invalid_request_error"),
    NotAuthenticated: (401, "authentication_error"),
    NotPermitted: (403, "permission_error"),
    NotFound: (404, "not_found_error"),
    Conflict: (409, "conflict_error"),
    LimitExceeded: (429, "rate_limit_error"),
    Unavailable: (503, "service_unavailable"),
    TimedOut: (504, "timeout_error"),
    ServiceError: (400, "invalid_request_error"),  # a kind not listed above: the caller's request
}
# Error type by status (Starlette's own 401/403/404 get the same as ours).
ERROR_TYPES = {status: kind for status, kind in HTTP_ERRORS.values()}


def http_status(err: ServiceError) -> tuple[int, str]:
    """(status code, OpenAI error type) of a domain error."""
    return next(HTTP_ERRORS[kind] for kind in type(err).__mro__ if kind in HTTP_ERRORS)

UNION_TAG = re.compile(r"[\[(]|^(str|int|float|bool|list|dict|none)$")

log = logging.getLogger("ray.serve")

app = FastAPI(title="LoraRetriever", version="0.1.0",
              description="OpenAI-compatible completions with input-aware LoRA retrieval and composition")


def openapi_schema() -> dict:
    """FastAPI's schema, with the errors as they are answered: every operation may give a 4XX or 5XX
    ErrorResponse (FastAPI documents a 422 HTTPValidationError, but invalid bodies get a 400 ErrorResponse)."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        schemas = schema.setdefault("components", {}).setdefault("schemas", {})
        schemas["ErrorResponse"] = ErrorResponse.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(schemas["ErrorResponse"].pop("$defs", {}))
        for name in ("HTTPValidationError", "ValidationError"):
            schemas.pop(name, None)
        error = {"description": "error in the OpenAI shape",
                 "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}}
        for operations in schema["paths"].values():
            for operation in operations.values():
                operation["responses"].pop("422", None)
                operation["responses"].update({"4XX": error, "5XX": error})
        app.openapi_schema = schema
    return app.openapi_schema


app.openapi = openapi_schema


@app.exception_handler(RequestValidationError)
async def _invalid_body(request: Request, err: RequestValidationError) -> JSONResponse:
    # The deepest error names the field at fault (a bad list element, not "should be a string" of a
    # str | list[str] union's other branch); union-member tags like 'list[str]' are dropped from it.
    first = max(err.errors(), key=lambda e: len(e.get("loc", ())), default={})
    where = ".".join(str(p) for p in first.get("loc", ()) if p != "body" and not UNION_TAG.search(str(p)))
    msg = first.get("msg", "invalid request body")
    return JSONResponse(fmt.error_body(f"{where}: {msg}" if where else msg, param=where or None), status_code=400)


@app.exception_handler(ServiceError)
async def _serving_error(request: Request, err: ServiceError) -> JSONResponse:
    status, kind = http_status(err)
    headers = {"Retry-After": str(int(err.retry_after_s))} if isinstance(err, LimitExceeded) else None
    return JSONResponse(fmt.error_body(err.message, type=kind, param=err.param), status_code=status, headers=headers)


@app.exception_handler(HTTPException)
async def _starlette_error(request: Request, err: HTTPException) -> JSONResponse:
    """Starlette's own errors in the OpenAI shape too: unknown route (404), wrong method (405), a body
    it cannot parse (invalid UTF-8, JSON nested past the recursion limit: 400). They came as {"detail"}."""
    kind = ERROR_TYPES.get(err.status_code, "invalid_request_error" if err.status_code < 500 else "server_error")
    return JSONResponse(fmt.error_body(str(err.detail), type=kind), status_code=err.status_code,
                        headers=getattr(err, "headers", None))


@app.exception_handler(Exception)
async def _unexpected(request: Request, err: Exception) -> JSONResponse:
    """A replica's ServiceError that reached here still wrapped in Ray's error gets its own status; any
    other failure is a 500 in the OpenAI shape whose message names only the request id (details, which
    may hold internals, go to the log)."""
    cause = unwrap(err)
    if isinstance(cause, ServiceError):
        return await _serving_error(request, cause)
    request_id = _get_serve_request_context().request_id or request.headers.get(REQUEST_ID_HEADER, "")
    log.error("unhandled error in %s %s (request %s): %s", request.method, request.url.path, request_id,
              type(err).__name__)
    return JSONResponse(fmt.error_body(f"internal error; request id {request_id or 'unknown'}", type="server_error"),
                        status_code=500)


def unwrap(err: BaseException) -> BaseException:
    """The ServiceError a replica raised, out of Ray's wrapper."""
    if isinstance(err, RayTaskError) and isinstance(err.cause, ServiceError):
        return err.cause
    return err
