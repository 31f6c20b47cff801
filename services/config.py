"""The cluster's one configuration model.

The same model validates the YAML given to `loraretriever up --config`, the args of
`deployments.app:build_app` and the args in the Kubernetes manifests (k8s/), so a
field unknown to it is rejected everywhere.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from services.retrieval import (  # one definition, shared with the embedder
    DEFAULT_EMBEDDER_BACKEND, DEFAULT_INSTRUCTION, DEFAULT_MAX_SEQ_LENGTH)
from services.schemas import CompositionMode, Weighting


class ConfigError(ValueError):
    """A setting that points at something missing or unusable; the CLI prints it as one sentence."""


def data_home() -> Path:
    """Where local state lives: $LORARETRIEVER_HOME, else ~/.cache/loraretriever (the demo zoo under demo/)."""
    return Path(os.environ.get("LORARETRIEVER_HOME") or Path.home() / ".cache" / "loraretriever")


def replica_threads(num_cpus: float) -> int:
    """The CPU threads a replica that reserved `num_cpus` runs on: Ray's rule for OMP_NUM_THREADS."""
    return max(1, int(num_cpus))


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class BaseModelConfig(Section):
    path: str = Field(
        "demo",
        description="Hugging Face model folder of the shared base model, or its object store URI "
        "(s3://bucket/models/name: fetched once per node into adapter_store.cache_path, with "
        "adapter_store.objects' settings); 'demo' = the SmolLM2-135M-Instruct folder that "
        "`loraretriever demo build` converts",
    )
    name: str | None = Field(None, description="id clients use for the base model; None = the folder's name")
    dtype: str = Field("auto", pattern="^(auto|float32|float16|bfloat16)$",
                       description="weights dtype; 'auto' = bfloat16 where the device computes it natively (a CPU "
                       "with AVX-512 BF16 or AMX, a GPU that supports it), else float32 (the oracle the engine is "
                       "tested against)")
    device: str = Field("auto", description="'auto' (cuda when present, else cpu), 'cpu' or 'cuda[:N]'")


class ObjectStoreConfig(Section):
    """How to reach object storage (services/registry/object_store.py). Credentials come from the
    environment (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY; on Kubernetes a Secret), never from here."""

    endpoint_url: str | None = Field(None, description="an S3-compatible server's URL (MinIO, SeaweedFS, Ceph, R2, "
                                     "...); None = AWS itself, or AWS_ENDPOINT_URL from the environment")
    region: str | None = Field(None, description="S3 region; None = AWS_REGION from the environment")
    allow_http: bool = Field(False, description="allow a plain-http endpoint (a server inside the cluster)")
    connect_timeout_s: float = Field(5.0, gt=0, description="seconds to open a connection")
    timeout_s: float = Field(60.0, gt=0, description="seconds one request may take")
    retries: int = Field(3, ge=0, le=20, description="retries of a failed request (with backoff)")


class AdapterStoreConfig(Section):
    path: str = Field("var/adapters", description="directory (or mounted volume) holding adapter versions")
    uri: str | None = Field(None, description="object storage for uploaded versions instead of `path`, e.g. "
                            "s3://bucket/adapters; composers fetch from it into their node's cache")
    cache_path: str | None = Field(None, description="node-local folder for what a node fetches from object storage "
                                   "(adapters/: adapter versions, models/: a base model given by URI); None = "
                                   "node-cache/ under the data home ($LORARETRIEVER_HOME)")
    objects: ObjectStoreConfig = Field(default_factory=ObjectStoreConfig)
    allow_unsafe_pickle: bool = Field(False, description="accept .bin (pickle) adapter weights; never in production")

    @model_validator(mode="after")
    def _uri_is_remote(self) -> "AdapterStoreConfig":
        if self.uri is not None and not re.match(r"^(s3|s3a|gs|az|abfs|abfss)://[^/]+", self.uri):
            raise ValueError(f"adapter_store.uri {self.uri!r} must be an object store URI "
                             "(s3://bucket/prefix, gs://..., az://...); a folder goes in adapter_store.path")
        return self


