"""Structured output: `response_format` json_object / json_schema as a per-row token constraint.

llguidance compiles the JSON schema lazily (no index over the vocabulary is built up front, so any
schema costs the same to start) and computes each step's allowed-token mask in Rust; the sampler
sets the other tokens' logits to -inf (services/lora/generation.py RowSampler). The measured cost
per token against outlines-core is in docs/api.md (cluster/bench/structured.py).
"""
from __future__ import annotations

import json
import threading

import llguidance
import llguidance.hf
import numpy as np
import torch

from services.errors import InvalidRequest

# Compact JSON: no free whitespace between tokens, so a weak model cannot spend its whole budget on
# spaces and newlines inside an object.
COMPILE_OPTIONS = {"whitespace_flexible": False}
ANY_OBJECT = {"type": "object"}


def schema_of(response_format: dict) -> dict | None:
    """The JSON schema a response_format asks for; None for plain text."""
    kind = response_format.get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return ANY_OBJECT
    if kind == "json_schema":
        return response_format["json_schema"].get("schema") or ANY_OBJECT
    raise InvalidRequest(f"response_format type '{kind}' is not supported (text, json_object, json_schema)",
                         param="response_format")


class JsonConstraint:
    """One row's matcher: masks the logits with the grammar's allowed tokens, advances on each token."""

    def __init__(self, matcher: llguidance.LLMatcher, vocab: int, eos: int):
        self.matcher, self.vocab, self.eos = matcher, vocab, eos

    def mask(self, logits: torch.Tensor) -> None:
        bits = np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint8)
        allowed = np.unpackbits(bits, bitorder="little")[: logits.shape[-1]]
        if not allowed.any():  # the grammar is done (or broken): only end of text, never an all -inf row
            allowed[self.eos] = 1
        forbidden = torch.from_numpy(allowed == 0)
        if forbidden.shape[0] < logits.shape[-1]:  # logits past the tokenizer's vocabulary
            forbidden = torch.cat([forbidden, torch.ones(logits.shape[-1] - forbidden.shape[0], dtype=torch.bool)])
        logits.masked_fill_(forbidden.to(logits.device), float("-inf"))

    def advance(self, token: int) -> None:
        self.matcher.consume_token(token)  # a refused token (never sampled: masked) leaves it in error


class JsonGrammars:
    """Compiles response formats for one tokenizer; the tokenizer's wrapper (about 1 s) is made once."""

    def __init__(self, tokenizer, vocab: int):
        self.tokenizer, self.vocab = tokenizer, vocab
        self._lltok: llguidance.LLTokenizer | None = None
        self._lock = threading.Lock()

    def lltokenizer(self) -> llguidance.LLTokenizer:
        with self._lock:
            if self._lltok is None:
                self._lltok = llguidance.hf.from_tokenizer(self.tokenizer, n_vocab=self.vocab)
            return self._lltok

    def constraint(self, response_format: dict | None) -> JsonConstraint | None:
        schema = schema_of(response_format or {})
        if schema is None:
            return None
        try:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults=COMPILE_OPTIONS)
        except (ValueError, TypeError) as err:
            raise InvalidRequest(f"response_format: the JSON schema cannot be compiled: {err}",
                                 param="response_format") from None
        try:
            matcher = llguidance.LLMatcher(self.lltokenizer(), grammar, log_level=0)
        except (ValueError, TypeError, RuntimeError) as err:
            raise InvalidRequest(f"response_format: the JSON schema cannot be used: {str(err)[:300]}",
                                 param="response_format") from None
        if matcher.is_error():
            raise InvalidRequest(f"response_format: the JSON schema cannot be used: {matcher.get_error()[:300]}",
                                 param="response_format")
        return JsonConstraint(matcher, self.vocab, self.tokenizer.eos_token_id)
