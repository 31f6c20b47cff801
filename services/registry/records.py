"""What the registry stores per adapter: one AdapterRecord (JSON in a Redis hash field)
holding its VersionRecords. Card embeddings live beside it as raw float32 bytes."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from services.registry.errors import AdapterNotFound
from services.schemas import AdapterCard

Visibility = Literal["shared", "private"]


class Canary(BaseModel):
    """A share of requests (by request id, see serving.catalog.canary_bucket) served a non-active version."""

    version: str
    percent: float = Field(gt=0, lt=100, description="share of requests, in percent")
    auto: bool = Field(False, description="promote or roll back on its own (services.rollout.canary)")
    min_requests: int | None = Field(None, ge=1, description="canary requests before the verdict (auto only)")
    forced: bool = Field(False, description="started over a failed quality gate")
    started_at: float | None = Field(None, description="unix time")


class QualityReport(BaseModel):
    """The quality gate's scores of a staged version (services.rollout.quality_gate), 0-100 by `metric`."""

    metric: str = Field(description="em, bleu or rouge (ROUGE-L)")
    samples: int = Field(description="held-out samples scored")
    source: str = Field(description="'held_out' (given with the card) or 'card_split' (held out of the card)")
    version: str
    score: float | None = Field(None, description="the staged version's mean score")
    active_version: str | None = None
    active_score: float | None = None
    base_score: float | None = None
    margin: float = Field(description="how far below the active version's score the version may be")
    passed: bool | None = Field(description="None: not gated (no samples with targets, or scoring failed)")
    reasons: list[str] = Field(default_factory=list, description="why it failed or was not gated")
    centroid_cosine: float | None = Field(None, description="card centroid cosine with the active version's")
    card_moved: bool = Field(False, description="centroid cosine below the threshold: retrieval will change")
    seconds: float = Field(0.0, description="wall time of the gate")

    def summary(self) -> str:
        """One line with the numbers, for messages and the audit log."""
        def num(value: float | None) -> str:
            return "-" if value is None else f"{value:.1f}"

        active = f"active {self.active_version} {num(self.active_score)}, " if self.active_version else ""
        verdict = {True: "passed", False: "failed", None: "not gated"}[self.passed]
        moved = f"; card centroid cosine {self.centroid_cosine:.3f} (moved)" if self.card_moved else ""
        why = f" ({'; '.join(self.reasons)})" if self.reasons else ""
        return (f"quality gate {verdict}{why}: {self.metric} on {self.samples} {self.source} samples: "
                f"{self.version} {num(self.score)}, {active}base {num(self.base_score)}{moved}")


class VersionRecord(BaseModel):
    version: str = Field(description="'v1', 'v2', ...: never reused for the same adapter name")
    checksum: str = Field(description="sha256 of adapter_config.json and the weights file")
    rank: int
    scaling: float = Field(description="lora_alpha / r (or / sqrt(r) with rslora)")
    target_modules: list[str]
    created_at: float = Field(description="unix time")
    created_by: str = Field(description="the actor that added it")
    path: str = Field(description="the version folder in the adapter store (as `uri` for object storage)")
    uri: str | None = Field(None, description="where the files live: file:///... (the folder store), "
                            "s3://bucket/prefix/... (a bucket store, or files registered where they are); "
                            "None in records written before versions had URIs (the folder store)")
    card: AdapterCard
    embedding_shape: tuple[int, int] = Field(description="(card samples, embedding dim)")
    embedding_dtype: Literal["float32"] = "float32"
    quality: QualityReport | None = Field(None, description="the quality gate's report (versions added staged)")


class AdapterRecord(BaseModel):
    name: str
    base_model: str
    domain: str | None = Field(None, description="the active (else newest) version's card domain")
    owner_tenant: str | None = None
    visibility: Visibility = "shared"
    active_version: str | None = Field(None, description="served for plain 'name'; None = not served")
    versions: dict[str, VersionRecord] = Field(default_factory=dict)
    canary: Canary | None = None
    pinned: bool = Field(False, description="composer replicas keep it resident")
    previous_active: list[str] = Field(default_factory=list, description="earlier active versions, newest last")
    last_verdict: str | None = Field(None, description="the last automatic canary verdict, with its numbers")
    created_at: float
    updated_at: float

    def visible_to(self, tenant: str | None) -> bool:
        return self.visibility == "shared" or (tenant is not None and self.owner_tenant == tenant)

    def version(self, version: str) -> VersionRecord:
        if version not in self.versions:
            raise AdapterNotFound(f"adapter '{self.name}' has no version '{version}' "
                                  f"(versions: {', '.join(self.versions) or 'none'})")
        return self.versions[version]
