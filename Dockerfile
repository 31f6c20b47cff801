# The LoraRetriever image: Python 3.11, Ray 2.60.0 and the project, installed the way
# README does (cluster/setup.sh: a .venv, torch 2.13.0, then `pip install -e .[dev]`).
#   docker build -t ghcr.io/loraretriever/loraretriever:0.1.0-cpu .
#   docker build --build-arg VARIANT=cuda -t ghcr.io/loraretriever/loraretriever:0.1.0-cuda .
# VARIANT=cuda takes torch 2.13.0 from TORCH_CUDA_INDEX; those wheels bundle the CUDA
# runtime, so the base image stays the same and the GPU node supplies only the driver.
FROM python:3.11.7-slim-bookworm

ARG VARIANT=cpu
ARG TORCH_CUDA_INDEX=https://download.pytorch.org/whl/cu128
# cuda only: vLLM's CUDA build in its own environment (it pins its own torch), for composers with
# composition.engine: vllm (k8s/overlays/gpu); docs/engine.md, "The vLLM engine".
ARG VLLM_VERSION=0.32.0

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    RAY_USAGE_STATS_ENABLED=0 \
    PATH=/app/.venv/bin:$PATH

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
WORKDIR /app

COPY pyproject.toml README.md ./
COPY cluster ./cluster
COPY services ./services
COPY deployments ./deployments

# A CUDA torch wheel (2.13.0+cuXYZ) satisfies setup.sh's torch==2.13.0 pin and ranks above
# the CPU wheel, so the extra index is all the cuda variant changes.
RUN case "$VARIANT" in \
      cpu) ;; \
      cuda) export PIP_EXTRA_INDEX_URL="$TORCH_CUDA_INDEX" ;; \
      *) echo "VARIANT must be cpu or cuda, got '$VARIANT'" >&2; exit 2 ;; \
    esac \
    && bash cluster/setup.sh \
    && if [ "$VARIANT" = cuda ]; then \
         .venv/bin/python -m services.lora.vllm_env install --venv /opt/vllm-venv --package "vllm==$VLLM_VERSION" --torch ''; \
       fi \
    && rm -rf /var/lib/apt/lists/* \
    && echo "export PATH=/app/.venv/bin:\$PATH" > /etc/profile.d/loraretriever-venv.sh \
    && useradd --create-home --uid 1000 --shell /bin/bash ray

# KubeRay starts Ray through `bash -lc`; Debian's /etc/profile resets PATH, hence the
# profile.d line above. Ports: Serve HTTP, Ray GCS, dashboard, client, metrics.
EXPOSE 8000 6379 8265 10001 8080
USER 1000
