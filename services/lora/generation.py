"""What a generation row asks for and gets, and the per-row parts of decoding: sampling, stop
strings, streaming text, log-probabilities and token constraints (services/lora/scheduler.py
runs the rows)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch

from services.errors import InvalidRequest
from services.composition import Composition

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
    ignore_eos: bool = False  # run to max_tokens (or a stop string): benchmarks compare equal lengths
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

    @property
    def plain(self) -> bool:
        """Greedy with nothing shaping the logits: the scheduler batches these rows' argmax."""
        return (self.temperature < torch.finfo(torch.float32).tiny and self.bias is None and self.counts is None
                and self.constraint is None)

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

    def span(self, hidden: torch.Tensor, project: ProjectFn, tokens: list[int], k: int) -> list[dict]:
        """Entries of `tokens`, each predicted by the position whose hidden state is the matching row
        of hidden (len(tokens), hidden); projected PROMPT_CHUNK positions at a time."""
        entries = []
        for start in range(0, len(tokens), PROMPT_CHUNK):
            logprobs = torch.log_softmax(project(hidden[start:start + PROMPT_CHUNK]).float(), dim=-1)
            entries += [self.entry(lp, t, k) for lp, t in zip(logprobs, tokens[start:start + PROMPT_CHUNK])]
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
