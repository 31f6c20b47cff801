"""Pydantic schemas shared by the engines, the deployments and the command line.

One module on purpose: the retrieval engine, the composition engine, the registry and
the HTTP API all speak these types, so a field means the same thing everywhere.
"""
from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

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
    composition: CompositionMode | None = None
    weighting: Weighting | None = None
    temperature: float | None = Field(None, gt=0, le=100, allow_inf_nan=False, description="softmax temperature for weighting=softmax")
    adapters: list[Text] | None = Field(None, max_length=16, description="use these adapters (name or name@version); no retrieval")
    exclude: list[Text] = Field(default_factory=list, max_length=256, description="never retrieve these adapters")
    min_similarity: float | None = Field(None, ge=-1, le=1, allow_inf_nan=False, description="below this score no adapter fits")


class SamplingFields(Strict):
    """Fields common to completions and chat completions."""

    model: Text = Field(min_length=1, max_length=256, description="'auto', an adapter name, name@version, or the base model")
    max_tokens: int = Field(64, ge=1, strict=True, description="tokens to generate at most")
    temperature: float = Field(0.0, ge=0, le=2, allow_inf_nan=False, description="0 = greedy")
    top_p: float = Field(1.0, gt=0, le=1, allow_inf_nan=False)
    stop: Text | list[Text] | None = Field(None, description="up to 4 stop strings")
    seed: int | None = Field(None, ge=0, le=2**63 - 1, strict=True)
    stream: bool = Field(False, strict=True)
    n: int = Field(1, ge=1, le=1, strict=True, description="only 1 is supported")
    user: Text | None = Field(None, max_length=256)
    lora: LoraOptions = Field(default_factory=LoraOptions)

    def stop_list(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4 or any(not s or len(s) > 256 for s in stops):
            raise ValueError("stop: at most 4 non-empty strings of up to 256 characters")
        return stops


class CompletionRequest(SamplingFields):
    prompt: Text | list[Text] = Field(description="a prompt, or a list: each retrieved and composed on its own")

    def prompts(self) -> list[str]:
        prompts = [self.prompt] if isinstance(self.prompt, str) else self.prompt
        if not prompts or len(prompts) > MAX_PROMPTS_PER_REQUEST:
            raise ValueError(f"prompt: give 1 to {MAX_PROMPTS_PER_REQUEST} prompts")
        if any(not p or len(p) > MAX_PROMPT_CHARS for p in prompts):
            raise ValueError(f"prompt: every prompt must have 1 to {MAX_PROMPT_CHARS} characters")
        return prompts


class ChatMessage(Strict):
    role: str = Field(pattern="^(system|user|assistant)$")
    content: Text = Field(max_length=MAX_PROMPT_CHARS)


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1, max_length=256)

    def retrieval_text(self) -> str:
        """What retrieval embeds: the last user message (the task the user asks for now)."""
        users = [m.content for m in self.messages if m.role == "user"]
        if not users or not users[-1]:
            raise ValueError("messages: the conversation needs a non-empty user message")
        return users[-1]


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

    def keys(self) -> list[str]:
        return [str(AdapterKey(a.name, a.version)) for a in self.adapters]

    def to_composition(self) -> Composition:
        """The composition the engine applies."""
        return Composition.of(self.composition, self.keys(), [a.weight for a in self.adapters])
