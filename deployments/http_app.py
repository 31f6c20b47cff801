"""The FastAPI app the Ingress deployment serves, and how errors become OpenAI-shaped bodies."""
from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from ray.exceptions import RayTaskError

from services.serving import openai_format as fmt
from services.serving.errors import ServingError, TooManyRequests

REQUEST_ID_HEADER = "X-Request-Id"

app = FastAPI(title="LoraRetriever", version="0.1.0",
              description="OpenAI-compatible completions with input-aware LoRA retrieval and composition")


@app.exception_handler(RequestValidationError)
async def _invalid_body(request: Request, err: RequestValidationError) -> JSONResponse:
    first = err.errors()[0] if err.errors() else {}
    where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
    msg = first.get("msg", "invalid request body")
    return JSONResponse(fmt.error_body(f"{where}: {msg}" if where else msg, param=where or None), status_code=400)


@app.exception_handler(ServingError)
async def _serving_error(request: Request, err: ServingError) -> JSONResponse:
    headers = {"Retry-After": str(int(err.retry_after_s))} if isinstance(err, TooManyRequests) else None
    return JSONResponse(fmt.error_body(err.message, type=err.type, param=err.param), status_code=err.status,
                        headers=headers)


def unwrap(err: BaseException) -> BaseException:
    """The ServingError a replica raised, out of Ray's wrapper."""
    if isinstance(err, RayTaskError) and isinstance(err.cause, ServingError):
        return err.cause
    return err
