"""What a generation row asks for and gets, and the per-row parts of decoding: sampling, stop
strings, streaming text, log-probabilities and token constraints (services/lora/scheduler.py
runs the rows)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch

from services.errors import InvalidRequest
from services.composition import Composition
from services.lora.sampling import GREEDY_BELOW, draw_tokens

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
    response_format: dict | None = None  # the wire form; an engine without own grammars (vLLM) applies it
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
    """Greedy at temperature 0, else nucleus sampling with the row's own seeded generator
    (services/lora/sampling.py draws a step's rows together); logit bias, presence and frequency
    penalties and the row's constraint shape the logits first.
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
        return (self.temperature < GREEDY_BELOW and self.bias is None and self.counts is None
                and self.constraint is None)

    def shaped(self, logits: torch.Tensor) -> torch.Tensor:
        """The logits (vocab,) sampling draws from, in float32 (a copy when anything changes them)."""
        if self.bias is None and self.counts is None and self.constraint is None:
            return logits.float()
        logits = logits.float().clone()
        if self.bias is not None:
            logits += self.bias
        if self.counts is not None:
            logits -= self.presence * (self.counts > 0) + self.frequency * self.counts
        if self.constraint is not None:
            self.constraint.mask(logits)
        return logits

    def __call__(self, logits: torch.Tensor) -> int:  # logits (vocab,)
        return self.draw_rows([self], logits[None])[0]

    @staticmethod
    def draw_rows(samplers: list[RowSampler], logits: torch.Tensor) -> list[int]:
        """One token for each sampler's row, drawn together. logits (len(samplers), vocab)."""
        shaped = torch.stack([s.shaped(row) for s, row in zip(samplers, logits)])  # (R, vocab) float32
        tokens = draw_tokens(shaped, [s.temperature for s in samplers], [s.top_p for s in samplers],
                             [s.generator for s in samplers])
        for sampler, token in zip(samplers, tokens):
            if sampler.counts is not None:
                sampler.counts[token] += 1
            if sampler.constraint is not None:
                sampler.constraint.advance(token)
        return tokens


class TokenLogprobs:
    """Token log-probabilities in the OpenAI shape: the token's text and bytes, its logprob, and
    the k most likely tokens at that position."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._pieces: dict[int, dict] = {}  # token -> {"token", "bytes"}, shared by its entries (never changed)

    def piece(self, token: int) -> dict:
        entry = self._pieces.get(token)
        if entry is None:
            text = self.tokenizer.decode([token])
            entry = self._pieces[token] = {"token": text, "bytes": list(text.encode("utf-8", "replace"))}
        return entry

    def first(self, token: int) -> dict:
        """The entry of a prompt's first token: nothing precedes it."""
        return {**self.piece(token), "logprob": None, "top": []}

    def entries(self, logprobs: torch.Tensor, tokens: list[int], ks: list[int]) -> list[dict]:
        """logprobs (n, vocab): row i is the distribution that produced tokens[i], reported with its
        ks[i] most likely alternatives (one top-k and one host transfer for all n)."""
        index = torch.tensor(tokens, device=logprobs.device)[:, None]  # (n, 1)
        chosen = logprobs.gather(1, index)[:, 0].tolist()
        k = max(ks)
        values, ids = logprobs.topk(k) if k else (logprobs[:, :0], index[:, :0])  # (n, k)
        values, ids = values.tolist(), ids.tolist()
        return [self.entry(token, lp, list(zip(ids[i][:ks[i]], values[i][:ks[i]])))
                for i, (token, lp) in enumerate(zip(tokens, chosen))]

    def entry(self, token: int, logprob: float | None, top: list[tuple[int, float]]) -> dict:
        """One token's entry from its logprob and its alternatives (token, logprob), most likely first."""
        return {**self.piece(token), "logprob": logprob, "top": [{**self.piece(t), "logprob": v} for t, v in top]}

    def span(self, hidden: torch.Tensor, project: ProjectFn, tokens: list[int], k: int) -> list[dict]:
        """Entries of `tokens`, each predicted by the position whose hidden state is the matching row
        of hidden (len(tokens), hidden); projected PROMPT_CHUNK positions at a time."""
        entries = []
        for start in range(0, len(tokens), PROMPT_CHUNK):
            chunk = tokens[start:start + PROMPT_CHUNK]
            logprobs = torch.log_softmax(project(hidden[start:start + PROMPT_CHUNK]).float(), dim=-1)
            entries += self.entries(logprobs, chunk, [k] * len(chunk))
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
