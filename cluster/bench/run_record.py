"""The command a benchmark really ran, for its saved results.

Under `python -m`, `sys.argv[0]` is the module's file and `main(argv=None)` gets no list, so
the flags must come from `sys.argv[1:]`; a caller passing its own argv is recorded with that."""
from __future__ import annotations

import shlex
import sys


def command_line(module: str, argv: list[str] | None = None) -> str:
    """`<interpreter> -m <module> <flags>` as run (shell-quoted, so it can be pasted back)."""
    return shlex.join([sys.executable, "-m", module, *(sys.argv[1:] if argv is None else argv)])
