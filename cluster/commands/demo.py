"""`loraretriever demo build`: the demo base model and adapter zoo, cached."""
from __future__ import annotations

import json
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
    real = build.add_argument_group(
        "real-task zoo", "with --cards: one adapter per task of a cards file, trained on its training samples, "
        "its held-out samples written as queries.json (a benchmark; `up` keeps the demo zoo)")
    real.add_argument("--cards", type=Path, metavar="FILE",
                      help="cards file, e.g. cluster/data/flan_cards.json (default root: $LORARETRIEVER_HOME/flan)")
    real.add_argument("--families", type=_names, metavar="A,B", help="only the tasks of these domains")
    real.add_argument("--tasks", type=_names, metavar="A,B", help="only these tasks (with --families: both)")
    real.add_argument("--held-out", type=int, default=5, metavar="N", help="samples per task held out (default 5)")
    real.add_argument("--fold", type=int, default=0,
                      help="which block of N samples is held out (default 0; other folds default to flan-foldF)")
    build.set_defaults(func=run_build)

    show = group.add_parser("show", help="the finished adapters: base model vs adapter on held-out queries")
    show.add_argument("--root", type=Path, default=None, help="zoo folder (default: $LORARETRIEVER_HOME/demo)")
    show.set_defaults(func=run_show)

    held = group.add_parser(
        "held-out", help="write queries of tasks no adapter was trained for (for `eval generate --held-out`)")
    held.add_argument("--out", type=Path, default=None,
                      help="JSON file (default: held_out_queries.json in the zoo folder)")
    held.add_argument("--per-task", type=int, default=15, help="queries per held-out task (default 15)")
    held.set_defaults(func=run_held_out)

    report = group.add_parser("report", help="markdown table and plot of `eval generate --json` results")
    report.add_argument("--in-domain", type=Path, required=True, help="result of `eval generate --json`")
    report.add_argument("--out-of-domain", type=Path, help="result of `eval generate --exclude-own --json`")
    report.add_argument("--held-out", type=Path, help="result of `eval generate --held-out --json`")
    report.add_argument("--plot", type=Path, help="write a bar plot (PNG) here")
    report.set_defaults(func=run_report)


def _names(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def run_build(args) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from cluster.demo.base_model import BaseModelUnavailable
    from cluster.demo.card_zoo import build_card_zoo
    from cluster.demo.zoo import ZooError, build_zoo

    if args.cards is None and (args.families or args.tasks):
        raise UserError("--families and --tasks choose tasks of a cards file: add --cards FILE")
    if args.cards is not None and args.adapters is not None:
        raise UserError("--adapters N is for the demo zoo; with --cards choose tasks with --families or --tasks")
    try:
        if args.cards is not None:
            zoo = build_card_zoo(args.cards, args.root, families=args.families, names=args.tasks,
                                 held_out=args.held_out, fold=args.fold, tiny=args.tiny)
        else:
            zoo = build_zoo(args.root, tiny=args.tiny, adapters=args.adapters)
    except (ZooError, BaseModelUnavailable) as err:
        raise UserError(str(err)) from err
    log.info("zoo ready at %s: %d adapters, %d queries", zoo.root, len(zoo.adapters), len(zoo.queries))
    return 0


def run_show(args) -> int:
    from cluster.demo.report import adapter_table
    from cluster.demo.zoo import ZooError, load_zoo

    try:
        zoo = load_zoo(args.root)
    except ZooError as err:
        raise UserError(str(err)) from err
    if not zoo.manifest:
        raise UserError(f"no demo zoo at {zoo.root}; build it with `loraretriever demo build`")
    print(adapter_table({**zoo.manifest, "adapters": {n: e for n, e in zoo.manifest["adapters"].items() if n in zoo.adapters}}))
    print(f"\n{len(zoo.adapters)} of {len(zoo.cards)} adapters finished and verified; {len(zoo.queries)} held-out queries")
    return 0


def run_held_out(args) -> int:
    from cluster.demo.zoo import default_root, held_out_queries

    if args.per_task < 1:
        raise UserError(f"--per-task must be at least 1, not {args.per_task}")
    out = args.out or default_root() / "held_out_queries.json"
    if not out.parent.is_dir():
        raise UserError(f"--out {out}: folder {out.parent} does not exist")
    queries = held_out_queries(args.per_task)
    out.write_text(json.dumps([q.model_dump() for q in queries], indent=1) + "\n")
    log.info("wrote %d held-out queries (%d tasks) to %s", len(queries), len({q.task for q in queries}), out)
    return 0


def _read_result(path: Path) -> dict:
    try:
        result = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"{path}: cannot read an `eval generate --json` result: {err}") from err
    if not isinstance(result, dict) or not result.get("systems"):
        raise UserError(f"{path}: not an `eval generate --json` result (no systems)")
    return result


def run_report(args) -> int:
    from cluster.demo.report import decision_table, markdown_table, plot

    if args.plot is not None and not args.plot.parent.is_dir():
        raise UserError(f"--plot {args.plot}: folder {args.plot.parent} does not exist")
    results = [_read_result(path) for path in (args.in_domain, args.out_of_domain, args.held_out) if path]
    if args.plot is not None:
        plot(results, args.plot)
    print(markdown_table(*results))
    if any("policy" in r for r in results):
        print("\n" + decision_table(*results))
    return 0
