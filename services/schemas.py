"""Pydantic schemas shared by the engines, the deployments and the command line.

One module on purpose: the retrieval engine, the composition engine, the registry and
the HTTP API all speak these types, so a field means the same thing everywhere.
"""
from __future__ import annotations

from enum import Enum

from pydantic import BaseModel, ConfigDict, Field


class Strict(BaseModel):
    """Base for every schema: unknown fields are an error, not silently dropped."""

    model_config = ConfigDict(extra="forbid")


class CardSample(Strict):
    inputs: str = Field(min_length=1)
    targets: str = ""


class AdapterCard(Strict):
    """What the retriever knows of an adapter: a few sample inputs of its task."""

    model_name: str = Field(min_length=1, description="adapter name, unique in a registry")
    sample: list[CardSample] = Field(min_length=1)
    domain: str | None = None


class Query(Strict):
    """One evaluation query; `task` names the adapter that fits it."""

    inputs: str = Field(min_length=1)
    targets: str
    task: str
    domain: str
    metric: str = Field(pattern="^(em|bleu|rouge)$")


class CompositionMode(str, Enum):
    selection = "selection"  # top-1 adapter only
    mixture = "mixture"  # weighted sum of the adapters' outputs
    fusion = "fusion"  # weighted average of A and of B, one low-rank product
    none = "none"  # base model


class Weighting(str, Enum):
    uniform = "uniform"  # 1/k, the paper's default
    softmax = "softmax"  # softmax(score / temperature)


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

    top_k: int | None = Field(None, ge=1, le=16, description="adapters retrieved per prompt")
    composition: CompositionMode | None = None
    weighting: Weighting | None = None
    temperature: float | None = Field(None, gt=0, le=100, description="softmax temperature for weighting=softmax")
    adapters: list[str] | None = Field(None, max_length=16, description="use these adapters (name or name@version); no retrieval")
    exclude: list[str] = Field(default_factory=list, max_length=256, description="never retrieve these adapters")
    min_similarity: float | None = Field(None, ge=-1, le=1, description="below this score no adapter fits")


class SamplingFields(Strict):
    """Fields common to completions and chat completions."""

    model: str = Field(min_length=1, max_length=256, description="'auto', an adapter name, name@version, or the base model")
    max_tokens: int = Field(64, ge=1, description="tokens to generate at most")
    temperature: float = Field(0.0, ge=0, le=2, description="0 = greedy")
    top_p: float = Field(1.0, gt=0, le=1)
    stop: str | list[str] | None = Field(None, description="up to 4 stop strings")
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stream: bool = False
    n: int = Field(1, ge=1, le=1, description="only 1 is supported")
    user: str | None = Field(None, max_length=256)
    lora: LoraOptions = Field(default_factory=LoraOptions)

    def stop_list(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4 or any(not s or len(s) > 256 for s in stops):
            raise ValueError("stop: at most 4 non-empty strings of up to 256 characters")
        return stops


class CompletionRequest(SamplingFields):
    prompt: str | list[str] = Field(description="a prompt, or a list: each retrieved and composed on its own")

    def prompts(self) -> list[str]:
        prompts = [self.prompt] if isinstance(self.prompt, str) else self.prompt
        if not prompts or len(prompts) > MAX_PROMPTS_PER_REQUEST:
            raise ValueError(f"prompt: give 1 to {MAX_PROMPTS_PER_REQUEST} prompts")
        if any(not p or len(p) > MAX_PROMPT_CHARS for p in prompts):
            raise ValueError(f"prompt: every prompt must have 1 to {MAX_PROMPT_CHARS} characters")
        return prompts


class ChatMessage(Strict):
    role: str = Field(pattern="^(system|user|assistant)$")
    content: str = Field(max_length=MAX_PROMPT_CHARS)


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1, max_length=256)

    def retrieval_text(self) -> str:
        """What retrieval embeds: the last user message (the task the user asks for now)."""
        users = [m.content for m in self.messages if m.role == "user"]
        if not users or not users[-1]:
            raise ValueError("messages: the conversation needs a non-empty user message")
        return users[-1]


class RetrieveRequest(Strict):
    input: str | list[str] = Field(description="prompt(s) to retrieve adapters for")
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
    """How one prompt is served: which adapter versions, weights and mode."""

    adapters: list[UsedAdapter] = Field(default_factory=list)
    composition: CompositionMode = CompositionMode.none

    def keys(self) -> list[str]:
        return [f"{a.name}@{a.version}" for a in self.adapters]
