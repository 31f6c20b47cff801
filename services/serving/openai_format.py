"""Response bodies in the OpenAI shapes, plus which adapters each answer used."""
from __future__ import annotations

import json
import time
from dataclasses import dataclass

from services.schemas import CompositionPlan
from services.serving.planner import AUTO_MODEL

IGNORED_FIELDS_HEADER = "X-Ignored-Fields"


@dataclass(frozen=True)
class ReplyShape:
    """How a request's answers are written: chat or completions, with logprobs or not, the prompts
    echoed before the completions (completions `echo`), a usage chunk at the end of a stream."""

    chat: bool
    logprobs: bool = False
    echo: tuple[str, ...] | None = None  # one prompt per row
    include_usage: bool = False

    @property
    def object(self) -> str:
        return "chat.completion" if self.chat else "text_completion"


def error_body(message: str, *, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def lora_info(plan: CompositionPlan) -> dict:
    """The `lora` field of every choice: adapters with versions and weights, the mode, and for
    composition auto what was decided and why."""
    info = {"composition": plan.composition.value, "adapters": [a.model_dump() for a in plan.adapters]}
    if plan.decision is not None:
        info["decision"] = plan.decision
    return info


def model_entries(base_model_id: str, records: list) -> list[dict]:
    """The base model, `auto`, then the adapters the caller may use (registry records); each
    adapter's `root` and `parent` name the base model it was trained on."""
    now = int(time.time())
    entries = [{"id": base_model_id, "object": "model", "created": now, "owned_by": "base", "root": base_model_id,
                "parent": None},
               {"id": AUTO_MODEL, "object": "model", "created": now, "owned_by": "loraretriever",
                "root": base_model_id, "parent": base_model_id}]
    entries += [{"id": rec.name, "object": "model", "created": now, "owned_by": rec.owner_tenant or "shared",
                 "root": base_model_id, "parent": base_model_id, "version": rec.active_version, "domain": rec.domain}
                for rec in records]
    return entries


def models_body(base_model_id: str, records: list) -> dict:
    """GET /v1/models."""
    return {"object": "list", "data": model_entries(base_model_id, records)}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def chat_logprobs(entries: list[dict]) -> dict:
    """{"content": [...]} of a chat choice or chunk."""
    def one(e: dict) -> dict:
        return {"token": e["token"], "logprob": e["logprob"], "bytes": e["bytes"]}

    return {"content": [{**one(e), "top_logprobs": [one(t) for t in e["top"]]} for e in entries], "refusal": None}


def legacy_logprobs(entries: list[dict], offset: int = 0) -> dict:
    """The completions shape: parallel lists, `text_offset` counted from `offset` in the choice's text."""
    offsets = []
    for e in entries:
        offsets.append(offset)
        offset += len(e["token"])
    return {"tokens": [e["token"] for e in entries], "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [{t["token"]: t["logprob"] for t in e["top"]} if e["logprob"] is not None else None
                             for e in entries],
            "text_offset": offsets}


def choice_body(index: int, res: dict, plan: CompositionPlan, shape: ReplyShape) -> dict:
    choice = {"index": index, "finish_reason": res["finish_reason"], "logprobs": None, "lora": lora_info(plan)}
    if shape.chat:
        choice["message"] = {"role": "assistant", "content": res["text"], "refusal": None}
        if shape.logprobs:
            choice["logprobs"] = chat_logprobs(res["logprobs"] or [])
        return choice
    prompt = shape.echo[index] if shape.echo else ""
    choice["text"] = prompt + res["text"]
    if shape.logprobs:
        entries = (res.get("prompt_logprobs") or []) if shape.echo else []
        choice["logprobs"] = legacy_logprobs(entries + (res["logprobs"] or []))
    return choice


def completion_body(request_id: str, model: str, results: list[dict], plans: list[CompositionPlan],
                    shape: ReplyShape, billed: dict) -> dict:
    """One choice per row (prompt by prompt, n rows each); `results` are the composer's
    GenerationResult dicts; `billed` the usage."""
    return {
        "id": request_id,
        "object": shape.object,
        "created": int(time.time()),
        "model": model,
        "choices": [choice_body(i, res, plan, shape) for i, (res, plan) in enumerate(zip(results, plans))],
        "usage": billed,
    }


def server_timing(*, plan_s: float, total_s: float, results: list[dict]) -> str:
    """The Server-Timing header of a non-streamed answer, in milliseconds: retrieval and planning,
    waiting for a batch, the batch's forward passes, and the whole request at the ingress. With
    several prompts the slowest one's queue and batch times are given (they ran concurrently)."""
    queue = max((r.get("queue_seconds", 0.0) for r in results), default=0.0)
    batch = max((r.get("batch_seconds", 0.0) for r in results), default=0.0)
    parts = {"plan": plan_s, "queue": queue, "compose": batch, "total": total_s}
    return ", ".join(f"{name};dur={seconds * 1000:.1f}" for name, seconds in parts.items())


def sse(body: dict) -> str:
    return f"data: {json.dumps(body)}\n\n"


def chunk_envelope(request_id: str, model: str, shape: ReplyShape, choices: list[dict]) -> dict:
    return {"id": request_id, "object": "chat.completion.chunk" if shape.chat else "text_completion",
            "created": int(time.time()), "model": model, "choices": choices}


def stream_chunk(request_id: str, model: str, index: int, shape: ReplyShape, *, text: str | None = None,
                 logprobs: list[dict] | None = None, offset: int = 0, finish_reason: str | None = None,
                 plan: CompositionPlan | None = None) -> str:
    """One server-sent event. The first chunk of a choice (the one given its plan) carries its
    `lora` info, its role (chat) or its echoed prompt (completions)."""
    choice: dict = {"index": index, "finish_reason": finish_reason, "logprobs": None}
    if shape.chat:
        delta: dict = {}
        if plan is not None:
            delta["role"] = "assistant"
        if text:
            delta["content"] = text
        choice["delta"] = delta
        if shape.logprobs and logprobs is not None:
            choice["logprobs"] = chat_logprobs(logprobs)
    else:
        echo = shape.echo[index] if shape.echo and plan is not None else ""
        choice["text"] = echo + (text or "")
        if shape.logprobs and logprobs is not None:
            choice["logprobs"] = legacy_logprobs(logprobs, offset)
    if plan is not None:
        choice["lora"] = lora_info(plan)
    return sse(chunk_envelope(request_id, model, shape, [choice]))


def usage_chunk(request_id: str, model: str, shape: ReplyShape, billed: dict) -> str:
    """The last chunk of a stream with stream_options.include_usage: no choices, the usage."""
    return sse({**chunk_envelope(request_id, model, shape, []), "usage": billed})


STREAM_DONE = "data: [DONE]\n\n"
