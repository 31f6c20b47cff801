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
    # unset, each comes from the folder's recorded serving (a tuned model: what its tuning chose), else
    # the configured embedder's: float32, centroid, hybrid with the weight chosen on the cards; the
    # runtime as replicas take it (bf16 on a CPU with AMX: services/retrieval/host_runtime.py)
    ev.add_argument("--backend", choices=EMBEDDER_BACKENDS,
                    help=f"embedding runtime (torch is the reference; default: bf16 on a CPU with AMX, else the model's "
                    f"serving, else {DEFAULT_EMBEDDER_BACKEND})")
    ev.add_argument("--max-seq-length", type=int, default=DEFAULT_MAX_SEQ_LENGTH, help="tokens kept per text")
    ev.add_argument("--scoring", choices=("centroid", "samples"), help="adapter scoring (default: the model's serving, else centroid)")
    hybrid = ev.add_mutually_exclusive_group()
    hybrid.add_argument("--hybrid-weight", type=float, help="the embedding's share of the hybrid score, 0-1 "
                        "(default: the model's serving, else chosen on the cards as replicas do)")
    hybrid.add_argument("--no-hybrid", action="store_true", help="rank by the embedding alone (--hybrid-weight 1)")
    ev.add_argument("--exclude-own", action="store_true",
                    help="remove each query's own adapter; report how often an adapter of its domain ranks in the top k")
    ev.add_argument("--json", dest="json_out", help="also write the result to this file")
    ev.set_defaults(func=cmd_eval_retrieval)

    retriever = command_group(sub, "retriever", "the prompt embedder used for retrieval")
    tr = retriever.add_parser("train", help="fine-tune the embedder on the adapters in CARDS.json as the cluster's "
                              "tuning does: a candidate scored on held-out card samples, its serving chosen, then "
                              "refit on every sample (services/retrieval/tuning.py)")
    tr.add_argument("--cards", required=True, help="CARDS.json of the training adapters")
    tr.add_argument("--out", required=True, help="new or empty folder for the trained model")
    tr.add_argument("--epochs", type=int, help="epochs over every card sample (default: the recipe's 5)")
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--base", help="model folder to start from (default: packaged all-MiniLM-L6-v2)")
    tr.add_argument("--instruction", default=DEFAULT_INSTRUCTION, help="prefix used in training, as at retrieval time")
    tr.add_argument("--heldout-fraction", type=float, default=0.25, help="share of each card's samples held out to "
                    "score the candidate and choose its serving")
    tr.add_argument("--no-refit", action="store_true", help="keep the candidate trained without the held-out samples")
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
    from dataclasses import asdict

    from services.retrieval.embedder import EmbedderLoadError
    from services.retrieval.evaluation import EvaluationInputError, evaluate, load_cards, load_queries
    from services.retrieval.host_runtime import host_backend
    from services.retrieval.served import Serving, read_serving, served_retriever

    if args.json_out:
        _check_writable(Path(args.json_out))
    if args.hybrid_weight is not None and not 0.0 <= args.hybrid_weight <= 1.0:
        raise UserError(f"--hybrid-weight must be between 0 and 1, got {args.hybrid_weight}")
    try:
        cards = load_cards(args.cards)
        queries = load_queries(args.queries, cards)
        recorded = read_serving(args.embedder) or Serving()
        serving = Serving(backend=args.backend or host_backend(recorded.backend), scoring=args.scoring or recorded.scoring,
                          hybrid_weight=1.0 if args.no_hybrid else
                          args.hybrid_weight if args.hybrid_weight is not None else recorded.hybrid_weight)
        retriever, weight = served_retriever(args.embedder, cards, serving, instruction=args.instruction, threads=None,
                                             max_seq_length=args.max_seq_length)
    except (EvaluationInputError, EmbedderLoadError) as err:
        raise UserError(str(err)) from err
    result = evaluate(retriever, cards, queries, exclude_own=args.exclude_own, progress=True)
    result["serving"] = {**asdict(serving), "hybrid_weight": weight}
    text = json.dumps(result, indent=1)
    if args.json_out:
        _write_atomically(Path(args.json_out), text + "\n")
    print(text)
    return 0


def cmd_retriever_train(args: argparse.Namespace) -> int:
    from services.retrieval.embedder import EmbedderLoadError
    from services.retrieval.evaluation import EvaluationInputError, load_cards
    from services.retrieval.finetune import TrainingInputError
    from services.retrieval.tuning import tune_cards

    _check_folder_out("--out", Path(args.out))
    if not 0.0 < args.heldout_fraction < 1.0:
        raise UserError(f"--heldout-fraction must be between 0 and 1, got {args.heldout_fraction}")
    try:
        cards = load_cards(args.cards)
        outcome = tune_cards(cards, Path(args.out), heldout_fraction=args.heldout_fraction, refit_all=not args.no_refit,
                             instruction=args.instruction, seed=args.seed, epochs=args.epochs,
                             base_model_path=args.base, progress=lambda m: print(m, flush=True))
    except (EvaluationInputError, TrainingInputError, EmbedderLoadError) as err:
        raise UserError(str(err)) from err
    s = outcome["serving"]
    scored = (f"held-out top-1 {outcome['candidate_top1']:.1f}% against the configured embedder's "
              f"{outcome['current_top1']:.1f}%; " if outcome["gated"] else "")
    print(f"trained on {len(cards)} adapters; {scored}serves with {s.backend}, {s.scoring} scoring, embedding "
          f"weight {s.hybrid_weight}; model folder: {args.out}")
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
