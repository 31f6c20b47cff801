"""Batched generation over one KV cache: left padding, per-row sampling, stop strings, streaming,
log-probabilities of the prompt and of each sampled token, and per-row token constraints."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch
from transformers import DynamicCache

from services.errors import InvalidRequest
from services.composition import Composition

# logits (batch, vocab) of the last position, or with all_positions=True the final hidden states
# (batch, seq, hidden) of every position, for input_ids (batch, seq) with the cache so far
ForwardFn = Callable[..., torch.Tensor]
ProjectFn = Callable[[torch.Tensor], torch.Tensor]  # hidden states (..., hidden) -> logits (..., vocab)
PROMPT_CHUNK = 128  # prompt positions projected to logits at a time

MAX_TOP_LOGPROBS = 20


class TokenConstraint(Protocol):
    """Which tokens a row may take next (a grammar); services/lora/structured.py makes them."""

    def mask(self, logits: torch.Tensor) -> None:
        """Set the logits (vocab,) of tokens the constraint forbids now to -inf, in place."""

    def advance(self, token: int) -> None:
        """The row took `token`."""


@dataclass
class GenerationRequest:
    prompt_ids: list[int]
    composition: Composition = Composition()  # adapters by pool key; the default is the base model
    max_tokens: int = 64  # 0: only the prompt is read (prompt logprobs)
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    stop: list[str] = ()
    seed: int | None = None
    presence_penalty: float = 0.0  # subtracted once from every token already generated
    frequency_penalty: float = 0.0  # subtracted per time a token was generated
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit
    logprobs: int | None = None  # None: none; k: each sampled token's logprob and the k most likely
    prompt_logprobs: bool = False  # the prompt's tokens' logprobs too (with `logprobs` alternatives)
    constraint: TokenConstraint | None = None
    on_token: Callable[[str | dict], None] | None = None  # each new text piece (a dict when logprobs)


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" | "length"
    prompt_tokens: int
    completion_tokens: int
    # Each {"token", "bytes", "logprob", "top": [{"token", "bytes", "logprob"}]}; the prompt's first
    # token has logprob None (nothing precedes it).
    logprobs: list[dict] | None = None
    prompt_logprobs: list[dict] | None = None
    # Set by the serving batcher: seconds waiting for a batch, and the batch's own run time.
    queue_seconds: float = 0.0
    batch_seconds: float = 0.0


class GenerationError(InvalidRequest):
    """A request whose sampling fields cannot be honoured."""


def check_request(request: GenerationRequest, vocab_size: int | None = None) -> None:
    if not request.prompt_ids:
        raise GenerationError("prompt_ids must hold at least one token", param="prompt")
    if request.max_tokens < 0 or (request.max_tokens == 0 and not request.prompt_logprobs):
        raise GenerationError(f"max_tokens={request.max_tokens} must be at least 1 (0 only with echo and logprobs)",
                              param="max_tokens")
    if request.temperature < 0 or not 0 < request.top_p <= 1:
        raise GenerationError(f"temperature={request.temperature} must be >= 0 and top_p={request.top_p} in (0, 1]")
    if any(not s for s in request.stop):
        raise GenerationError("stop strings must be non-empty", param="stop")
    if request.logprobs is not None and not 0 <= request.logprobs <= MAX_TOP_LOGPROBS:
        raise GenerationError(f"at most {MAX_TOP_LOGPROBS} alternatives per token", param="logprobs")
    if vocab_size is not None and any(not 0 <= t < vocab_size for t in request.logit_bias):
        raise GenerationError(f"logit_bias: token ids must be in [0, {vocab_size})", param="logit_bias")


class RowSampler:
    """Greedy at temperature 0, else nucleus sampling with the row's own seeded generator; logit
    bias, presence and frequency penalties and the row's constraint shape the logits first.
    Reported logprobs are the model's own (log-softmax of the composed model's logits, before
    bias, penalties, constraint and temperature), as OpenAI and vLLM report them."""

    def __init__(self, request: GenerationRequest, device, vocab: int | None = None):
        self.temperature, self.top_p = request.temperature, request.top_p
        self.presence, self.frequency = request.presence_penalty, request.frequency_penalty
        self.constraint = request.constraint
        self.generator = torch.Generator(device=device)
        if request.seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(request.seed)
        self.bias = None
        if request.logit_bias and vocab is not None:
            self.bias = torch.zeros(vocab, device=device)
            self.bias[list(request.logit_bias)] = torch.tensor(list(request.logit_bias.values()), device=device)
        self.counts = torch.zeros(vocab, device=device) if vocab is not None and (self.presence or self.frequency) \
            else None

    def shaped(self, logits: torch.Tensor) -> torch.Tensor:
        """The logits sampling draws from (a copy when anything changes them)."""
        if self.bias is None and self.counts is None and self.constraint is None:
            return logits
        logits = logits.float().clone()
        if self.bias is not None:
            logits += self.bias
        if self.counts is not None:
            logits -= self.presence * (self.counts > 0) + self.frequency * self.counts
        if self.constraint is not None:
            self.constraint.mask(logits)
        return logits

    def __call__(self, logits: torch.Tensor) -> int:  # logits (vocab,)
        token = self.draw(self.shaped(logits))
        if self.counts is not None:
            self.counts[token] += 1
        if self.constraint is not None:
            self.constraint.advance(token)
        return token

    def draw(self, logits: torch.Tensor) -> int:
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


class TokenLogprobs:
    """Token log-probabilities in the OpenAI shape: the token's text and bytes, its logprob, and
    the k most likely tokens at that position."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._pieces: dict[int, str] = {}

    def piece(self, token: int) -> dict:
        text = self._pieces.get(token)
        if text is None:
            text = self._pieces[token] = self.tokenizer.decode([token])
        return {"token": text, "bytes": list(text.encode("utf-8", "replace"))}

    def entry(self, logprobs: torch.Tensor | None, token: int, k: int) -> dict:
        """logprobs (vocab,) of the position that produced `token`; None for a first prompt token."""
        if logprobs is None:
            return {**self.piece(token), "logprob": None, "top": []}
        top = []
        if k:
            values, ids = logprobs.topk(k)
            top = [{**self.piece(int(i)), "logprob": float(v)} for v, i in zip(values, ids)]
        return {**self.piece(token), "logprob": float(logprobs[token]), "top": top}

    def prompt(self, hidden: torch.Tensor, project: ProjectFn, prompt: list[int], k: int) -> list[dict]:
        """hidden (len(prompt), hidden) of the row's own prompt positions; projected in chunks."""
        entries = [self.entry(None, prompt[0], 0)]
        for start in range(0, len(prompt) - 1, PROMPT_CHUNK):
            logprobs = torch.log_softmax(project(hidden[start:start + PROMPT_CHUNK]).float(), dim=-1)
            entries += [self.entry(lp, t, k) for lp, t in zip(logprobs, prompt[start + 1:start + 1 + PROMPT_CHUNK])]
        return entries


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
                   eos_ids: set[int], device, project: ProjectFn | None = None) -> list[GenerationResult]:
    """Prefill every prompt at once, then decode one token per row per step until each row stops.

    Finished rows keep feeding padding so the batch keeps one shape; they no longer sample.
    The requests must have passed check_request."""
    ids, mask = left_pad([r.prompt_ids for r in requests], pad_id, device)
    pos = positions(mask)
    cache = DynamicCache()
    streams = [TextStream(tokenizer, r.stop) for r in requests]
    lp = TokenLogprobs(tokenizer)
    finish: list[str | None] = ["length" if r.max_tokens == 0 else None for r in requests]
    prompt_lps: list[list[dict] | None] = [None] * len(requests)
    if any(r.prompt_logprobs for r in requests):  # needs `project`
        hidden = forward(ids, mask, pos, cache, all_positions=True)  # (batch, seq, hidden)
        for b, r in enumerate(requests):
            if r.prompt_logprobs:
                prompt_lps[b] = lp.prompt(hidden[b, ids.shape[1] - len(r.prompt_ids):], project, r.prompt_ids,
                                          r.logprobs or 0)
        logits = project(hidden[:, -1])  # (batch, vocab)
    else:
        logits = forward(ids, mask, pos, cache)  # (batch, vocab)
    samplers = [RowSampler(r, device, logits.shape[-1]) for r in requests]
    token_lps: list[list[dict] | None] = [[] if r.logprobs is not None else None for r in requests]
    unsent: list[list[dict]] = [[] for _ in requests]  # logprobs not streamed yet
    while not all(f is not None for f in finish):
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
                if token_lps[b] is not None:
                    entry = lp.entry(torch.log_softmax(logits[b].float(), dim=-1), token, request.logprobs)
                    token_lps[b].append(entry)
                    unsent[b].append(entry)
                piece = streams[b].push(token)
                if streams[b].stopped:
                    finish[b] = "stop"
                elif len(streams[b].token_ids) >= request.max_tokens:
                    finish[b] = "length"
                    piece += streams[b].flush()
            if request.on_token is not None and (piece or (finish[b] and unsent[b])):
                if token_lps[b] is None:
                    request.on_token(piece)
                else:
                    request.on_token({"text": piece, "logprobs": unsent[b]})
                    unsent[b] = []
        if all(f is not None for f in finish):
            break
        mask = torch.cat([mask, torch.ones((len(requests), 1), dtype=mask.dtype, device=device)], dim=1)
        pos = pos[:, -1:] + 1
        logits = forward(torch.tensor(next_ids, device=device)[:, None], mask, pos, cache)
    return [GenerationResult(text=s.text, token_ids=s.token_ids, finish_reason=f, prompt_tokens=len(r.prompt_ids),
                             completion_tokens=len(s.token_ids), logprobs=t, prompt_logprobs=p)
            for r, s, f, t, p in zip(requests, streams, finish, token_lps, prompt_lps)]
