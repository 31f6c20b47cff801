"""Pydantic schemas shared by the engines, the deployments and the command line.

One module on purpose: the retrieval engine, the composition engine, the registry and
the HTTP API all speak these types, so a field means the same thing everywhere.
"""
from __future__ import annotations

import json
from typing import Annotated, ClassVar, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from services.composition import AdapterKey, Composition, CompositionMode, Weighting


class Strict(BaseModel):
    """Base for every schema: unknown fields are an error, not silently dropped."""

    model_config = ConfigDict(extra="forbid")


def valid_unicode(value: str) -> str:
    """Refuse lone surrogates: "\\ud800" is valid JSON but no tokenizer can encode it, and one such
    prompt in a batched embedding call used to fail every request of that batch (500s)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("text must be valid Unicode (it holds a lone surrogate code point)") from None
    return value


Text = Annotated[str, AfterValidator(valid_unicode)]  # every string a client sends that reaches a tokenizer


class CardSample(Strict):
    inputs: Text = Field(min_length=1)
    targets: Text = ""


class AdapterCard(Strict):
    """What the retriever knows of an adapter: a few sample inputs of its task."""

    model_name: Text = Field(min_length=1, description="adapter name, unique in a registry")
    sample: list[CardSample] = Field(min_length=1, max_length=1024)
    domain: Text | None = None


class Query(Strict):
    """One evaluation query; `task` names the adapter that fits it."""

    inputs: str = Field(min_length=1)
    targets: str
    task: str
    domain: str
    metric: str = Field(pattern="^(em|bleu|rouge)$")


class RetrievedAdapter(Strict):
    name: str
    score: float = Field(description="cosine similarity to the prompt")
    version: str | None = None


class RetrievalResult(Strict):
    adapters: list[RetrievedAdapter] = Field(description="best first; empty = no adapter fits")


# ---------------------------------------------------------------------------
# HTTP API (OpenAI-compatible, plus the `lora` extension object)
# ---------------------------------------------------------------------------

MAX_PROMPTS_PER_REQUEST = 64
MAX_PROMPT_CHARS = 32_000


class LoraOptions(Strict):
    """The `lora` extension object of a request body; every field overrides a server default."""

    # strict ints: `true` or "3" is a wrong type (400), not silently 1 or 3; floats refuse NaN and inf.
    top_k: int | None = Field(None, ge=1, le=16, strict=True, description="adapters retrieved per prompt")
    composition: CompositionMode | Literal["auto"] | None = Field(
        None, description="auto: decided per prompt from retrieval scores and adapter compatibility")
    weighting: Weighting | None = None
    temperature: float | None = Field(None, gt=0, le=100, allow_inf_nan=False, description="softmax temperature for weighting=softmax")
    adapters: list[Text] | None = Field(None, max_length=16, description="use these adapters (name or name@version); no retrieval")
    exclude: list[Text] = Field(default_factory=list, max_length=256, description="never retrieve these adapters")
    min_similarity: float | None = Field(None, ge=-1, le=1, allow_inf_nan=False, description="below this score no adapter fits")


class Lenient(BaseModel):
    """Base of the OpenAI request bodies: a field this server does not know is accepted and named
    back to the caller (`ignored_fields`, sent as the X-Ignored-Fields header), as clients send
    fields of newer API versions; the fields it knows keep strict types."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)

    def ignored_fields(self, prefix: str = "") -> list[str]:
        """Unknown fields here and in nested request objects, as dotted paths."""
        names = [f"{prefix}{key}" for key in (self.model_extra or {})]
        for name in type(self).model_fields:
            value = getattr(self, name)
            items = value if isinstance(value, list) else [value]
            for i, item in enumerate(items):
                if isinstance(item, Lenient):
                    where = f"{prefix}{name}[{i}]." if isinstance(value, list) else f"{prefix}{name}."
                    names += item.ignored_fields(where)
        return names


class Unsupported(ValueError):
    """A known field asking for something this server does not do: refused (400) naming the field."""

    def __init__(self, param: str, why: str):
        super().__init__(f"{param}: {why}")
        self.param = param


