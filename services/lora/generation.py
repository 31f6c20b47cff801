"""Batched generation over one KV cache: left padding, per-row sampling, stop strings, streaming."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from transformers import DynamicCache

from services.errors import InvalidRequest
from services.composition import Composition

# logits of the last position (batch, vocab) for input_ids (batch, seq) with the cache so far
ForwardFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, DynamicCache], torch.Tensor]


@dataclass
class GenerationRequest:
    prompt_ids: list[int]
    composition: Composition = Composition()  # adapters by pool key; the default is the base model
    max_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    stop: list[str] = ()
    seed: int | None = None
    on_token: Callable[[str], None] | None = None  # called with each new text piece (streaming)


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" | "length"
    prompt_tokens: int
    completion_tokens: int
    # Set by the serving batcher: seconds waiting for a batch, and the batch's own run time.
    queue_seconds: float = 0.0
    batch_seconds: float = 0.0


class GenerationError(InvalidRequest):
    """A request whose sampling fields cannot be honoured."""


def check_request(request: GenerationRequest) -> None:
    if not request.prompt_ids:
        raise GenerationError("prompt_ids must hold at least one token")
    if request.max_tokens < 1:
        raise GenerationError(f"max_tokens={request.max_tokens} must be at least 1")
    if request.temperature < 0 or not 0 < request.top_p <= 1:
        raise GenerationError(f"temperature={request.temperature} must be >= 0 and top_p={request.top_p} in (0, 1]")
    if any(not s for s in request.stop):
        raise GenerationError("stop strings must be non-empty")


class RowSampler:
    """Greedy at temperature 0, else nucleus sampling with the row's own seeded generator."""

    def __init__(self, request: GenerationRequest, device):
        self.temperature, self.top_p = request.temperature, request.top_p
        self.generator = torch.Generator(device=device)
        if request.seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(request.seed)

    def __call__(self, logits: torch.Tensor) -> int:  # logits (vocab,)
        if self.temperature == 0:
            return int(logits.argmax())
        # A tiny temperature (1e-30 passes "> 0") sent logits / T to inf and the softmax to NaN, and
        # multinomial's error failed the whole batch (500s). Shifted by the max, the others go to
        # -inf instead (same distribution for ordinary temperatures); one that is 0 in float32
        # (5e-324) is greedy.
        if self.temperature < torch.finfo(torch.float32).tiny:
            return int(logits.argmax())
        logits = logits.float()
        probs = torch.softmax((logits - logits.max()) / self.temperature, dim=-1)
        if self.top_p < 1:
            sorted_probs, order = probs.sort(descending=True)
            # keep the smallest prefix whose mass reaches top_p (the first token always stays)
            outside = sorted_probs.cumsum(-1) - sorted_probs >= self.top_p
            outside[0] = False  # a top_p that is 0 in float32 (5e-324) dropped it too: all-zero, 500
            probs = probs.scatter(0, order[outside], 0.0)
        return int(torch.multinomial(probs, 1, generator=self.generator))


class TextStream:
    """Decoded text of a row so far: cut at the first stop string, released in pieces that never
    end inside an unfinished character or a possible start of a stop string."""

    def __init__(self, tokenizer, stop: list[str]):
        self.tokenizer, self.stop = tokenizer, list(stop)
        self.token_ids: list[int] = []
        self.text = ""
        self.released = 0  # characters of text already handed out
        self.stopped = False

    def push(self, token_id: int) -> str:
        """Add a token; returns the text that may be released now."""
        self.token_ids.append(token_id)
        self.text = self.tokenizer.decode(self.token_ids, skip_special_tokens=True)
        hits = [i for i in (self.text.find(s) for s in self.stop) if i >= 0]
        if hits:
            self.text, self.stopped = self.text[: min(hits)], True
            return self.flush()
        safe = len(self.text) - self.held_back()
        piece, self.released = self.text[self.released:safe], max(self.released, safe)
        return piece

    def held_back(self) -> int:
        if self.text.endswith("\ufffd"):  # a multi-byte character still being decoded
            return 1
        return max((n for s in self.stop for n in range(1, len(s)) if self.text.endswith(s[:n])), default=0)

    def flush(self) -> str:
        piece, self.released = self.text[self.released:], len(self.text)
        return piece


def left_pad(prompts: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)  # (batch, seq)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)  # (batch, seq)
    for b, prompt in enumerate(prompts):
        ids[b, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
        mask[b, width - len(prompt):] = 1
    return ids.to(device), mask.to(device)


def positions(mask: torch.Tensor) -> torch.Tensor:
    """Position of each token counted from the row's first real token (padding gets 0)."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


@torch.inference_mode()
def generate_batch(forward: ForwardFn, tokenizer, requests: list[GenerationRequest], *, pad_id: int,
                   eos_ids: set[int], device) -> list[GenerationResult]:
    """Prefill every prompt at once, then decode one token per row per step until each row stops.

    Finished rows keep feeding padding so the batch keeps one shape; they no longer sample.
    The requests must have passed check_request."""
    ids, mask = left_pad([r.prompt_ids for r in requests], pad_id, device)
    pos = positions(mask)
    cache = DynamicCache()
    samplers = [RowSampler(r, device) for r in requests]
    streams = [TextStream(tokenizer, r.stop) for r in requests]
    finish: list[str | None] = [None] * len(requests)
    logits = forward(ids, mask, pos, cache)  # (batch, vocab)
    while True:
        next_ids = []
        for b, request in enumerate(requests):
            if finish[b] is not None:
                next_ids.append(pad_id)
                continue
            token = samplers[b](logits[b])
            next_ids.append(token)
            if token in eos_ids:
                finish[b] = "stop"
                piece = streams[b].flush()
            else:
                piece = streams[b].push(token)
                if streams[b].stopped:
                    finish[b] = "stop"
                elif len(streams[b].token_ids) >= request.max_tokens:
                    finish[b] = "length"
                    piece += streams[b].flush()
            if piece and request.on_token is not None:
                request.on_token(piece)
        if all(f is not None for f in finish):
            break
        mask = torch.cat([mask, torch.ones((len(requests), 1), dtype=mask.dtype, device=device)], dim=1)
        pos = pos[:, -1:] + 1
        logits = forward(torch.tensor(next_ids, device=device)[:, None], mask, pos, cache)
    return [GenerationResult(text=s.text, token_ids=s.token_ids, finish_reason=f, prompt_tokens=len(r.prompt_ids),
                             completion_tokens=len(s.token_ids))
            for r, s, f in zip(requests, streams, finish)]
