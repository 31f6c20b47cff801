"""The adapter index in Qdrant: one centroid point and one point per card sample for each adapter.

Both kinds are stored so the scoring is a per-search choice:
- "centroid": the paper's adapter embedding, the mean of its sample embeddings, by cosine.
- "samples":  every card sample is a point; an adapter scores the mean of its best `sample_top_m`
              samples (Qdrant's grouped search, grouped by adapter name).
Embedded Qdrant (":memory:" or a folder) and a Qdrant server (url) take the same code path.
"""
from __future__ import annotations

import uuid
from collections.abc import Sequence

import numpy as np
from qdrant_client import QdrantClient, models

from services.schemas import RetrievalResult, RetrievedAdapter

SCORINGS = ("centroid", "samples")
_ID_NAMESPACE = uuid.UUID("6f1d7c1e-3c55-4a8e-9a51-0c3e4b1d2a77")
_KEYWORD_FIELDS = ("name", "kind", "tenant", "base_model")
# With m > 1 an adapter's rank (mean of its best m samples) can differ from its group's rank in
# Qdrant (best single sample), so this many times top_k groups are fetched and re-ranked.
_GROUP_OVERFETCH = 4


class IndexInputError(ValueError):
    """A bad argument to the adapter index: name, embeddings shape, scoring, top_k."""


def _point_id(name: str, kind: str, i: int) -> str:
    # Deterministic ids: re-adding an adapter overwrites its points in place, so a query never
    # sees the adapter missing or twice while it is replaced.
    return str(uuid.uuid5(_ID_NAMESPACE, f"{name}\x00{kind}\x00{i}"))


def _match(key: str, value: str) -> models.FieldCondition:
    return models.FieldCondition(key=key, match=models.MatchValue(value=value))


