"""`loraretriever demo build`: the demo base model and adapter zoo, cached."""
from __future__ import annotations

import logging
import os
from pathlib import Path

from cluster.cli import command_group
from cluster.errors import UserError

log = logging.getLogger(__name__)


def register(subparsers) -> None:
    group = command_group(subparsers, "demo", "the demo model and adapter zoo")
    build = group.add_parser(
        "build",
        help="convert SmolLM2-135M-Instruct and train the demo LoRA adapters (skipped when done)",
        description="Writes base/, adapters/<name>/, cards.json, queries.json and manifest.json "
        "under ROOT; adapters land one by one, and a finished build is only verified.",
    )
    build.add_argument("--root", type=Path, default=None, help="zoo folder (default: $LORARETRIEVER_HOME/demo)")
    build.add_argument("--tiny", action="store_true", help="a tiny random model and 3 adapters, for tests")
    build.add_argument("--adapters", type=int, default=None, metavar="N", help="build only the first N adapters")
    build.set_defaults(func=run_build)


def run_build(args) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from cluster.demo.base_model import BaseModelUnavailable
    from cluster.demo.zoo import ZooError, build_zoo

    try:
        zoo = build_zoo(args.root, tiny=args.tiny, adapters=args.adapters)
    except (ZooError, BaseModelUnavailable) as err:
        raise UserError(str(err)) from err
    log.info("demo zoo ready at %s: %d adapters, %d queries", zoo.root, len(zoo.adapters), len(zoo.queries))
    return 0
