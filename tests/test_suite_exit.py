"""The suite's process ends with pytest's status even when a native library faults at exit
(tests/conftest.py: pytest_sessionfinish); a failing test still fails the run."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FAULT_AT_EXIT = """
import atexit, ctypes

atexit.register(lambda: ctypes.string_at(0))  # a segfault in the interpreter's teardown

def test_passes():
    pass
"""


def run_pytest(folder: Path, *plugin: str) -> int:
    args = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
            *plugin, "--rootdir", str(folder), str(folder)]
    return subprocess.run(args, cwd=REPO, capture_output=True, timeout=120).returncode


@pytest.mark.parametrize("body, status", [(FAULT_AT_EXIT, 0), ("def test_fails():\n    assert False\n", 1)])
def test_the_session_status_is_the_exit_status(tmp_path, body, status):
    (tmp_path / "test_case.py").write_text(body)
    assert run_pytest(tmp_path, "-p", "tests.conftest") == status


def test_without_the_hook_the_fault_is_the_exit_status(tmp_path):
    (tmp_path / "test_case.py").write_text(FAULT_AT_EXIT)
    assert run_pytest(tmp_path) == -11  # SIGSEGV: the hook is what turns it into the session's status
