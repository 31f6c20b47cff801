"""The adapter index in Qdrant: one centroid point and one point per card sample for each adapter.

Both kinds are stored so the scoring is a per-search choice:
- "centroid": the paper's adapter embedding, the mean of its sample embeddings, by cosine.
- "samples":  every card sample is a point; an adapter scores the mean of its best `sample_top_m`
              samples (Qdrant's grouped search, grouped by adapter name).
Writes take the same code path for embedded Qdrant (":memory:" or a folder) and a Qdrant server
(url). Searches differ: a server searches its HNSW graph with payload indexes, one
query_batch_points call per batch of queries; embedded Qdrant would filter every point in Python
for every query, so the embedded index searches an in-memory copy instead (matrix_index.py),
loaded from the collection when it opens and kept in step by every write.
"""
from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence

import numpy as np
from qdrant_client import QdrantClient, models

from services.retrieval.matrix_index import MatrixIndex
from services.schemas import RetrievalResult, RetrievedAdapter

SCORINGS = ("centroid", "samples")
_ID_NAMESPACE = uuid.UUID("6f1d7c1e-3c55-4a8e-9a51-0c3e4b1d2a77")
_KEYWORD_FIELDS = ("name", "kind", "tenant", "base_model")
# With m > 1 an adapter's rank (mean of its best m samples) can differ from its group's rank in
# Qdrant (best single sample), so this many times top_k groups are fetched and re-ranked.
_GROUP_OVERFETCH = 4
_SEARCH_KEYS = frozenset({"top_k", "tenant", "base_model", "exclude", "min_similarity", "scoring"})


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
                 sample_top_m: int = 1, memory_search: bool | None = None):
        if dim < 1:
            raise IndexInputError(f"dim must be positive, got {dim}")
        self.dim = dim
        self.scoring = self._checked_scoring(scoring)
        if sample_top_m < 1:
            raise IndexInputError(f"sample_top_m must be at least 1, got {sample_top_m}")
        self.sample_top_m = sample_top_m
        if memory_search and url:
            raise IndexInputError("memory_search is for embedded Qdrant only: a server's collection has other writers")
        self.collection = collection
        self.client = QdrantClient(url=url, api_key=api_key) if url else QdrantClient(path=path)
        self.remote = url is not None
        self.ensure_collection()
        # None: search in memory when embedded; False there searches embedded Qdrant itself (for comparison)
        self._matrix = self._load_matrix() if (not self.remote if memory_search is None else memory_search) else None

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
        previous = self._sample_count(name)
        points = [models.PointStruct(id=_point_id(name, "centroid", 0), vector=centroid.tolist(),
                                     payload={**payload, "kind": "centroid", "idx": 0, "samples": len(samples)})]
        points += [models.PointStruct(id=_point_id(name, "sample", i), vector=v.tolist(),
                                      payload={**payload, "kind": "sample", "idx": i})
                   for i, v in enumerate(samples)]
        self.client.upsert(self.collection, points=points, wait=True)
        # a previous card may have had more samples than this one
        if previous is None:
            self.client.delete(self.collection, wait=True, points_selector=models.FilterSelector(filter=models.Filter(
                must=[_match("name", name), models.FieldCondition(key="idx", range=models.Range(gte=len(samples)))])))
        elif previous > len(samples):
            self._delete_ids([_point_id(name, "sample", i) for i in range(len(samples), previous)])
        if self._matrix is not None:
            self._matrix.put(name, samples, version, tenant, base_model)

    def remove(self, name: str) -> None:
        """Drop adapter `name`. Removing an absent name is a no-op: replicas sharing one Qdrant
        server may each apply the same registry removal."""
        count = self._sample_count(name)
        if count is None:
            self.client.delete(self.collection, wait=True, points_selector=models.FilterSelector(
                filter=models.Filter(must=[_match("name", name)])))
        elif count:
            self._delete_ids([_point_id(name, "centroid", 0)] + [_point_id(name, "sample", i) for i in range(count)])
        if self._matrix is not None:
            self._matrix.drop(name)

    def _sample_count(self, name: str) -> int | None:
        """The indexed card's sample count read from its centroid point by id (no filtered scan): 0 when
        the adapter is absent, None when its points predate the count (then a filter finds them)."""
        found = self.client.retrieve(self.collection, ids=[_point_id(name, "centroid", 0)], with_payload=["samples"])
        return found[0].payload.get("samples") if found else 0

    def _delete_ids(self, ids: list[str]) -> None:
        self.client.delete(self.collection, wait=True, points_selector=models.PointIdsList(points=ids))

    # ---- reads -------------------------------------------------------------------------------
    def names(self) -> list[str]:
        """Every indexed adapter, sorted."""
        if self._matrix is not None:
            return self._matrix.names()
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
        options = {"top_k": top_k, "tenant": tenant, "base_model": base_model, "exclude": exclude,
                   "min_similarity": min_similarity, "scoring": scoring}
        return self.search_batch(queries, [options] * len(np.atleast_2d(queries)))

    def search_batch(self, queries: np.ndarray, options: Sequence[Mapping]) -> list[RetrievalResult]:
        """One result per query row (n, dim), row i searched with the `search` keywords options[i].

        A Qdrant server gets one query_batch_points call for all centroid-scored rows; the embedded
        index runs one matrix product per distinct set of options.
        """
        queries = self._checked_matrix(queries, "queries")
        if len(options) != len(queries):
            raise IndexInputError(f"got {len(queries)} queries and {len(options)} option sets")
        specs = [self.check_options(o) for o in options]
        queries = queries / np.linalg.norm(queries, axis=1, keepdims=True)  # (n, dim) cosine = dot product
        ranked: list[list[RetrievedAdapter]] = [[] for _ in specs]
        groups: dict[tuple, list[int]] = {}
        for i, spec in enumerate(specs):
            groups.setdefault(spec, []).append(i)
        if self._matrix is not None:
            for (top_k, tenant, base_model, exclude, _, scoring), rows in groups.items():
                found = self._matrix.search(queries[rows], top_k=top_k, tenant=tenant, base_model=base_model,
                                            exclude=exclude, scoring=scoring, sample_top_m=self.sample_top_m)
                for row, adapters in zip(rows, found):
                    ranked[row] = adapters
        else:
            centroid_rows = [i for i, s in enumerate(specs) if s[5] == "centroid"]
            for row, adapters in zip(centroid_rows, self._search_centroids(queries[centroid_rows],
                                                                           [specs[i] for i in centroid_rows])):
                ranked[row] = adapters
            for i, (top_k, tenant, base_model, exclude, _, scoring) in enumerate(specs):
                if scoring == "samples":  # Qdrant has no batched grouped query: one call per row
                    ranked[i] = self._search_samples(queries[i], self._filter("sample", tenant, base_model, exclude), top_k)
        return [RetrievalResult(adapters=[a for a in row if spec[4] is None or a.score >= spec[4]])
                for row, spec in zip(ranked, specs)]

    def check_options(self, options: Mapping) -> tuple:
        """(top_k, tenant, base_model, exclude, min_similarity, scoring), hashable, defaults filled in."""
        unknown = set(options) - _SEARCH_KEYS
        if unknown:
            raise IndexInputError(f"unknown search option(s) {sorted(unknown)}")
        top_k = options.get("top_k", 3)
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise IndexInputError(f"top_k must be a positive integer, got {top_k!r}")
        return (top_k, options.get("tenant"), options.get("base_model"), tuple(options.get("exclude") or ()),
                options.get("min_similarity"), self._checked_scoring(options.get("scoring") or self.scoring))

    def _search_centroids(self, queries: np.ndarray, specs: list[tuple]) -> list[list[RetrievedAdapter]]:
        if not specs:
            return []
        requests = [models.QueryRequest(query=q.tolist(), filter=self._filter("centroid", tenant, base_model, exclude),
                                        limit=top_k, with_payload=["name", "version"])
                    for q, (top_k, tenant, base_model, exclude, _, _) in zip(queries, specs)]
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

    def _load_matrix(self) -> MatrixIndex:
        """The in-memory copy of an embedded collection (empty for ":memory:", the stored cards for a folder)."""
        matrix, cards, offset = MatrixIndex(self.dim), {}, None
        while True:
            points, offset = self.client.scroll(self.collection, scroll_filter=models.Filter(must=[_match("kind", "sample")]),
                                                limit=1024, offset=offset, with_payload=True, with_vectors=True)
            for p in points:
                cards.setdefault(p.payload["name"], (p.payload, {}))[1][p.payload["idx"]] = p.vector
            if offset is None:
                break
        for name, (payload, rows) in cards.items():
            samples = np.asarray([rows[i] for i in sorted(rows)], dtype=np.float32)
            matrix.put(name, samples / np.linalg.norm(samples, axis=1, keepdims=True), payload["version"],
                       payload.get("tenant"), payload.get("base_model"))
        return matrix

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
