"""Exact adapter search in process memory: the embedded index's search path.

Embedded Qdrant evaluates payload filters in Python, point by point, for every query: with 21
points per adapter a filtered search costs about half a second at 1,000 adapters. Here the
filters are numpy masks over adapters and a batch of queries is one matrix product, so the
cost is the vector math. Scores are cosines, as Qdrant's (rows are stored unit-length).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from services.schemas import RetrievedAdapter


@dataclass
class _Entry:
    version: str
    tenant: str | None
    base_model: str | None
    centroid: np.ndarray  # (dim,) unit mean of the samples
    samples: np.ndarray  # (samples, dim) unit rows; a view into the stacked matrix once that is built


class MatrixIndex:
    def __init__(self, dim: int):
        self.dim = dim
        self._entries: dict[str, _Entry] = {}
        self._centroids = None  # rebuilt on the first search after a change
        self._samples = None

    def put(self, name: str, samples: np.ndarray, version: str, tenant: str | None, base_model: str | None) -> None:
        centroid = samples.mean(0)
        self._entries[name] = _Entry(version, tenant, base_model, centroid / np.linalg.norm(centroid), samples)
        self._centroids = self._samples = None

    def drop(self, name: str) -> None:
        if self._entries.pop(name, None) is not None:
            self._centroids = self._samples = None

    def names(self) -> list[str]:
        return sorted(self._entries)

    def nbytes(self) -> int:
        """Vector memory: centroids and card samples (stored once: entries view the stacked matrix)."""
        if self._samples is None:
            samples = sum(e.samples.nbytes for e in self._entries.values())
        else:
            samples = self._samples[0].nbytes + self._samples[1].nbytes
        centroids = sum(e.centroid.nbytes for e in self._entries.values())
        return samples + centroids + (self._centroids[-1].nbytes if self._centroids else 0)

    def search(self, queries: np.ndarray, *, top_k: int, tenant: str | None, base_model: str | None,
               exclude: Sequence[str], scoring: str, sample_top_m: int) -> list[list[RetrievedAdapter]]:
        """The top_k visible adapters for each unit query row (n, dim), best first."""
        if not self._entries:
            return [[] for _ in queries]
        names, versions, tenants, bases, centroids = self._centroid_arrays()
        visible = (tenants == None) if tenant is None else ((tenants == None) | (tenants == tenant))  # noqa: E711
        if base_model is not None:
            visible &= bases == base_model
        if exclude:
            visible &= ~np.isin(names, list(exclude))
        if scoring == "centroid":
            scores = queries @ centroids.T  # (n, adapters)
        else:
            scores = self._best_samples_mean(queries, sample_top_m)  # (n, adapters)
        scores = np.where(visible, scores, -np.inf)
        k = min(top_k, int(visible.sum()))
        if k == 0:
            return [[] for _ in queries]
        top = np.argpartition(-scores, k - 1, axis=1)[:, :k]  # (n, k) unordered
        out = []
        for row, cols in zip(scores, top):
            cols = cols[np.argsort(-row[cols], kind="stable")]
            out.append([RetrievedAdapter(name=str(names[c]), version=str(versions[c]), score=float(row[c])) for c in cols])
        return out

    def _centroid_arrays(self):
        if self._centroids is None:
            entries = self._entries.items()
            centroids = np.stack([e.centroid for _, e in entries])  # (adapters, dim)
            self._centroids = (np.array([n for n, _ in entries], dtype=object),
                               np.array([e.version for _, e in entries], dtype=object),
                               np.array([e.tenant for _, e in entries], dtype=object),
                               np.array([e.base_model for _, e in entries], dtype=object), centroids)
        return self._centroids

    def _best_samples_mean(self, queries: np.ndarray, m: int) -> np.ndarray:
        """Each adapter's mean of its best min(m, samples) sample cosines: (n, adapters)."""
        if self._samples is None:
            counts = np.array([len(e.samples) for e in self._entries.values()])  # (adapters,)
            # (adapters, widest card) row numbers into the stacked samples, -1 where a card is shorter
            slots = np.full((len(counts), counts.max()), -1)
            starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
            for a, (start, count) in enumerate(zip(starts, counts)):
                slots[a, :count] = np.arange(start, start + count)
            stacked = np.concatenate([e.samples for e in self._entries.values()])  # (all samples, dim)
            for entry, start, count in zip(self._entries.values(), starts, counts):
                entry.samples = stacked[start:start + count]  # hold the rows once, not twice
            self._samples = (stacked, slots)
        stacked, slots = self._samples
        sims = queries @ stacked.T  # (n, all samples)
        per_card = np.where(slots >= 0, sims[:, slots], -np.inf)  # (n, adapters, widest card)
        m = min(m, slots.shape[1])
        best = -np.partition(-per_card, m - 1, axis=2)[:, :, :m]  # (n, adapters, m), -inf past a card's end
        finite = np.isfinite(best)
        return np.where(finite, best, 0.0).sum(2) / finite.sum(2)