class EmbedderConfig(Section):
    model_path: str | None = Field(
        None, description="sentence-transformers model folder; None = packaged all-MiniLM-L6-v2"
    )
    instruction: str = Field(DEFAULT_INSTRUCTION, description="prefix added to every text before embedding; may be empty")
    batch_size: int = Field(32, ge=1, le=1024, description="texts per encoding batch")
    backend: str | None = Field(None, pattern="^(onnx-int8|onnx|torch|bf16)$",
                                description="runtime: ONNX Runtime int8 or float32 (exported once, cached under the "
                                "data home), PyTorch (the reference), or PyTorch in bfloat16 (fast only on CPUs with "
                                "AMX); docs/retrieval.md compares them. Unset: bf16 on a CPU with AMX; elsewhere "
                                f"{DEFAULT_EMBEDDER_BACKEND} for the configured embedder, and for a tuned retriever "
                                "model the runtime its tuning chose (int8 where it held top-1 within a point)")
    max_seq_length: int = Field(DEFAULT_MAX_SEQ_LENGTH, ge=8, le=8192,
                                description="tokens kept per text (the rest is cut); capped by the model's own limit")
    cut: str | None = Field(None, pattern="^(head|head_tail)$",
                            description="how a text past max_seq_length is cut: its head, or its head and tail halves; "
                            "None = the model folder's own (a tuned model records the cut it was trained with), else head")
    threads: int | None = Field(None, ge=1, description="CPU threads per encoding call; None = in a retriever replica "
                                "the CPUs it reserved, floor(deployments.retriever.num_cpus) and at least 1 (as the "
                                "composer's torch_threads), elsewhere (the CLI) all cores")
    cache_entries: int = Field(4096, ge=0, le=10_000_000,
                               description="recent prompts whose embeddings a retriever replica keeps (about 1.6 KB "
                               "each at 384 dimensions); a repeated prompt skips the embedder; 0 = off")


class QdrantConfig(Section):
    url: str | None = Field(None, description="Qdrant server URL; None = embedded mode")
    path: str = Field(":memory:", description="embedded mode only: ':memory:' or a directory (one process per directory)")
    collection: str = Field("adapters", description="collection name")
    api_key_env: str | None = Field(None, description="name of the env var holding the Qdrant API key")


class RedisConfig(Section):
    url: str = Field("redis://127.0.0.1:6379/0", description="Redis URL (state: registry, placement, tenants)")
    password_env: str | None = Field(None, description="name of the env var holding the Redis password")
    start_local: bool = Field(True, description="`up` starts and owns a redis-server on the URL's port")


class RetrievalConfig(Section):
    top_k: int = Field(3, ge=1, le=16, description="adapters retrieved per prompt")
    min_similarity: float = Field(0.0, ge=-1.0, le=1.0, description="below this cosine no adapter fits: base model")
    scoring: str | None = Field(None, pattern="^(centroid|samples)$", description="adapter = mean of card samples "
                                "(centroid), or its best card sample (samples); unset: centroid for the configured "
                                "embedder, the scoring a tuned retriever model won with on held-out card samples")
    hybrid: bool = Field(True, description="re-rank the index's best adapters by embedding cosine blended with a "
                         "character n-gram TF-IDF cosine of the cards (services/retrieval/lexical.py)")
    hybrid_weight: float | None = Field(None, ge=0.0, le=1.0, description="the embedding's share of the hybrid "
                                        "score; unset: chosen on the registry's cards at each registry change")


VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the max_lora_rank values vLLM accepts


class VllmConfig(Section):
    """composition.engine: vllm. vLLM runs in its own virtual environment, a process beside each
    composer replica (docs/engine.md "The vLLM engine"); max_loras and max_cpu_loras are the
    composition's device_slots and cpu_slots."""

    python: str | None = Field(None, description="python of vLLM's environment; None = the one "
                               "`python -m services.lora.vllm_env install` made under the data home")
    max_lora_rank: int = Field(64, description="largest LoRA rank vLLM serves (a composite of a mixture has the sum "
                               f"of its adapters' ranks; above it the request gets a 400); one of {VLLM_LORA_RANKS}")
    weight_grid: float = Field(1 / 256, gt=0, le=1, description="composite weights are rounded to multiples of this "
                               "(one composite adapter per rounded weight set)")
    composite_cache_path: str | None = Field(None, description="node-local folder of composite adapters; None = "
                                             "<data home>/composites")
    composite_cache_mb: int = Field(2048, ge=1, description="disk the composite adapters may take on the node")
    kv_cache_gib: float = Field(2.0, gt=0, description="CPU only: vLLM's KV cache (VLLM_CPU_KVCACHE_SPACE)")
    gpu_memory_utilization: float = Field(0.85, gt=0, le=1, description="GPU only: share of the GPU vLLM may take")
    startup_timeout_s: float = Field(600.0, gt=0, description="seconds vLLM may take to load the model")

    @model_validator(mode="after")
    def _vllm_rank(self) -> "VllmConfig":
        if self.max_lora_rank not in VLLM_LORA_RANKS:
            raise ValueError(f"composition.vllm.max_lora_rank={self.max_lora_rank} must be one of {VLLM_LORA_RANKS}")
        return self


