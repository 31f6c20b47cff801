"""The `loraretriever` command line.

Each module in cluster/commands/ defines `register(subparsers)` and adds its own
commands, so a new command is one new module.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import pkgutil
import sys

from cluster import commands
from cluster.errors import UserError
from services.config import ConfigError
from cluster.local_ray import LOOPBACK_IMPORT_ENV
from services.offline import OFFLINE_ENV


def command_group(subparsers, name: str, help: str):
    """The sub-parser set of a command group (`eval`, `adapters`, ...), created once.

    Several modules may add commands to one group, whichever registers first."""
    existing = subparsers.choices.get(name)
    if existing is None:
        existing = subparsers.add_parser(name, help=help)
        existing.set_defaults(func=lambda args: existing.print_help() or 2)
        existing._group_subparsers = existing.add_subparsers(dest=f"{name}_command")
    return existing._group_subparsers


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loraretriever", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        importlib.import_module(f"{commands.__name__}.{info.name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    for key, value in LOOPBACK_IMPORT_ENV.items():  # before any command imports Ray
        os.environ.setdefault(key, value)
    os.environ.update(OFFLINE_ENV)  # forced: the product never fetches from a model hub
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args) or 0)
    except (UserError, ConfigError) as err:
        print(f"loraretriever: error: {err}", file=sys.stderr)
        return getattr(err, "exit_code", 2)


if __name__ == "__main__":
    sys.exit(main())
