"""`eval generate`: mixed-task generation quality of base model, perfect selection and
retrieved compositions, batched across tasks through the composition engine."""
from __future__ import annotations

import argparse
import json
import os
from collections import defaultdict
from pathlib import Path

from cluster.cli import command_group
from cluster.commands.retrieval import _check_writable, _write_atomically
from cluster.demo.report import markdown_table
from cluster.errors import UserError


def register(sub) -> None:
    evals = command_group(sub, "eval", "measure the cluster's parts on labelled data")
    ev = evals.add_parser(
        "generate", help="generation quality per domain: base, perfect selection, selection, mixture, fusion",
        description="Without --cards/--queries/--adapters/--base, evaluates the demo zoo "
        "(`loraretriever demo build`).",
    )
    ev.add_argument("--cards", help="CARDS.json of the adapters (default: the demo zoo's)")
    ev.add_argument("--queries", help="QUERIES.json: [{inputs, targets, task, domain, metric}] (default: the demo zoo's)")
    ev.add_argument("--adapters", help="folder with one PEFT adapter folder per card, named by model_name")
    ev.add_argument("--base", help="Hugging Face folder of the base model the adapters were trained on")
    ev.add_argument("--composition", nargs="+", choices=("selection", "mixture", "fusion", "auto"),
                    default=["selection", "mixture", "fusion", "auto"],
                    help="retrieved compositions to evaluate (auto: the adaptive policy)")
    ev.add_argument("--no-references", action="store_true", help="skip the base model and perfect selection")
    ev.add_argument("--top-k", type=int, default=3, help="adapters retrieved per query (default 3)")
    ev.add_argument("--exclude-own", action="store_true",
                    help="out-of-domain: never retrieve a query's own adapter")
    ev.add_argument("--held-out", action="store_true",
                    help="the queries are of tasks no adapter was trained for (`demo held-out`): "
                    "no perfect selection")
    ev.add_argument("--compat-samples", type=int, default=4,
                    help="card samples per adapter in the auto policy's gain tables (default 4)")
    ev.add_argument("--neighbours", type=int, default=2,
                    help="nearest adapters in each gain table (default 2, the cluster's default)")
    ev.add_argument("--gain-tables", metavar="RESULT.json",
                    help="reuse the gain tables of an earlier `eval generate --json` result on the same cards and "
                    "adapters instead of measuring them again")
    ev.add_argument("--max-tokens", type=int, default=24, help="answer length limit (default 24)")
    ev.add_argument("--batch-size", type=int, default=32, help="rows per engine step (default 32)")
    ev.add_argument("--device", default="auto", help="'auto', 'cpu' or 'cuda[:N]'")
    ev.add_argument("--json", dest="json_out", help="also write the full result (with answers) to this file")
    ev.set_defaults(func=cmd_eval_generate)


def _inputs(args) -> tuple[str, str, Path, Path]:
    from cluster.demo.zoo import default_root

    zoo = default_root()
    cards = args.cards or str(zoo / "cards.json")
    queries = args.queries or str(zoo / "queries.json")
    adapters = Path(args.adapters or zoo / "adapters")
    base = Path(args.base or zoo / "base")
    if not (base / "config.json").is_file():
        raise UserError(f"--base {base}: no config.json there (for the demo zoo: `loraretriever demo build`)")
    if not adapters.is_dir():
        raise UserError(f"--adapters {adapters}: not a folder")
    for flag, value, low in (("--top-k", args.top_k, 1), ("--max-tokens", args.max_tokens, 1),
                             ("--batch-size", args.batch_size, 1), ("--compat-samples", args.compat_samples, 1),
                             ("--neighbours", args.neighbours, 1)):
        if value < low:
            raise UserError(f"{flag} must be at least {low}, not {value}")
    return cards, queries, adapters, base


def retrieve_for_queries(retriever, queries, *, top_k: int, exclude_own: bool) -> list[list[tuple[str, float]]]:
    """(adapter name, score) best first per query; with exclude_own, without the query's own adapter."""
    out: list[list[tuple[str, float]]] = [[] for _ in queries]
    by_task: dict[str, list[int]] = defaultdict(list)
    for i, q in enumerate(queries):
        by_task[q.task].append(i)
    for task, indices in by_task.items():
        results = retriever.retrieve([queries[i].inputs for i in indices], top_k=top_k,
                                     exclude=[task] if exclude_own else [])
        for i, result in zip(indices, results):
            out[i] = [(a.name, a.score) for a in result.adapters]
    return out