class CompositionConfig(Section):
    engine: Literal["auto", "native", "vllm"] = Field(
        "auto", description="what runs the forwards: native (this project's engine), vllm (vLLM beside the replica), "
        "auto = vllm where CUDA and an installed vLLM environment are present, else native")
    vllm: VllmConfig = Field(default_factory=VllmConfig)
    mode: CompositionMode | Literal["auto"] = Field(
        "auto", description="default composition; auto = per request from retrieval scores and compatibility "
        "(services/serving/policy.py)")
    compatibility_neighbours: int = Field(
        2, ge=0, le=8, description="auto: each active version's gain table measures its compositions with this "
        "many nearest adapters, when it is added, promoted or rolled back (0: none measured; auto then "
        "selects in domain and mixes out of domain, the paper's default)")
    compatibility_samples: int = Field(4, ge=1, le=64, description="card samples per adapter in a gain table")
    weighting: Weighting = Field(Weighting.uniform, description="default adapter weights")
    temperature: float = Field(1.0, gt=0, description="softmax temperature for weighting=softmax")
    max_adapters_per_request: int = Field(4, ge=1, le=16, description="K: adapter slots per batch row")
    max_rank: int = Field(64, ge=1, le=256, description="largest LoRA rank accepted")
    device_slots: int = Field(32, ge=1, description="adapters resident on the model's device")
    cpu_slots: int = Field(128, ge=0, description="adapters kept in CPU memory after eviction")
    max_batch_size: int = Field(64, ge=1, description="rows in the running batch (continuous batching)")
    prefill_tokens: int = Field(512, ge=1, description="prompt tokens read per decode step, over all rows")
    prefix_cache_mb: int = Field(256, ge=0, description="memory for keys of prompt prefixes rows share (0: off)")
    max_tokens_limit: int = Field(512, ge=1, description="largest max_tokens a request may ask for")
    max_prompt_tokens: int = Field(2048, ge=1, description="longest prompt accepted")
    torch_threads: int | None = Field(
        None, ge=1, description="CPU threads for the composer's forward passes; None = Ray's choice, "
        "floor(deployments.composer.num_cpus) and at least 1 (set it when composers run on CPU)")

    @model_validator(mode="after")
    def _one_request_fits(self) -> "CompositionConfig":
        if self.max_adapters_per_request > self.device_slots:
            raise ValueError(f"max_adapters_per_request={self.max_adapters_per_request} exceeds "
                             f"device_slots={self.device_slots}: one request's adapters must fit on the device")
        return self


class AutoscalingConfig(Section):
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, ge=1)
    initial_replicas: int | None = Field(None, ge=0)
    target_ongoing_requests: float = Field(2.0, gt=0, description="per replica; the composer's queue depth target")
    upscale_delay_s: float = Field(10.0, ge=0)
    downscale_delay_s: float = Field(60.0, ge=0)

    @model_validator(mode="after")
    def _bounds(self) -> "AutoscalingConfig":
        if self.min_replicas > self.max_replicas:
            raise ValueError("min_replicas must not exceed max_replicas")
        return self

    def to_serve(self) -> dict:
        """Ray Serve's autoscaling_config dict."""
        out = {
            "min_replicas": self.min_replicas,
            "max_replicas": self.max_replicas,
            "target_ongoing_requests": self.target_ongoing_requests,
            "upscale_delay_s": self.upscale_delay_s,
            "downscale_delay_s": self.downscale_delay_s,
        }
        if self.initial_replicas is not None:
            out["initial_replicas"] = self.initial_replicas
        return out


class DeploymentConfig(Section):
    autoscaling: AutoscalingConfig = Field(default_factory=AutoscalingConfig)
    num_cpus: float = Field(0.5, ge=0, description="CPUs reserved per replica")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per replica (1 for composers on a GPU cluster)")
    max_ongoing_requests: int = Field(64, ge=1, description="requests one replica accepts at once")
    resources: dict[str, float] = Field(
        default_factory=dict, description="Ray custom resources per replica (Serve's ray_actor_options): a "
        "replica lands only on nodes that offer them, e.g. {lr_composer: 1} on the GPU workers and "
        "{lr_cpu_worker: 1} on the CPU workers (k8s rayStartParams `resources`), so ingress and retrievers "
        "never take a GPU node")

    @model_validator(mode="after")
    def _custom_resources(self) -> "DeploymentConfig":
        for name, amount in self.resources.items():
            if name in ("CPU", "GPU", "memory", "object_store_memory") or amount <= 0:
                raise ValueError(f"resources: {name}={amount} must be a custom resource with a positive amount "
                                 "(CPUs and GPUs go in num_cpus and num_gpus)")
        return self