class AdapterIndex:
    def __init__(self, dim: int, *, url: str | None = None, path: str = ":memory:",
                 collection: str = "adapters", scoring: str = "centroid", api_key: str | None = None,
                 sample_top_m: int = 1):
        if dim < 1:
            raise IndexInputError(f"dim must be positive, got {dim}")
        self.dim = dim
        self.scoring = self._checked_scoring(scoring)
        if sample_top_m < 1:
            raise IndexInputError(f"sample_top_m must be at least 1, got {sample_top_m}")
        self.sample_top_m = sample_top_m
        self.collection = collection
        self.client = QdrantClient(url=url, api_key=api_key) if url else QdrantClient(path=path)
        self.remote = url is not None
        self.ensure_collection()

    # ---- writes ------------------------------------------------------------------------------
    def upsert(self, name: str, sample_embeddings: np.ndarray, *, version: str = "1", tenant: str | None = None,
               base_model: str | None = None, domain: str | None = None) -> None:
        """Index adapter `name` from its card's sample embeddings (samples, dim); replaces any previous entry."""
        if not name:
            raise IndexInputError("adapter name must be a non-empty string")
        if tenant == "":
            raise IndexInputError("tenant must be None (shared adapter) or a non-empty tenant id")
        samples = self._checked_matrix(sample_embeddings, f"sample embeddings of adapter {name!r}")
        if len(samples) == 0:
            raise IndexInputError(f"adapter {name!r} needs at least one sample embedding")
        samples = samples / np.linalg.norm(samples, axis=1, keepdims=True)  # (samples, dim)
        centroid = samples.mean(axis=0)  # (dim,) cosine normalises it
        payload = {"name": name, "version": version, "base_model": base_model, "domain": domain}
        if tenant is not None:
            payload["tenant"] = tenant  # absent = shared
        points = [models.PointStruct(id=_point_id(name, "centroid", 0), vector=centroid.tolist(),
                                     payload={**payload, "kind": "centroid", "idx": 0})]
        points += [models.PointStruct(id=_point_id(name, "sample", i), vector=v.tolist(),
                                      payload={**payload, "kind": "sample", "idx": i})
                   for i, v in enumerate(samples)]
        self.client.upsert(self.collection, points=points, wait=True)
        # a previous card may have had more samples than this one
        self.client.delete(self.collection, wait=True, points_selector=models.FilterSelector(filter=models.Filter(
            must=[_match("name", name), models.FieldCondition(key="idx", range=models.Range(gte=len(samples)))])))

    def remove(self, name: str) -> None:
        """Drop adapter `name`. Removing an absent name is a no-op: replicas sharing one Qdrant
        server may each apply the same registry removal."""
        self.client.delete(self.collection, wait=True, points_selector=models.FilterSelector(
            filter=models.Filter(must=[_match("name", name)])))

    # ---- reads -------------------------------------------------------------------------------
    def names(self) -> list[str]:
        """Every indexed adapter, sorted."""
        names, offset = [], None
        while True:
            points, offset = self.client.scroll(
                self.collection, scroll_filter=models.Filter(must=[_match("kind", "centroid")]),
                limit=256, offset=offset, with_payload=["name"], with_vectors=False)
            names += [p.payload["name"] for p in points]
            if offset is None:
                return sorted(names)

    def search(self, queries: np.ndarray, *, top_k: int = 3, tenant: str | None = None,
               base_model: str | None = None, exclude: Sequence[str] = (), min_similarity: float | None = None,
               scoring: str | None = None) -> list[RetrievalResult]:
        """The top_k adapters for each query row (n, dim), best first.

        tenant=None sees shared adapters only; a tenant id sees shared adapters and its own.
        Adapters scoring below min_similarity are dropped; an empty result means no adapter fits.
        """
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise IndexInputError(f"top_k must be a positive integer, got {top_k!r}")
        queries = self._checked_matrix(queries, "queries")
        scoring = self._checked_scoring(scoring or self.scoring)
        kind = "centroid" if scoring == "centroid" else "sample"
        flt = self._filter(kind, tenant, base_model, exclude)
        if scoring == "centroid":
            ranked = self._search_centroids(queries, flt, top_k)
        else:
            ranked = [self._search_samples(q, flt, top_k) for q in queries]
        floor = -np.inf if min_similarity is None else min_similarity
        return [RetrievalResult(adapters=[a for a in row if a.score >= floor]) for row in ranked]

    def _search_centroids(self, queries: np.ndarray, flt: models.Filter, top_k: int) -> list[list[RetrievedAdapter]]:
        requests = [models.QueryRequest(query=q.tolist(), filter=flt, limit=top_k, with_payload=["name", "version"])
                    for q in queries]
        responses = self.client.query_batch_points(self.collection, requests=requests)
        return [[RetrievedAdapter(name=p.payload["name"], score=float(p.score), version=p.payload["version"])
                 for p in r.points] for r in responses]

    def _search_samples(self, query: np.ndarray, flt: models.Filter, top_k: int) -> list[RetrievedAdapter]:
        m = self.sample_top_m
        groups = self.client.query_points_groups(
            self.collection, group_by="name", query=query.tolist(), query_filter=flt,
            limit=top_k if m == 1 else top_k * _GROUP_OVERFETCH, group_size=m,
            with_payload=["name", "version"]).groups
        ranked = [RetrievedAdapter(name=g.hits[0].payload["name"], version=g.hits[0].payload["version"],
                                   score=float(np.mean([h.score for h in g.hits]))) for g in groups]
        ranked.sort(key=lambda a: -a.score)
        return ranked[:top_k]

    # ---- helpers -----------------------------------------------------------------------------
    @staticmethod
    def _filter(kind: str, tenant: str | None, base_model: str | None, exclude: Sequence[str]) -> models.Filter:
        shared = models.IsEmptyCondition(is_empty=models.PayloadField(key="tenant"))
        visible = shared if tenant is None else models.Filter(should=[shared, _match("tenant", tenant)])
        must = [_match("kind", kind), visible]
        if base_model is not None:
            must.append(_match("base_model", base_model))
        must_not = [models.FieldCondition(key="name", match=models.MatchAny(any=list(exclude)))] if exclude else []
        return models.Filter(must=must, must_not=must_not)

    def _checked_matrix(self, array: np.ndarray, what: str) -> np.ndarray:
        array = np.asarray(array, dtype=np.float32)
        if array.ndim != 2 or array.shape[1] != self.dim:
            raise IndexInputError(f"{what} must have shape (n, {self.dim}), got {array.shape}")
        if not np.isfinite(array).all() or (np.linalg.norm(array, axis=1) == 0).any():
            raise IndexInputError(f"{what} hold a zero, NaN or infinite row")
        return array

    @staticmethod
    def _checked_scoring(scoring: str) -> str:
        if scoring not in SCORINGS:
            raise IndexInputError(f"scoring must be one of {SCORINGS}, got {scoring!r}")
        return scoring

    def ensure_collection(self) -> None:
        """Create the collection if it does not exist (first start, or a Qdrant server restarted
        without its storage); an existing one must hold vectors of the embedder's size."""
        if self.client.collection_exists(self.collection):
            size = self.client.get_collection(self.collection).config.params.vectors.size
            if size != self.dim:
                raise IndexInputError(f"collection {self.collection!r} holds {size}-d vectors, the embedder gives {self.dim}")
            return
        self.client.create_collection(self.collection, vectors_config=models.VectorParams(
            size=self.dim, distance=models.Distance.COSINE))
        if self.remote:  # embedded mode has no payload indexes; a server needs them for fast filters
            for key in _KEYWORD_FIELDS:
                self.client.create_payload_index(self.collection, key, models.PayloadSchemaType.KEYWORD)
            self.client.create_payload_index(self.collection, "idx", models.PayloadSchemaType.INTEGER)
