"""A real-task zoo: one LoRA per task of a cards file (e.g. cluster/data/flan_cards.json, the
66 Flan tasks of the LoraRetriever paper), trained with the demo's trainer, as a benchmark beside
the demo zoo (`loraretriever demo build --cards FILE`; not part of `up`).

Each task's samples are split once, per task and fold, into training samples and held-out ones:
the adapter trains on the training samples, its card (what the registry, the retriever and the
auto policy's measurements see) holds only them, and the held-out samples become the zoo's
queries.json, for evaluation only. The layout is the demo zoo's (cluster/demo/zoo.py), so
`eval generate --cards ROOT/cards.json --queries ROOT/queries.json --adapters ROOT/adapters
--base ROOT/base` reads it.

Cards file: {"tasks": [{"task", "domain", "samples": [{"inputs", "targets"}, ...]}, ...]}.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from cluster.demo.train import TrainSettings
from cluster.demo.zoo import TINY_SETTINGS, Recipe, TaskData, ZooError, ZooPaths, build_from_data
from services.config import data_home
from services.schemas import AdapterCard, CardSample, Query

# The issue's recipe: 15 steps of 4 examples, rank 8; with 15 training samples, four epochs.
CARD_SETTINGS = TrainSettings(steps=15, batch_size=4, learning_rate=2e-3)
HELD_OUT_SAMPLES = 5
ANSWER_TOKENS = 16  # the build scores each adapter with answers this long (the benchmark's length)
# The paper's metrics: BLEU for translation, ROUGE for data-to-text, exact match for the rest.
METRIC_BY_DOMAIN = {"translation": "bleu", "struct to text": "rouge"}


@dataclass(frozen=True)
class TaskCard:
    name: str
    domain: str
    samples: list[tuple[str, str]]  # (inputs, targets)


def default_card_root(fold: int = 0) -> Path:
    return data_home() / ("flan" if fold == 0 else f"flan-fold{fold}")


def read_task_cards(path: Path) -> list[TaskCard]:
    """The tasks of a cards file; a malformed one is a ZooError naming the file and the entry."""
    try:
        raw = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ZooError(f"--cards {path}: cannot read a cards file: {err}") from err
    entries = raw.get("tasks") if isinstance(raw, dict) else None
    if not isinstance(entries, list) or not entries:
        raise ZooError(f"--cards {path}: expected {{\"tasks\": [{{\"task\", \"domain\", \"samples\"}}, ...]}}")
    tasks, seen = [], set()
    for i, entry in enumerate(entries):
        try:
            name, domain = str(entry["task"]), str(entry["domain"])
            samples = [(str(s["inputs"]), str(s["targets"])) for s in entry["samples"]]
        except (KeyError, TypeError) as err:
            raise ZooError(f"--cards {path}: task entry {i} lacks task, domain or samples with inputs and targets") from err
        if name in seen:
            raise ZooError(f"--cards {path}: task {name!r} appears twice")
        seen.add(name)
        tasks.append(TaskCard(name, domain, samples))
    return tasks


def choose_tasks(tasks: list[TaskCard], *, families: list[str] | None = None,
                 names: list[str] | None = None) -> list[TaskCard]:
    """The tasks of the named families (domains) and the named tasks; neither: all of them."""
    if not families and not names:
        return tasks
    domains, known = {t.domain for t in tasks}, {t.name for t in tasks}
    unknown = [f for f in families or [] if f not in domains]
    if unknown:
        raise ZooError(f"--families: no task of family {', '.join(unknown)}; the cards have {', '.join(sorted(domains))}")
    missing = [n for n in names or [] if n not in known]
    if missing:
        raise ZooError(f"--tasks: no card for {', '.join(missing)}")
    return [t for t in tasks if t.domain in (families or []) or t.name in (names or [])]


def split_samples(task: TaskCard, held_out: int, fold: int) -> tuple[list, list]:
    """(training samples, held-out samples): a fixed shuffle per task, fold f holding out the f-th
    block of `held_out` samples, so folds 0, 1, ... hold out disjoint samples."""
    if not 1 <= held_out < len(task.samples):
        raise ZooError(f"task {task.name!r} has {len(task.samples)} samples: cannot hold out {held_out}")
    if not 0 <= fold * held_out <= len(task.samples) - held_out:
        raise ZooError(f"--fold {fold}: task {task.name!r} has {len(task.samples)} samples, "
                       f"{len(task.samples) // held_out} folds of {held_out}")
    order = list(task.samples)
    random.Random(f"split:{task.name}").shuffle(order)
    start = fold * held_out
    return order[:start] + order[start + held_out:], order[start:start + held_out]


def task_data(tasks: list[TaskCard], held_out: int, fold: int) -> TaskData:
    data = {}
    for task in tasks:
        train, test = split_samples(task, held_out, fold)
        metric = METRIC_BY_DOMAIN.get(task.domain, "em")
        card = AdapterCard(model_name=task.name, domain=task.domain,
                           sample=[CardSample(inputs=x, targets=y) for x, y in train])
        queries = [Query(inputs=x, targets=y, task=task.name, domain=task.domain, metric=metric) for x, y in test]
        data[task.name] = (train, card, queries)
    return data


def build_card_zoo(cards: Path, root: Path | None = None, *, families: list[str] | None = None,
                   names: list[str] | None = None, held_out: int = HELD_OUT_SAMPLES, fold: int = 0,
                   tiny: bool = False, on_adapter: Callable[[str, Path], None] | None = None,
                   progress: bool = True) -> ZooPaths:
    """Build (or resume, or verify) the zoo of the chosen tasks of a cards file at root."""
    tasks = choose_tasks(read_task_cards(cards), families=families, names=names)
    data = task_data(tasks, held_out, fold)
    recipe = Recipe(tiny=tiny, tasks=tuple(data), train_examples=len(next(iter(data.values()))[0]),
                    queries_per_task=held_out, train=TINY_SETTINGS if tiny else CARD_SETTINGS,
                    max_answer_tokens=ANSWER_TOKENS)
    return build_from_data(Path(root) if root is not None else default_card_root(fold), recipe, data,
                           on_adapter=on_adapter, progress=progress)