class DeploymentsConfig(Section):
    ingress: DeploymentConfig = Field(default_factory=DeploymentConfig)
    retriever: DeploymentConfig = Field(default_factory=DeploymentConfig)
    composer: DeploymentConfig = Field(default_factory=DeploymentConfig)
    composer_router: str = Field(
        "adapter_affinity", pattern="^(adapter_affinity|power_of_two)$",
        description="how requests pick a composer replica: the one holding most of their adapters "
                    "(spreading when its queue is long), or Serve's default power-of-two-choices")


class ServerConfig(Section):
    host: str = Field("127.0.0.1", description="HTTP bind address")
    port: int = Field(8000, ge=1, le=65535)
    request_timeout_s: float = Field(60.0, gt=0, description="a request past this gets 504")
    admin_key_env: str = Field("LORARETRIEVER_ADMIN_KEY", description="env var holding the admin API key")
    auth_enabled: bool = Field(True, description="every request needs a tenant API key (Authorization: Bearer)")


class RolloutConfig(Section):
    """Quality gate and automatic canary verdicts (docs/rollout.md)."""

    gate_margin: float = Field(2.0, ge=0, description="a staged version may score at most this many points "
                               "(0-100 scale) below the active version; it must also beat the base model")
    gate_max_samples: int = Field(32, ge=1, description="held-out samples scored per version")
    gate_max_tokens: int = Field(24, ge=1, description="answer length limit when scoring")
    card_moved_cosine: float = Field(0.9, ge=-1, le=1, description="card centroid cosine with the active "
                                     "version below this flags that retrieval will route differently")
    canary_min_requests: int = Field(100, ge=1, description="canary requests before an automatic verdict")
    canary_alpha: float = Field(0.05, gt=0, lt=1, description="significance level of the verdict's tests")
    canary_error_floor: float = Field(0.01, ge=0, lt=1, description="error rate a canary may always have")
    canary_latency_tolerance: float = Field(0.5, ge=0, description="mean latency a canary may add (0.5 = 50%)")
    metrics_max_versions: int = Field(64, ge=1, description="adapter versions with their own metric labels "
                                      "per process besides canaries; the rest are counted as '_other'")


class RetrieverTuningConfig(Section):
    """The retriever that learns from the registry (docs/retrieval.md, "A retriever that learns")."""

    auto: bool = Field(True, description="fine-tune the embedder on the registered cards after registry changes "
                       "(debounced), keeping the new model only if it beats the current one on held-out samples")
    debounce_s: float = Field(300.0, ge=0, description="quiet time after the last registry change before a run")
    min_adapters: int = Field(4, ge=2, description="served adapters needed before automatic runs start")
    heldout_fraction: float = Field(0.25, gt=0, lt=1, description="share of each card's samples held out for scoring")
    epochs: int = Field(5, ge=1, le=50, description="training epochs over the cards (5: the k-fold's best measured, "
                        "docs/retrieval.md)")
    min_gain: float = Field(0.5, description="top-1 points the candidate must gain over the current model")
    refit: bool = Field(True, description="serve a kept candidate's recipe trained again on every card sample "
                        "(twice the training time; the split model gates and stays as the version's gate model)")
    models_path: str | None = Field(None, description="folder of the model versions (on every retriever node); "
                                    "None = <data home>/retriever-models")
    num_cpus: float = Field(0.0, ge=0, description="CPUs the training task reserves (it runs at the lowest priority)")

    def root(self) -> Path:
        return Path(self.models_path) if self.models_path else data_home() / "retriever-models"


class AppConfig(Section):
    """Everything `build_app` needs. Every field has a default for a local run."""

    base_model: BaseModelConfig = Field(default_factory=BaseModelConfig)
    adapter_store: AdapterStoreConfig = Field(default_factory=AdapterStoreConfig)
    embedder: EmbedderConfig = Field(default_factory=EmbedderConfig)
    qdrant: QdrantConfig = Field(default_factory=QdrantConfig)
    redis: RedisConfig = Field(default_factory=RedisConfig)
    retrieval: RetrievalConfig = Field(default_factory=RetrievalConfig)
    composition: CompositionConfig = Field(default_factory=CompositionConfig)
    deployments: DeploymentsConfig = Field(default_factory=DeploymentsConfig)
    server: ServerConfig = Field(default_factory=ServerConfig)
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    retriever_tuning: RetrieverTuningConfig = Field(default_factory=RetrieverTuningConfig)


def load_config(path: str | Path | None) -> AppConfig:
    """Read a YAML config; None gives the defaults."""
    if path is None:
        return AppConfig()
    data = yaml.safe_load(Path(path).read_text()) or {}
    return AppConfig.model_validate(data)
