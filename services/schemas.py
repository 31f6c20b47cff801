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
