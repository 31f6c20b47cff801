"""How one row of a batch is composed: the one type the planner, the engine and the evaluation share.

A `Composition` is normalized when it is made, by its mode's rule: the engine applies exactly
what it holds (selection has one adapter at weight 1, none has no adapter). To add a mode, add
a `CompositionMode` member and its rule with `mode_rule(...)`; the engine's layers read
only `Composition.fuses` (average the factors) versus summing the adapters' outputs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum
from typing import Callable, Sequence

from services.errors import InvalidRequest


class CompositionMode(str, Enum):
    selection = "selection"  # top-1 adapter only
    mixture = "mixture"  # weighted sum of the adapters' outputs
    fusion = "fusion"  # weighted average of A and of B, one low-rank product
    none = "none"  # base model


class Weighting(str, Enum):
    uniform = "uniform"  # 1/k, the paper's default
    softmax = "softmax"  # softmax(score / temperature)


class CompositionError(InvalidRequest):
    """A row's adapters, weights or mode cannot be composed."""


@dataclass(frozen=True, order=True)
class AdapterKey:
    """An adapter version as composers, pools and routers know it: `name@version`."""

    name: str
    version: str

    def __str__(self) -> str:
        return f"{self.name}@{self.version}"

    @classmethod
    def parse(cls, key: str) -> "AdapterKey":
        name, sep, version = key.partition("@")
        if not (sep and name and version):
            raise ValueError(f"adapter key {key!r} is not name@version")
        return cls(name, version)


@dataclass(frozen=True)
class ModeRule:
    """What a mode does with the adapters a planner hands it (best first)."""

    max_adapters: int | None  # None: as many as given
    fuses: bool  # one low-rank product of the averaged factors, instead of a sum of outputs


MODE_RULES: dict[CompositionMode, ModeRule] = {}


def mode_rule(mode: CompositionMode, *, max_adapters: int | None, fuses: bool = False) -> None:
    MODE_RULES[mode] = ModeRule(max_adapters=max_adapters, fuses=fuses)


mode_rule(CompositionMode.none, max_adapters=0)  # the base model
mode_rule(CompositionMode.selection, max_adapters=1)  # top-1 at weight 1
mode_rule(CompositionMode.mixture, max_adapters=None)  # y = W x + sum_k w_k s_k B_k A_k x
mode_rule(CompositionMode.fusion, max_adapters=None, fuses=True)  # y = W x + s (sum w_k B_k)(sum w_k A_k) x


@dataclass(frozen=True)
class Composition:
    """Adapters (pool keys, best first), one weight each, and the mode; normalized by `of`."""

    mode: CompositionMode = CompositionMode.none
    adapters: tuple[str, ...] = ()
    weights: tuple[float, ...] = ()

    @classmethod
    def of(cls, mode: CompositionMode | str, adapters: Sequence[str] = (),
           weights: Sequence[float] | None = None) -> "Composition":
        """The composition `mode` makes of `adapters` (best first) with `weights` (None = uniform
        1/k; given weights are applied as they are, not renormalized)."""
        mode = CompositionMode(mode)
        rule = MODE_RULES[mode]
        adapters = tuple(adapters)
        weights = uniform(len(adapters)) if weights is None else tuple(float(w) for w in weights)
        if len(weights) != len(adapters):
            raise CompositionError(f"{len(adapters)} adapters but {len(weights)} weights")
        if rule.max_adapters == 0 or not adapters:
            return cls()
        if rule.max_adapters == 1:
            return cls(mode, adapters[:1], (1.0,))
        if len(set(adapters)) != len(adapters):
            raise CompositionError("an adapter appears twice in one row")
        if any(not math.isfinite(w) for w in weights):
            raise CompositionError("weights must be finite numbers")
        return cls(mode, adapters, weights)

    @classmethod
    def single(cls, adapter: str) -> "Composition":
        return cls.of(CompositionMode.selection, [adapter])

    @property
    def fuses(self) -> bool:
        return MODE_RULES[self.mode].fuses

    @property
    def is_base(self) -> bool:
        return not self.adapters


def uniform(k: int) -> tuple[float, ...]:
    """The paper's default weight 1/k."""
    return (1.0 / k,) * k if k else ()


WEIGHTINGS: dict[Weighting, Callable[[list[float], float], list[float]]] = {
    Weighting.uniform: lambda scores, temperature: list(uniform(len(scores))),
    Weighting.softmax: lambda scores, temperature: softmax(scores, temperature),
}


def softmax(scores: list[float], temperature: float) -> list[float]:
    """softmax(score / temperature), shifted by the top score for stability."""
    top = max(scores)
    exps = [math.exp((s - top) / temperature) for s in scores]
    total = sum(exps)
    return [e / total for e in exps]


def composition_weights(scores: list[float], weighting: Weighting, temperature: float) -> list[float]:
    """Weights summing to 1 from retrieval scores: uniform (1/k) or softmax(score / temperature)."""
    return WEIGHTINGS[weighting](scores, temperature) if scores else []