def reused_tables(path: str, cards) -> dict:
    """The gain tables of an earlier result, which must cover these cards."""
    from services.lora.compatibility import GainTable

    try:
        tables = json.loads(Path(path).read_text())["policy"]["gain_tables"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise UserError(f"--gain-tables {path}: no gain tables there ({err})") from err
    missing = [c.model_name for c in cards if c.model_name not in tables]
    if missing:
        raise UserError(f"--gain-tables {path}: no table for {', '.join(missing)}")
    return {name: GainTable.from_dict(t) for name, t in tables.items()}


def auto_decisions(engine, tokenizer, embedder, cards, hits: list[list[tuple[str, float]]], *,
                   compat_samples: int, neighbours: int, reuse: dict | None = None) -> tuple[list, dict]:
    """The auto policy's decision per query, as the cluster makes it: thresholds calibrated from the
    cards' embeddings, each adapter's gain table measured on its card with its nearest neighbours
    by card centroid (what registration does), never on the queries."""
    import time

    from tqdm.auto import tqdm

    from services.evaluation.generation import chat_prompt_ids
    from services.lora.compatibility import CardTokens, measure_gains
    from services.rollout.compatibility import nearest
    from services.serving.policy import calibrate, decide, unit

    vectors = embedder.encode([s.inputs for c in cards for s in c.sample])  # (all samples, dim)
    by_card, start = {}, 0
    for card in cards:
        by_card[card.model_name] = vectors[start:start + len(card.sample)]
        start += len(card.sample)
    thresholds = calibrate(by_card)
    centroids = {name: unit(e.mean(axis=0)) for name, e in by_card.items()}
    started, tables = time.perf_counter(), dict(reuse or {})
    for card in tqdm([c for c in cards if c.model_name not in tables], desc="gain tables", unit="adapter"):
        samples = [s for s in card.sample if s.targets][:compat_samples]
        if not samples:
            continue
        tokens = CardTokens([chat_prompt_ids(tokenizer, s.inputs) for s in samples],
                            [tokenizer(s.targets, add_special_tokens=False).input_ids for s in samples])
        tables[card.model_name] = measure_gains(engine, card.model_name,
                                                nearest(card.model_name, centroids, neighbours), tokens)
    seconds = time.perf_counter() - started
    decisions = [decide(h, tables.get, thresholds, min_similarity=0.0) for h in hits]  # the served default
    measured = len(tables) - len(reuse or {})
    info = {"thresholds": thresholds.to_dict(), "tables": len(tables), "neighbours": neighbours,
            "samples": compat_samples, "tables_reused": len(reuse or {}), "table_seconds": round(seconds, 1),
            "seconds_per_adapter": round(seconds / measured, 2) if measured else None,
            "gain_tables": {name: t.to_dict() for name, t in tables.items()}}
    return decisions, info


def cmd_eval_generate(args: argparse.Namespace) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    cards_path, queries_path, adapters_dir, base = _inputs(args)
    if args.json_out:
        _check_writable(Path(args.json_out))

    from transformers import AutoTokenizer

    from services.evaluation.generation import COMPOSITIONS, REFERENCE_SYSTEMS, evaluate_generation
    from services.lora.adapter_files import AdapterValidationError
    from services.lora.engine import CompositionEngine
    from services.retrieval.embedder import Embedder, EmbedderLoadError
    from services.retrieval.evaluation import EvaluationInputError, index_cards, load_cards, load_queries
    from services.retrieval.index import AdapterIndex
    from services.retrieval.retriever import Retriever

    try:
        cards = load_cards(cards_path)
        queries = load_queries(queries_path, cards, held_out=args.held_out)
        embedder = Embedder()
    except (EvaluationInputError, EmbedderLoadError) as err:
        raise UserError(str(err)) from err
    if args.held_out and args.exclude_own:
        raise UserError("--held-out queries have no own adapter to exclude; drop --exclude-own")
    retrievable = len(cards) - (1 if args.exclude_own else 0)
    if args.top_k > retrievable:
        raise UserError(f"--top-k {args.top_k} exceeds the {retrievable} adapters a query can retrieve")
    missing = [c.model_name for c in cards if not (adapters_dir / c.model_name).is_dir()]
    if missing:
        raise UserError(f"--adapters {adapters_dir}: no adapter folder for {', '.join(missing)}")

    retriever = Retriever(embedder, AdapterIndex(embedder.dim))
    index_cards(retriever, cards, progress=True)
    hits = retrieve_for_queries(retriever, queries, top_k=args.top_k, exclude_own=args.exclude_own)
    retrieved = [[name for name, _ in h] for h in hits]

    engine = CompositionEngine.from_pretrained(base, device=args.device, dtype="float32",
                                               max_adapters_per_row=max(args.top_k, args.neighbours + 1))  # gain tables: top-1 + neighbours
    try:
        for card in cards:
            engine.load_adapter(card.model_name, adapters_dir / card.model_name)
    except AdapterValidationError as err:
        raise UserError(str(err)) from err

    references = ("base",) if args.held_out else REFERENCE_SYSTEMS  # held-out tasks have no adapter to select
    systems = ([] if args.no_references else list(references)) + [c for c in COMPOSITIONS if c in args.composition]
    tokenizer = AutoTokenizer.from_pretrained(base)
    decisions, policy = None, None
    if "auto" in systems:
        reuse = reused_tables(args.gain_tables, cards) if args.gain_tables else None
        decisions, policy = auto_decisions(engine, tokenizer, embedder, cards, hits, compat_samples=args.compat_samples,
                                           neighbours=min(args.neighbours, len(cards) - 1), reuse=reuse)
    report = evaluate_generation(engine, tokenizer, queries, retrieved, systems=systems, decisions=decisions,
                                 batch_size=args.batch_size, max_tokens=args.max_tokens, progress=True)
    own_in_top_k = sum(q.task in r for q, r in zip(queries, retrieved)) / len(queries)
    result = {
        "settings": {"top_k": args.top_k, "exclude_own": args.exclude_own, "held_out": args.held_out,
                     "max_tokens": args.max_tokens, "queries": len(queries), "adapters": len(cards),
                     "own_adapter_in_top_k": round(own_in_top_k, 4)},
        "retrieved": retrieved,
        "scores": [[round(score, 4) for _, score in h] for h in hits],
        **({"policy": policy} if policy else {}),
        "systems": report,
    }
    if args.json_out:
        _write_atomically(Path(args.json_out), json.dumps(result, indent=1) + "\n")
    print(markdown_table(result))
    return 0