MAX_N = 16
MAX_LOGIT_BIAS = 300
MAX_SCHEMA_CHARS = 64_000


class StreamOptions(Lenient):
    include_usage: bool | None = Field(None, strict=True, description="a last chunk with the usage and no choices")


class JsonSchemaFormat(Lenient):
    name: Text = Field(min_length=1, max_length=64)
    description: Text | None = None
    json_schema: dict | None = Field(None, alias="schema", description="the JSON schema the answer must satisfy")
    strict: bool | None = Field(None, strict=True, description="always enforced (constrained decoding)")


class ResponseFormat(Lenient):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> "ResponseFormat":
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("type json_schema needs a json_schema object")
        if self.json_schema is not None and len(json.dumps(self.json_schema.json_schema)) > MAX_SCHEMA_CHARS:
            raise ValueError(f"the JSON schema may have at most {MAX_SCHEMA_CHARS} characters")
        return self

    def wire(self) -> dict | None:
        """What the composer compiles: {"type", "json_schema": {"schema"}}; None for plain text."""
        return None if self.type == "text" else self.model_dump(by_alias=True, exclude_none=True)


class SamplingFields(Lenient):
    """Fields common to completions and chat completions."""

    model: Text = Field(min_length=1, max_length=256, description="'auto', an adapter name, name@version, or the base model")
    max_tokens: int | None = Field(None, ge=0, strict=True, description="tokens to generate at most (default 64)")
    temperature: float = Field(0.0, ge=0, le=2, allow_inf_nan=False, description="0 = greedy")
    top_p: float = Field(1.0, gt=0, le=1, allow_inf_nan=False)
    stop: Text | list[Text] | None = Field(None, description="up to 4 stop strings")
    seed: int | None = Field(None, ge=0, le=2**63 - 1, strict=True, description="row j of n samples with seed + j")
    stream: bool = Field(False, strict=True)
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=MAX_N, strict=True, description="answers per prompt, rows of the same batch")
    presence_penalty: float = Field(0.0, ge=-2, le=2, allow_inf_nan=False)
    frequency_penalty: float = Field(0.0, ge=-2, le=2, allow_inf_nan=False)
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100, allow_inf_nan=False)]] | None = Field(
        None, description="token id (as a string) -> added to its logit before sampling")
    response_format: ResponseFormat | None = Field(None, description="json_object or json_schema: constrained decoding")
    user: Text | None = Field(None, max_length=256, description="accepted; not used")
    metadata: dict[str, str] | None = Field(None, description="accepted; not stored")
    store: bool | None = Field(None, strict=True, description="accepted; nothing is stored")
    service_tier: str | None = Field(None, description="accepted; one tier")
    lora: LoraOptions = Field(default_factory=LoraOptions)

    DEFAULT_MAX_TOKENS: ClassVar[int] = 64

    def stop_list(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4 or any(not s or len(s) > 256 for s in stops):
            raise ValueError("stop: at most 4 non-empty strings of up to 256 characters")
        return stops

    def token_limit(self) -> int:
        return self.DEFAULT_MAX_TOKENS if self.max_tokens is None else self.max_tokens

    def bias(self) -> dict[int, float]:
        """logit_bias with integer token ids (the range is checked where the vocabulary is known)."""
        bias = self.logit_bias or {}
        if len(bias) > MAX_LOGIT_BIAS:
            raise Unsupported("logit_bias", f"at most {MAX_LOGIT_BIAS} tokens")
        if not all(key.isdigit() and len(key) <= 9 for key in bias):
            raise Unsupported("logit_bias", "keys must be token ids (non-negative integers as strings)")
        return {int(key): value for key, value in bias.items()}

    def check_supported(self) -> None:
        """Raise Unsupported for a known field whose request this server cannot honour."""
        if self.max_tokens == 0 and not self.prompt_logprobs():
            raise Unsupported("max_tokens", "must be at least 1 (0 only for a completion with echo and logprobs)")

    def prompt_logprobs(self) -> bool:
        return False

    def top_logprobs_count(self) -> int | None:
        """None: no logprobs; k: each token's logprob and its k most likely alternatives."""
        return None


class CompletionRequest(SamplingFields):
    prompt: Text | list[Text] = Field(description="a prompt, or a list: each retrieved and composed on its own")
    echo: bool = Field(False, strict=True, description="the prompt precedes the completion (and its logprobs)")
    logprobs: int | None = Field(None, ge=0, le=20, strict=True, description="logprobs of each token and its k best alternatives")
    best_of: int | None = Field(None, ge=1, le=MAX_N, strict=True, description="only 1 (or n): candidates are not ranked")
    suffix: Text | None = Field(None, description="refused when set: insertion is not supported")

    def prompts(self) -> list[str]:
        prompts = [self.prompt] if isinstance(self.prompt, str) else self.prompt
        if not prompts or len(prompts) > MAX_PROMPTS_PER_REQUEST:
            raise ValueError(f"prompt: give 1 to {MAX_PROMPTS_PER_REQUEST} prompts")
        if any(not p or len(p) > MAX_PROMPT_CHARS for p in prompts):
            raise ValueError(f"prompt: every prompt must have 1 to {MAX_PROMPT_CHARS} characters")
        if len(prompts) * self.n > MAX_PROMPTS_PER_REQUEST:
            raise ValueError(f"prompt: prompts times n may be at most {MAX_PROMPTS_PER_REQUEST}")
        return prompts

    def check_supported(self) -> None:
        super().check_supported()
        if self.best_of is not None and self.best_of != self.n:
            raise Unsupported("best_of", "ranking candidates by likelihood is not supported; ask for n answers")
        if self.suffix:
            raise Unsupported("suffix", "insertion (text after the completion) is not supported by this model")
        if self.stream and self.echo and self.logprobs is not None:
            raise Unsupported("echo", "prompt logprobs are not streamed; send stream: false")

    def prompt_logprobs(self) -> bool:
        return self.echo and self.logprobs is not None

    def top_logprobs_count(self) -> int | None:
        return self.logprobs


class ContentPart(Lenient):
    """One part of a message's content; only text parts (the model reads text)."""

    type: str = Field(max_length=64)
    text: Text | None = Field(None, max_length=MAX_PROMPT_CHARS)

    @model_validator(mode="after")
    def _text_only(self) -> "ContentPart":
        if self.type != "text":
            raise ValueError(f"content part type '{self.type}' is not supported: the model reads text parts only")
        if self.text is None:
            raise ValueError("a text part needs its 'text'")
        return self


CHAT_ROLES = ("system", "developer", "user", "assistant")


class ChatMessage(Lenient):
    role: str = Field(max_length=32, description="system, developer (read as system), user or assistant")
    content: Text | list[ContentPart] | None = Field(None, max_length=MAX_PROMPT_CHARS)
    name: Text | None = Field(None, max_length=256, description="accepted; the chat template has no place for it")
    tool_calls: list[dict] | None = Field(None, description="refused when not empty: no tools")
    refusal: Text | None = Field(None, description="accepted; not shown to the model")

    @model_validator(mode="after")
    def _known_role(self) -> "ChatMessage":
        if self.role in ("tool", "function"):
            raise ValueError(f"role '{self.role}' is not supported: tool calling is not supported")
        if self.role not in CHAT_ROLES:
            raise ValueError(f"role must be one of {', '.join(CHAT_ROLES)}")
        if self.tool_calls:
            raise ValueError("tool_calls: tool calling is not supported")
        if len(self.text()) > MAX_PROMPT_CHARS:
            raise ValueError(f"content may have at most {MAX_PROMPT_CHARS} characters")
        return self

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text or "" for part in self.content)
        return self.content or ""

    def template_turn(self) -> dict:
        """The turn the chat template reads: developer instructions are the system turn."""
        return {"role": "system" if self.role == "developer" else self.role, "content": self.text()}


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1, max_length=256)
    max_completion_tokens: int | None = Field(None, ge=1, strict=True, description="the same as max_tokens")
    logprobs: bool | None = Field(None, strict=True, description="logprobs of each generated token")
    top_logprobs: int | None = Field(None, ge=0, le=20, strict=True, description="alternatives per token (needs logprobs)")
    tools: list[dict] | None = Field(None, description="refused when not empty: tool calling is not supported")
    tool_choice: str | dict | None = Field(None, description="'none' or 'auto' (no tools to call); others refused")
    parallel_tool_calls: bool | None = Field(None, strict=True, description="accepted; no tools")
    functions: list[dict] | None = Field(None, description="refused when not empty")
    function_call: str | dict | None = Field(None, description="'none' or 'auto'; others refused")
    modalities: list[str] | None = Field(None, description="only ['text']")
    audio: dict | None = Field(None, description="refused: text only")
    prediction: dict | None = Field(None, description="accepted; does not change the answer")
    reasoning_effort: str | None = Field(None, description="accepted; the model does not reason apart")
    verbosity: str | None = Field(None, description="accepted; not used")
    web_search_options: dict | None = Field(None, description="refused: no web search")
    prompt_cache_key: str | None = Field(None, description="accepted; not used")
    safety_identifier: str | None = Field(None, description="accepted; not used")

    def retrieval_text(self) -> str:
        """What retrieval embeds: the last user message (the task the user asks for now)."""
        users = [m.text() for m in self.messages if m.role == "user"]
        if not users or not users[-1]:
            raise ValueError("messages: the conversation needs a non-empty user message")
        return users[-1]

    def token_limit(self) -> int:
        return self.max_completion_tokens if self.max_completion_tokens is not None else super().token_limit()

    def check_supported(self) -> None:
        super().check_supported()
        if self.max_tokens == 0:
            raise Unsupported("max_tokens", "must be at least 1")
        if self.max_completion_tokens is not None and self.max_tokens not in (None, self.max_completion_tokens):
            raise Unsupported("max_completion_tokens", "differs from max_tokens; give one of them")
        if self.tools:
            raise Unsupported("tools", "tool calling is not supported (the model has no tool-call format)")
        if self.functions:
            raise Unsupported("functions", "function calling is not supported")
        for param, value in (("tool_choice", self.tool_choice), ("function_call", self.function_call)):
            if value not in (None, "none", "auto"):
                raise Unsupported(param, "no tool can be called; only 'none' or 'auto' are accepted")
        if self.modalities is not None and set(self.modalities) - {"text"}:
            raise Unsupported("modalities", "only text output is supported")
        if self.audio is not None:
            raise Unsupported("audio", "only text output is supported")
        if self.web_search_options is not None:
            raise Unsupported("web_search_options", "web search is not supported")
        if self.top_logprobs is not None and not self.logprobs:
            raise Unsupported("top_logprobs", "needs logprobs: true")

    def top_logprobs_count(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class ErrorDetail(Strict):
    message: str
    type: str = Field(description="invalid_request_error, authentication_error, permission_error, not_found_error, ...")
    param: str | None = Field(None, description="the request field at fault, when one is")
    code: str | None = None


class ErrorResponse(Strict):
    """Every 4xx and 5xx body of the HTTP API (the OpenAI error shape)."""

    error: ErrorDetail


class RetrieveRequest(Strict):
    input: Text | list[Text] = Field(description="prompt(s) to retrieve adapters for")
    lora: LoraOptions = Field(default_factory=LoraOptions)

    def prompts(self) -> list[str]:
        return CompletionRequest(model="auto", prompt=self.input).prompts()


class UsedAdapter(Strict):
    """One adapter a response was generated with."""

    name: str
    version: str
    weight: float
    score: float | None = Field(None, description="retrieval similarity; None when named explicitly")


class CompositionPlan(Strict):
    """How one prompt is served: which adapter versions, weights and mode (with retrieval scores).
    The wire form, between ingress and composer and in every answer's `lora` field, of a
    services.composition.Composition over `name@version` keys."""

    adapters: list[UsedAdapter] = Field(default_factory=list)
    composition: CompositionMode = CompositionMode.none
    decision: dict | None = Field(None, description="composition auto: what was decided and why, and the family evidence")

    def keys(self) -> list[str]:
        return [str(AdapterKey(a.name, a.version)) for a in self.adapters]

    def to_composition(self) -> Composition:
        """The composition the engine applies."""
        return Composition.of(self.composition, self.keys(), [a.weight for a in self.adapters])
