"""Response bodies in the OpenAI shapes, plus which adapters each answer used."""
from __future__ import annotations

import json
import time

from services.schemas import CompositionPlan
from services.serving.planner import AUTO_MODEL


def error_body(message: str, *, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def lora_info(plan: CompositionPlan) -> dict:
    """The `lora` field of every choice: adapters with versions and weights, and the mode."""
    return {"composition": plan.composition.value, "adapters": [a.model_dump() for a in plan.adapters]}


def models_body(base_model_id: str, records: list) -> dict:
    """GET /v1/models: the base model, `auto`, then the adapters the caller may use (registry records)."""
    now = int(time.time())
    entries = [{"id": base_model_id, "object": "model", "created": now, "owned_by": "base"},
               {"id": AUTO_MODEL, "object": "model", "created": now, "owned_by": "loraretriever"}]
    entries += [{"id": rec.name, "object": "model", "created": now, "owned_by": rec.owner_tenant or "shared",
                 "version": rec.active_version, "domain": rec.domain} for rec in records]
    return {"object": "list", "data": entries}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_body(request_id: str, model: str, results: list[dict], plans: list[CompositionPlan],
                    *, chat: bool) -> dict:
    """One choice per prompt; `results` are the composer's GenerationResult dicts."""
    choices = []
    for i, (res, plan) in enumerate(zip(results, plans)):
        choice = {"index": i, "finish_reason": res["finish_reason"], "logprobs": None, "lora": lora_info(plan)}
        if chat:
            choice["message"] = {"role": "assistant", "content": res["text"]}
        else:
            choice["text"] = res["text"]
        choices.append(choice)
    return {
        "id": request_id,
        "object": "chat.completion" if chat else "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        "usage": usage(sum(r["prompt_tokens"] for r in results), sum(r["completion_tokens"] for r in results)),
    }


def server_timing(*, plan_s: float, total_s: float, results: list[dict]) -> str:
    """The Server-Timing header of a non-streamed answer, in milliseconds: retrieval and planning,
    waiting for a batch, the batch's forward passes, and the whole request at the ingress. With
    several prompts the slowest one's queue and batch times are given (they ran concurrently)."""
    queue = max((r.get("queue_seconds", 0.0) for r in results), default=0.0)
    batch = max((r.get("batch_seconds", 0.0) for r in results), default=0.0)
    parts = {"plan": plan_s, "queue": queue, "compose": batch, "total": total_s}
    return ", ".join(f"{name};dur={seconds * 1000:.1f}" for name, seconds in parts.items())


def stream_chunk(request_id: str, model: str, index: int, *, chat: bool, text: str | None = None,
                 finish_reason: str | None = None, plan: CompositionPlan | None = None,
                 first: bool = False) -> str:
    """One server-sent event. The first chunk of a choice carries its `lora` info (and role)."""
    choice: dict = {"index": index, "finish_reason": finish_reason, "logprobs": None}
    if chat:
        delta: dict = {}
        if first:
            delta["role"] = "assistant"
        if text:
            delta["content"] = text
        choice["delta"] = delta
    else:
        choice["text"] = text or ""
    if plan is not None:
        choice["lora"] = lora_info(plan)
    body = {
        "id": request_id,
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [choice],
    }
    return f"data: {json.dumps(body)}\n\n"


STREAM_DONE = "data: [DONE]\n\n"
