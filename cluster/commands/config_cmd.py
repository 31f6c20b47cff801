"""`loraretriever config defaults|check`: the configuration model as YAML, and validation."""
from __future__ import annotations

import argparse

import yaml

from cluster.cli import command_group
from services.config import AppConfig, load_config
from cluster.errors import UserError


def register(sub) -> None:
    group = command_group(sub, "config", "the cluster configuration (services.config.AppConfig)")
    defaults = group.add_parser("defaults", help="print every field with its default, as YAML")
    defaults.set_defaults(func=cmd_defaults)
    check = group.add_parser("check", help="validate a YAML config")
    check.add_argument("file")
    check.set_defaults(func=cmd_check)


def described_defaults(model: type, values: dict, indent: int = 0) -> list[str]:
    """YAML lines of `values` with each field's description as a comment."""
    lines = []
    for name, field in model.model_fields.items():
        value = values[name]
        note = f"  # {field.description}" if field.description else ""
        sub = field.annotation if isinstance(field.annotation, type) else None
        if isinstance(value, dict) and sub is not None and hasattr(sub, "model_fields"):
            lines.append(" " * indent + f"{name}:{note}")
            lines += described_defaults(sub, value, indent + 2)
        else:
            dumped = yaml.safe_dump({name: value}, default_flow_style=True).strip()[1:-1]
            lines.append(" " * indent + dumped + note)
    return lines


def cmd_defaults(args: argparse.Namespace) -> int:
    print("\n".join(described_defaults(AppConfig, AppConfig().model_dump(mode="json"))))
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    try:
        load_config(args.file)
    except FileNotFoundError as err:
        raise UserError(f"config file {args.file} does not exist") from err
    except (ValueError, yaml.YAMLError) as err:
        raise UserError(f"{args.file} is not a valid config: {' '.join(str(err).split())[:500]}") from err
    print(f"{args.file}: valid")
    return 0
