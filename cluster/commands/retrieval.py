"""`eval retrieval` and `retriever train`: measure and fine-tune adapter retrieval from JSON files."""
from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

from cluster.cli import command_group
from cluster.errors import UserError
from services.retrieval import DEFAULT_EMBEDDER_BACKEND, DEFAULT_INSTRUCTION, DEFAULT_MAX_SEQ_LENGTH, EMBEDDER_BACKENDS


def register(sub) -> None:
    evals = command_group(sub, "eval", "measure the cluster's parts on labelled data")
    ev = evals.add_parser("retrieval", help="top-1/3/5/8 retrieval accuracy of cards against labelled queries")
    ev.add_argument("--cards", required=True, help="CARDS.json: [{model_name, sample: [{inputs, targets}], domain?}]")
    ev.add_argument("--queries", required=True, help="QUERIES.json: [{inputs, targets, task, domain, metric}]")
    ev.add_argument("--embedder", help="sentence-transformers model folder (default: packaged all-MiniLM-L6-v2)")
    ev.add_argument("--instruction", default=DEFAULT_INSTRUCTION, help="prefix of every embedded text; '' for none")
    ev.add_argument("--backend", choices=EMBEDDER_BACKENDS, default=DEFAULT_EMBEDDER_BACKEND,
                    help="embedding runtime (torch is the reference)")
    ev.add_argument("--max-seq-length", type=int, default=DEFAULT_MAX_SEQ_LENGTH, help="tokens kept per text")
    ev.add_argument("--scoring", choices=("centroid", "samples"), help="adapter scoring (default: the index's)")
    ev.add_argument("--exclude-own", action="store_true",
                    help="remove each query's own adapter; report how often an adapter of its domain ranks in the top k")
    ev.add_argument("--json", dest="json_out", help="also write the result to this file")
    ev.set_defaults(func=cmd_eval_retrieval)

    retriever = command_group(sub, "retriever", "the prompt embedder used for retrieval")
    tr = retriever.add_parser("train", help="fine-tune a student of the embedder on the adapters in CARDS.json "
                              "(services/retrieval/finetune.py: prototype loss, hard negatives, early stopping)")
    tr.add_argument("--cards", required=True, help="CARDS.json of the training adapters")
    tr.add_argument("--out", required=True, help="new or empty folder for the trained model")
    tr.add_argument("--epochs", type=int, help="epochs over every card sample (default: the recipe's 5)")
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--base", help="model folder to start from (default: packaged all-MiniLM-L6-v2)")
    tr.add_argument("--instruction", default=DEFAULT_INSTRUCTION, help="prefix used in training, as at retrieval time")
    tr.set_defaults(func=cmd_retriever_train)

    # the running cluster's retriever model versions (admin API; docs/retrieval.md)
    from cluster.commands.admin import DEFAULT_URL, _call, _print

    for name, help, method, path in (
            ("tune", "fine-tune the cluster's retriever on the registered cards now (kept only if better)",
             "POST", "/admin/retriever/tune"),
            ("models", "the cluster's retriever model versions, the active one and the last tuning run",
             "GET", "/admin/retriever/models"),
            ("rollback", "serve the retriever model active before the current one again",
             "POST", "/admin/retriever/rollback")):
        p = retriever.add_parser(name, help=help)
        p.add_argument("--url", default=os.environ.get("LORARETRIEVER_URL", DEFAULT_URL), help="cluster URL")
        p.set_defaults(func=lambda a, method=method, path=path: _print(_call(a, method, path)))


def cmd_eval_retrieval(args: argparse.Namespace) -> int:
    from services.retrieval.embedder import Embedder, EmbedderLoadError
    from services.retrieval.evaluation import EvaluationInputError, evaluate, load_cards, load_queries
    from services.retrieval.index import AdapterIndex
    from services.retrieval.retriever import Retriever

    if args.json_out:
        _check_writable(Path(args.json_out))
    try:
        cards = load_cards(args.cards)
        queries = load_queries(args.queries, cards)
        embedder = Embedder(args.embedder, args.instruction, backend=args.backend, max_seq_length=args.max_seq_length)
    except (EvaluationInputError, EmbedderLoadError) as err:
        raise UserError(str(err)) from err
    result = evaluate(Retriever(embedder, AdapterIndex(embedder.dim)), cards, queries,
                      exclude_own=args.exclude_own, scoring=args.scoring, progress=True)
    text = json.dumps(result, indent=1)
    if args.json_out:
        _write_atomically(Path(args.json_out), text + "\n")
    print(text)
    return 0


def cmd_retriever_train(args: argparse.Namespace) -> int:
    from services.retrieval.embedder import EmbedderLoadError
    from services.retrieval.evaluation import EvaluationInputError, load_cards
    from services.retrieval.finetune import TrainingInputError, train_retriever

    _check_folder_out("--out", Path(args.out))
    try:
        cards = load_cards(args.cards)
        out = train_retriever(cards, args.out, epochs=args.epochs, seed=args.seed,
                              base_model_path=args.base, instruction=args.instruction)
    except (EvaluationInputError, TrainingInputError, EmbedderLoadError) as err:
        raise UserError(str(err)) from err
    print(f"trained on {len(cards)} adapters; model folder: {out}")
    return 0


# Output paths are checked before the work, not after it: a result that cannot be written
# would otherwise cost the whole run and end in a traceback.

def _check_writable(path: Path, flag: str = "--json") -> None:
    """A file to be written: not a folder, in an existing folder this process can write in."""
    if path.is_dir():
        raise UserError(f"{flag} {path}: is a folder, not a file")
    if not path.parent.is_dir():
        state = "is not a folder" if path.parent.exists() else "does not exist"
        raise UserError(f"{flag} {path}: {path.parent} {state}")
    _check_can_write_in(flag, path, path.parent)


def _check_folder_out(flag: str, path: Path) -> None:
    """A folder to be created (with its missing parents) or filled: not a file, and the nearest
    existing folder above it writable (the result is staged next to it, then renamed)."""
    if path.exists() and not path.is_dir():
        raise UserError(f"{flag} {path}: is a file, not a folder")
    above = path.parent
    while not above.exists():
        above = above.parent
    if not above.is_dir():
        raise UserError(f"{flag} {path}: {above} is a file, not a folder")
    _check_can_write_in(flag, path, above)


def _check_can_write_in(flag: str, path: Path, folder: Path) -> None:
    """Create and remove a file in folder: permissions, read-only mounts and root all answer truly."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-check.", dir=folder)
    except OSError as err:
        raise UserError(f"{flag} {path}: cannot write in {folder} ({err.strerror})") from err
    os.close(fd)
    os.unlink(probe)


def _write_atomically(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
