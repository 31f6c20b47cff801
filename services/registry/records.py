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


class VersionRecord(BaseModel):
    version: str = Field(description="'v1', 'v2', ...: never reused for the same adapter name")
    checksum: str = Field(description="sha256 of adapter_config.json and the weights file")
    rank: int
    scaling: float = Field(description="lora_alpha / r (or / sqrt(r) with rslora)")
    target_modules: list[str]
    created_at: float = Field(description="unix time")
    created_by: str = Field(description="the actor that added it")
    path: str = Field(description="the version folder in the adapter store")
    card: AdapterCard
    embedding_shape: tuple[int, int] = Field(description="(card samples, embedding dim)")
    embedding_dtype: Literal["float32"] = "float32"


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
    created_at: float
    updated_at: float

    def visible_to(self, tenant: str | None) -> bool:
        return self.visibility == "shared" or (tenant is not None and self.owner_tenant == tenant)

    def version(self, version: str) -> VersionRecord:
        if version not in self.versions:
            raise AdapterNotFound(f"adapter '{self.name}' has no version '{version}' "
                                  f"(versions: {', '.join(self.versions) or 'none'})")
        return self.versions[version]
