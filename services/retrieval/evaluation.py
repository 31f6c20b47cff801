"""Retrieval accuracy on cards and labelled queries: top-k hit rates, per domain, cost per query."""
from __future__ import annotations

import json
import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
from pydantic import TypeAdapter, ValidationError

from services.retrieval.retriever import Retriever
from services.schemas import AdapterCard, Query

KS = (1, 3, 5, 8)


class EvaluationInputError(ValueError):
    """A cards or queries file that cannot be evaluated; the message names the file and the field."""


def _field(loc: tuple) -> str:
    """(3, 'sample', 0, 'inputs') -> 'entry 3, field sample[0].inputs'."""
    entry, *rest = loc
    path = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in rest).lstrip(".")
    return f"entry {entry}" + (f", field {path}" if path else "")


def _load_list(path: str | Path, model: type):
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError as err:
        raise EvaluationInputError(f"{path}: file not found") from err
    except (OSError, UnicodeDecodeError) as err:
        raise EvaluationInputError(f"{path}: cannot read: {err}") from err
    except json.JSONDecodeError as err:
        raise EvaluationInputError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(data, list) or not data:
        raise EvaluationInputError(f"{path}: expected a non-empty JSON list")
    try:
        return TypeAdapter(list[model]).validate_python(data)
    except ValidationError as err:
        first = err.errors()[0]
        raise EvaluationInputError(f"{path}: {_field(first['loc'])}: {first['msg']}") from err


def load_cards(path: str | Path) -> list[AdapterCard]:
    cards = _load_list(path, AdapterCard)
    seen = set()
    for i, card in enumerate(cards):
        if card.model_name in seen:
            raise EvaluationInputError(f"{path}: entry {i}, field model_name: adapter {card.model_name!r} appears twice")
        seen.add(card.model_name)
    return cards


def load_queries(path: str | Path, cards: list[AdapterCard], *, held_out: bool = False) -> list[Query]:
    """Queries whose task names a card; with held_out, tasks that no adapter was trained for."""
    queries = _load_list(path, Query)
    names = {c.model_name for c in cards}
    for i, q in enumerate(queries):
        if held_out and q.task in names:
            raise EvaluationInputError(f"{path}: entry {i}, field task: {q.task!r} has an adapter, it is not held out")
        if not held_out and q.task not in names:
            raise EvaluationInputError(f"{path}: entry {i}, field task: no card for adapter {q.task!r}")
    return queries


def adapter_domains(cards: list[AdapterCard], queries: list[Query]) -> dict[str, str | None]:
    """Each adapter's domain: from its card, else the most common domain of its task's queries."""
    from_queries: dict[str, Counter] = defaultdict(Counter)
    for q in queries:
        from_queries[q.task][q.domain] += 1
    return {c.model_name: c.domain or (from_queries[c.model_name].most_common(1)[0][0]
                                       if from_queries[c.model_name] else None) for c in cards}


def index_cards(retriever: Retriever, cards: list[AdapterCard], *, progress: bool = False) -> None:
    """Index every card, encoding all samples in one batched pass."""
    texts = [s.inputs for c in cards for s in c.sample]
    vectors = retriever.embedder.encode(texts, progress=progress)  # (all samples, dim)
    start = 0
    for card in cards:
        retriever.index.upsert(card.model_name, vectors[start:start + len(card.sample)], domain=card.domain)
        start += len(card.sample)


def evaluate(retriever: Retriever, cards: list[AdapterCard], queries: list[Query], *, exclude_own: bool = False,
             scoring: str | None = None, progress: bool = False) -> dict:
    """Index `cards` into the retriever's (empty) index and score `queries`.

    A query is a top-k hit when its top k adapters hold a fitting one: its own adapter, or under
    exclude_own (its own adapter removed from the candidates) any adapter of the query's domain.
    """
    started = time.perf_counter()
    index_cards(retriever, cards, progress=progress)
    t0 = time.perf_counter()
    vectors = retriever.embedder.encode([q.inputs for q in queries], progress=progress)  # (queries, dim)
    t1 = time.perf_counter()
    ranked: list[list[str]] = [[] for _ in queries]
    groups = defaultdict(list)  # exclusion set -> query rows sharing it
    for i, q in enumerate(queries):
        groups[(q.task,) if exclude_own else ()].append(i)
    for exclude, rows in groups.items():
        results = retriever.search(vectors[rows], [queries[r].inputs for r in rows], top_k=max(KS), exclude=exclude,
                                   scoring=scoring)
        for row, result in zip(rows, results):
            ranked[row] = [a.name for a in result.adapters]
    t2 = time.perf_counter()

    domain_of = adapter_domains(cards, queries)
    fits = ((lambda q, name: domain_of[name] == q.domain) if exclude_own else (lambda q, name: name == q.task))
    hits = np.array([[any(fits(q, n) for n in names[:k]) for k in KS] for q, names in zip(queries, ranked)])  # (queries, len(KS))
    per_domain = {}
    for domain in sorted({q.domain for q in queries}):
        rows = [i for i, q in enumerate(queries) if q.domain == domain]
        per_domain[domain] = {**_rates(hits[rows]), "queries": len(rows)}
    n = len(queries)
    return {
        **_rates(hits), "per_domain": per_domain, "queries": n,
        "match": "domain" if exclude_own else "task", "scoring": scoring or retriever.index.scoring,
        "embed_ms_per_query": round(1000 * (t1 - t0) / n, 3), "search_ms_per_query": round(1000 * (t2 - t1) / n, 3),
        "seconds": round(time.perf_counter() - started, 3),
    }


def _rates(hits: np.ndarray) -> dict[str, float]:
    """Percent of rows hit at each k; hits is (rows, len(KS)) bool."""
    return {f"top{k}": round(100.0 * float(hits[:, j].mean()), 2) for j, k in enumerate(KS)}
