"""The peer benchmark's workload: which adapters exist, which is asked for when, with which prompt.

The same workload goes to every system: arrival times drawn from a Poisson process, each
request's adapter drawn by Zipf popularity over the demo adapters plus generated variants, and
a held-out query of the adapter's task as its prompt. Everything is seeded: one seed, one workload.
"""
from __future__ import annotations

import json
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

from cluster.demo.variants import variant_adapter
from services.lora.adapter_files import adapter_checksum

VARIANT_FILE = "variant.json"  # what a cached variant was made from; a mismatch remakes it
SCALE_RANGE = (0.5, 1.5)  # a variant's lora_B factor: the same shapes, different answers


@dataclass(frozen=True)
class Adapter:
    name: str
    path: Path
    task: str  # the demo task whose queries it answers: its own, or its source's for a variant
    domain: str


@dataclass(frozen=True)
class Request:
    at: float  # seconds after the run starts
    adapter: str
    query: int  # index into the queries


def zipf_probabilities(n: int, s: float) -> list[float]:
    """P(rank i) proportional to 1 / i^s for ranks 1..n (s = 0: uniform)."""
    if n < 1 or s < 0:
        raise ValueError(f"Zipf needs n >= 1 and s >= 0, not n={n}, s={s}")
    weights = [1.0 / (i ** s) for i in range(1, n + 1)]
    total = sum(weights)
    return [w / total for w in weights]


def poisson_arrivals(rate: float, seconds: float, seed: int) -> list[float]:
    """Arrival times in [0, seconds) of a Poisson process of `rate` per second."""
    if rate <= 0 or seconds <= 0:
        raise ValueError(f"rate and seconds must be positive, not {rate} and {seconds}")
    rng = random.Random(f"arrivals/{seed}/{rate}")
    times, t = [], rng.expovariate(rate)
    while t < seconds:
        times.append(t)
        t += rng.expovariate(rate)
    return times


def popularity_order(names: list[str], seed: int) -> list[str]:
    """The adapters from most to least popular: a seeded shuffle, so originals and variants mix."""
    order = list(names)
    random.Random(f"popularity/{seed}").shuffle(order)
    return order


def open_loop_requests(adapters: list[Adapter], queries_by_task: dict[str, list[int]], *, rate: float,
                       seconds: float, zipf: float, seed: int) -> list[Request]:
    """Poisson arrivals; each picks an adapter by Zipf popularity and a query of that adapter's task."""
    by_name = {a.name: a for a in adapters}
    ranked = popularity_order(list(by_name), seed)
    probabilities = zipf_probabilities(len(ranked), zipf)
    rng = random.Random(f"requests/{seed}/{rate}")
    requests = []
    for at in poisson_arrivals(rate, seconds, seed):
        name = rng.choices(ranked, probabilities)[0]
        requests.append(Request(at, name, rng.choice(queries_by_task[by_name[name].task])))
    return requests


def siblings(adapter: Adapter, originals: list[Adapter], count: int = 2) -> list[str]:
    """The fixed partners an adapter is mixed or fused with: the first `count` other demo
    adapters of its domain (the full zoo has three per domain), then others in zoo order."""
    others = [a for a in originals if a.task != adapter.task]
    ranked = [a for a in others if a.domain == adapter.domain] + [a for a in others if a.domain != adapter.domain]
    if len(ranked) < count:
        raise ValueError(f"{len(ranked)} other adapters; {count} are needed to mix with {adapter.name!r}")
    return [a.name for a in ranked[:count]]


def variant_scale(name: str, seed: int) -> float:
    return random.Random(f"variant/{seed}/{name}").uniform(*SCALE_RANGE)


def make_variants(originals: list[Adapter], total: int, folder: Path, seed: int) -> list[Adapter]:
    """The originals plus variants up to `total` adapters. Variant i copies original i mod n with
    lora_B scaled by a seeded factor; each is a PEFT folder cached under `folder` and remade only
    when its source or factor changed."""
    adapters = list(originals)
    for i in range(max(total - len(originals), 0)):
        source = originals[i % len(originals)]
        name = f"{source.name}-v{i // len(originals) + 1}"
        dest = folder / name
        recipe = {"source": source.name, "source_sha256": adapter_checksum(source.path),
                  "scale": variant_scale(name, seed)}
        if not _cached(dest, recipe):
            scratch = folder / f".{name}.tmp"
            shutil.rmtree(scratch, ignore_errors=True)
            variant_adapter(source.path, scratch, recipe["scale"])
            (scratch / VARIANT_FILE).write_text(json.dumps(recipe, sort_keys=True))
            shutil.rmtree(dest, ignore_errors=True)
            scratch.rename(dest)
        adapters.append(Adapter(name, dest, source.task, source.domain))
    return adapters


def _cached(dest: Path, recipe: dict) -> bool:
    try:
        return json.loads((dest / VARIANT_FILE).read_text()) == recipe
    except (OSError, ValueError):
        return False
