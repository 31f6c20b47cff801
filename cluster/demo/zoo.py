"""Build and load the demo adapter zoo.

Layout of a zoo root (default `$LORARETRIEVER_HOME/demo`):

    base/                  Hugging Face folder of the base model (safetensors, tokenizer, chat template)
    adapters/<name>/       PEFT folder: adapter_config.json + adapter_model.safetensors
    cards.json             one card (20 samples, domain) per planned adapter
    queries.json           held-out queries: inputs, targets, task, domain, metric
    manifest.json          sha256 of every finished file, and base vs adapter scores

Every output is written under a temporary name and renamed into place when complete,
then recorded in manifest.json: a watcher may register each adapter as soon as its
folder appears, and an interrupted build resumes where it stopped. A build whose
outputs exist and match their recorded checksums does nothing.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from cluster.demo import base_model
from cluster.demo.tasks import HELD_OUT_TASKS, TASKS, Task
from cluster.demo.train import TrainSettings, greedy_answers, train_lora
from services.config import data_home
from services.schemas import AdapterCard, CardSample, Query
from services.evaluation.generation import primary_score
from services.text_metrics import score

log = logging.getLogger(__name__)

MANIFEST_VERSION = 1
CARD_SAMPLES = 20


class ZooError(RuntimeError):
    """A zoo folder that cannot be built or read; the message names the file."""


@dataclass(frozen=True)
class Recipe:
    """Everything that decides a zoo's content: a change retrains what it touches."""

    tiny: bool
    tasks: tuple[str, ...]
    train_examples: int
    queries_per_task: int
    train: TrainSettings
    max_answer_tokens: int | None = None  # cap on the build's scoring answers (None: the longest target + 4)

    @property
    def base_name(self) -> str:
        return "tiny-random-llama" if self.tiny else base_model.BASE_MODEL_NAME

    def adapter_key(self, task: str, examples: list) -> str:
        """Fingerprint of one adapter's recipe, its training data included."""
        blob = json.dumps([self.base_name, task, examples, asdict(self.train)], sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


FULL_SETTINGS = TrainSettings(steps=30, batch_size=8, learning_rate=2e-3)
TINY_SETTINGS = TrainSettings(steps=3, batch_size=4, learning_rate=1e-2)  # B far from zero
TINY_TASKS = ("uppercase", "add", "review_sentiment")  # three domains


def make_recipe(*, tiny: bool = False, adapters: int | None = None) -> Recipe:
    names = TINY_TASKS if tiny else tuple(t.name for t in TASKS)
    if adapters is not None:
        if not 1 <= adapters <= len(names):
            raise ZooError(f"adapters must be between 1 and {len(names)}, not {adapters}")
        names = names[:adapters]
    return Recipe(
        tiny=tiny, tasks=names, train_examples=24 if tiny else 80, queries_per_task=4 if tiny else 15,
        train=TINY_SETTINGS if tiny else FULL_SETTINGS,
    )


@dataclass
class ZooPaths:
    root: Path
    base: Path
    cards_file: Path
    queries_file: Path
    manifest_file: Path
    cards: list[AdapterCard] = field(default_factory=list)  # every planned adapter
    queries: list[Query] = field(default_factory=list)
    adapters: dict[str, Path] = field(default_factory=dict)  # complete and verified, in build order
    manifest: dict = field(default_factory=dict)

    @property
    def adapters_dir(self) -> Path:
        return self.root / "adapters"

    @property
    def complete(self) -> bool:
        """The base model and every planned adapter are finished and verified."""
        return (self.base / "config.json").is_file() and bool(self.cards) and all(
            c.model_name in self.adapters for c in self.cards
        )


def held_out_queries(per_task: int = 15) -> list[Query]:
    """Queries of the tasks no adapter is trained for (cluster/demo/tasks.py HELD_OUT_TASKS)."""
    return [Query(inputs=x, targets=y, task=task.name, domain=task.domain, metric=task.metric)
            for task in HELD_OUT_TASKS for x, y in task.examples(per_task, seed=1)]


def default_root() -> Path:
    return data_home() / "demo"


def _paths(root: Path) -> ZooPaths:
    root = Path(root)
    return ZooPaths(root, root / "base", root / "cards.json", root / "queries.json", root / "manifest.json")


# ---- checksums and atomic writes ------------------------------------------------------


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _folder_sums(folder: Path) -> dict[str, str]:
    return {p.name: sha256_file(p) for p in sorted(folder.iterdir()) if p.is_file()}


def _matches(folder: Path, sums: dict[str, str] | None) -> bool:
    if not sums or not folder.is_dir():
        return False
    return all((folder / name).is_file() and sha256_file(folder / name) == digest for name, digest in sums.items())


def _write_json(path: Path, data) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def _move_into_place(tmp: Path, dest: Path) -> None:
    if dest.exists():
        shutil.rmtree(dest)
    os.replace(tmp, dest)


def _scratch(dest: Path) -> Path:
    tmp = dest.with_name(f".{dest.name}.tmp{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    return tmp


@contextmanager
def _build_lock(root: Path):
    """One build per zoo at a time (a second `demo build`, or `up`, waits): both would train
    the same adapters and the later manifest write would drop the other's entries."""
    with open(root / ".build.lock", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("another build of %s is running; waiting for it", root)
            fcntl.flock(handle, fcntl.LOCK_EX)
        yield


# ---- reading --------------------------------------------------------------------------


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ZooError(f"{path} is not valid JSON: {err}") from err


def load_zoo(root: str | Path | None = None, *, verify: bool = True) -> ZooPaths:
    """The zoo at root as far as it is built: cards, queries and the adapters that are
    complete (recorded in the manifest and, with verify, matching their checksums)."""
    zoo = _paths(Path(root) if root is not None else default_root())
    if zoo.manifest_file.is_file():
        zoo.manifest = _read_json(zoo.manifest_file)
    if zoo.cards_file.is_file():
        zoo.cards = [AdapterCard.model_validate(c) for c in _read_json(zoo.cards_file)]
    if zoo.queries_file.is_file():
        zoo.queries = [Query.model_validate(q) for q in _read_json(zoo.queries_file)]
    for name, entry in zoo.manifest.get("adapters", {}).items():
        folder = zoo.adapters_dir / name
        if _matches(folder, entry["files"]) if verify else folder.is_dir():
            zoo.adapters[name] = folder
    return zoo


# ---- building -------------------------------------------------------------------------


def _task_data(task: Task, recipe: Recipe) -> tuple[list, AdapterCard, list[Query]]:
    examples = task.examples(recipe.train_examples + recipe.queries_per_task, seed=0)
    train, held_out = examples[: recipe.train_examples], examples[recipe.train_examples:]
    card = AdapterCard(
        model_name=task.name, domain=task.domain,
        sample=[CardSample(inputs=x, targets=y) for x, y in train[:CARD_SAMPLES]],
    )
    queries = [Query(inputs=x, targets=y, task=task.name, domain=task.domain, metric=task.metric) for x, y in held_out]
    return train, card, queries


def _answer_budget(tokenizer, queries: list[Query]) -> int:
    return max(len(tokenizer(q.targets, add_special_tokens=False).input_ids) for q in queries) + 4


def _task_score(answers: list[str], queries: list[Query]) -> float:
    """Mean EM, BLEU or ROUGE-L of answers to one task's queries."""
    values = [primary_score(q.metric, score(q.metric, a, q.targets)) for a, q in zip(answers, queries)]
    return round(sum(values) / len(values), 2)


def build_zoo(
    root: str | Path | None = None, *, tiny: bool = False, adapters: int | None = None,
    on_adapter: Callable[[str, Path], None] | None = None, progress: bool = True,
) -> ZooPaths:
    """Build (or finish, or verify) the zoo at root; returns it loaded.

    on_adapter(name, folder) is called as each adapter lands, including ones a previous
    build finished."""
    recipe = make_recipe(tiny=tiny, adapters=adapters)
    data = {name: _task_data(next(t for t in TASKS if t.name == name), recipe) for name in recipe.tasks}
    return build_from_data(Path(root) if root is not None else default_root(), recipe, data,
                           on_adapter=on_adapter, progress=progress)


TaskData = dict[str, tuple[list, AdapterCard, list[Query]]]  # name -> (training examples, card, held-out queries)


def build_from_data(root: Path, recipe: Recipe, data: TaskData, *,
                    on_adapter: Callable[[str, Path], None] | None = None, progress: bool = True) -> ZooPaths:
    """Build (or finish, or verify) a zoo of one adapter per entry of data, in recipe.tasks order;
    the demo zoo and the card zoos (cluster/demo/card_zoo.py) share it. Returns the zoo loaded."""
    zoo = _paths(root)
    zoo.adapters_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with _build_lock(zoo.root):
        trained = _build(zoo, recipe, data, on_adapter, progress)
    if trained:
        log.info("trained %d adapters in %.0f s (%d of %d were already built)", trained,
                 time.perf_counter() - started, len(recipe.tasks) - trained, len(recipe.tasks))
    return load_zoo(zoo.root)


def _build(zoo: ZooPaths, recipe: Recipe, data: TaskData, on_adapter, progress: bool) -> int:
    """Returns how many adapters it trained."""
    from peft import PeftModel
    from transformers import AutoTokenizer, LlamaForCausalLM

    manifest = _read_json(zoo.manifest_file) if zoo.manifest_file.is_file() else {}
    if manifest.get("version") != MANIFEST_VERSION or manifest.get("base_name") != recipe.base_name:
        manifest = {"version": MANIFEST_VERSION, "base_name": recipe.base_name, "adapters": {}}

    # Cards and queries first: they cost nothing, and a watcher can read them at once.
    _write_json(zoo.cards_file, [d[1].model_dump(exclude_none=True) for d in data.values()])
    _write_json(zoo.queries_file, [q.model_dump() for d in data.values() for q in d[2]])
    manifest.update(cards=sha256_file(zoo.cards_file), queries=sha256_file(zoo.queries_file))

    if not _matches(zoo.base, manifest.get("base")):
        tmp = _scratch(zoo.base)
        log.info("writing the %s base model to %s", recipe.base_name, zoo.base)
        (base_model.write_tiny if recipe.tiny else base_model.write_smollm2)(tmp)
        _move_into_place(tmp, zoo.base)
        manifest = {**manifest, "base": _folder_sums(zoo.base), "adapters": {}}  # new base: retrain all
        _write_json(zoo.manifest_file, manifest)

    # Adapters of an older recipe, or no longer planned, are retired before any new one lands.
    kept = {
        name: entry for name, entry in manifest["adapters"].items()
        if name in data and entry.get("recipe") == recipe.adapter_key(name, data[name][0]) and _matches(zoo.adapters_dir / name, entry["files"])
    }
    for stale in set(manifest["adapters"]) - set(kept):
        shutil.rmtree(zoo.adapters_dir / stale, ignore_errors=True)
    manifest["adapters"] = kept
    _write_json(zoo.manifest_file, manifest)
    for name in kept:
        if on_adapter is not None:
            on_adapter(name, zoo.adapters_dir / name)

    todo = [name for name in recipe.tasks if name not in kept]
    if todo:
        tokenizer = AutoTokenizer.from_pretrained(zoo.base)
        model = LlamaForCausalLM.from_pretrained(zoo.base, dtype=torch.float32)
        model.name_or_path = recipe.base_name  # what PEFT records as base_model_name_or_path
        bar = tqdm(todo, desc="training adapters", unit="adapter", disable=not progress)
        for name in bar:
            train, card, queries = data[name]
            bar.set_postfix_str(name)
            started = time.perf_counter()
            tmp = _scratch(zoo.adapters_dir / name)
            steps = tqdm(total=recipe.train.steps, desc=f"  {name}", unit="step", leave=False, disable=not progress)
            train_lora(model, tokenizer, train, tmp, recipe.train,
                       on_step=lambda loss: (steps.update(), steps.set_postfix(loss=f"{loss:.3f}")))
            steps.close()
            trained = time.perf_counter() - started

            # Scored before it lands: a zoo records how much each adapter beats the base model.
            inputs, budget = [q.inputs for q in queries], _answer_budget(tokenizer, queries)
            budget = min(budget, recipe.max_answer_tokens or budget)
            base_answers = greedy_answers(model, tokenizer, inputs, budget)
            peft_model = PeftModel.from_pretrained(model, tmp)
            adapter_answers = greedy_answers(peft_model, tokenizer, inputs, budget)
            model = peft_model.unload()

            metric = queries[0].metric
            _move_into_place(tmp, zoo.adapters_dir / name)
            manifest["adapters"][name] = {
                "files": _folder_sums(zoo.adapters_dir / name),
                "recipe": recipe.adapter_key(name, train),
                "domain": card.domain,
                "metric": metric,
                "base_score": _task_score(base_answers, queries),
                "adapter_score": _task_score(adapter_answers, queries),
                "train_seconds": round(trained, 1),
            }
            _write_json(zoo.manifest_file, manifest)
            log.info("adapter %s: %s base %.1f -> adapter %.1f", name, metric,
                     manifest["adapters"][name]["base_score"], manifest["adapters"][name]["adapter_score"])
            if on_adapter is not None:
                on_adapter(name, zoo.adapters_dir / name)
    return len(todo)
