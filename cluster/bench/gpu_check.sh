#!/usr/bin/env bash
# GPU checks of the engine, for a machine with a CUDA device and the project installed with a CUDA
# build of torch (cluster/setup.sh installs the CPU build; on a GPU machine install the project with
# `pip install -e .[dev]` over the CUDA torch the machine has).
#   1. the engine on CUDA (float32 and bfloat16) against its CPU float32 run, itself tested against
#      PEFT: cluster/bench/gpu_oracle.py, with float32 and bfloat16 tolerances;
#   2. the offline and open-loop peer benchmark with our engine on CUDA; when VLLM_PYTHON names the
#      python of an environment where `import vllm` works (vLLM's GPU build), also plain vLLM (selection)
#      and our composer on that vLLM (`composition.engine: vllm`: ours-vllm-selection, -mixture and
#      -fusion over the Zipf open-loop workload, with the composite cache's hit rate and build time).
# Results go to $OUT (default docs/gpu). The demo zoo must be built (loraretriever demo build).
set -euo pipefail
cd "$(dirname "$0")/../.."
out="${OUT:-docs/gpu}"
python="${PYTHON:-.venv/bin/python}"
mkdir -p "$out"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
"$python" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device is visible to torch')"
"$python" -m cluster.bench.gpu_oracle --out "$out" | tee "$out/gpu_oracle.log"
peer=(--device cuda --out "$out" --max-batch 256)
if [[ -n "${VLLM_PYTHON:-}" ]]; then
    peer+=(--vllm-python "$VLLM_PYTHON")
else
    echo "VLLM_PYTHON is not set: our engine only (no vLLM, no composer on vLLM)" >&2
    peer+=(--systems ours-base ours-selection ours-mixture ours-fusion)
fi
"$python" -m cluster.bench.peer "${peer[@]}" | tee "$out/peer.log"
