"""The adapter index in Qdrant: one centroid point and one point per card sample for each adapter.

Both kinds are stored so the scoring is a per-search choice:
- "centroid": the paper's adapter embedding, the mean of its sample embeddings, by cosine.
- "samples":  every card sample is a point; an adapter scores the mean of its best `sample_top_m`
              samples (Qdrant's grouped search, grouped by adapter name).
Writes take the same code path for embedded Qdrant (":memory:" or a folder) and a Qdrant server
(url). The configured collection name is a Qdrant alias: searches and writes go through it, and
`rebuild` fills a new collection and then points the alias at it in one alias operation, so no
search ever sees a half-filled index (docs/retrieval.md, "Index lifecycle"). Searches differ: a server searches its HNSW graph with payload indexes, one
query_batch_points call per batch of queries; embedded Qdrant would filter every point in Python
for every query, so the embedded index searches an in-memory copy instead (matrix_index.py),
loaded from the collection when it opens and kept in step by every write.
"""
from __future__ import annotations

import re
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

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


@dataclass
class IndexEntry:
    """One adapter as a rebuild writes it: its card's sample embeddings (samples, dim) and payload fields."""
    name: str
    samples: np.ndarray
    fields: dict = field(default_factory=dict)  # upsert keywords: version, tenant, base_model, domain


def collection_pattern(alias: str) -> re.Pattern:
    """Names of the collections an alias has pointed at (`<alias>--ix-<hex>`); other names are never touched."""
    return re.compile(re.escape(alias) + r"--ix-[0-9a-f]+")


def entry_fields(version, tenant, base_model, domain) -> tuple:
    """What an index entry holds besides vectors; a change of any of them needs a re-upsert."""
    return (version, tenant, base_model, domain)


def _point_id(name: str, kind: str, i: int) -> str:
    # Deterministic ids: re-adding an adapter overwrites its points in place, so a query never
    # sees the adapter missing or twice while it is replaced.
    return str(uuid.uuid5(_ID_NAMESPACE, f"{name}\x00{kind}\x00{i}"))


def _match(key: str, value: str) -> models.FieldCondition:
    return models.FieldCondition(key=key, match=models.MatchValue(value=value))


class AdapterIndex:
    def __init__(self, dim: int, *, url: str | None = None, path: str = ":memory:",
                 collection: str = "adapters", scoring: str = "centroid", api_key: str | None = None,
                 sample_top_m: int = 1, memory_search: bool | None = None, client: QdrantClient | None = None):
        """client: a Qdrant client other writers share (the same semantics as a server url; tests
        stand a locked embedded client in for a server)."""
        if dim < 1:
            raise IndexInputError(f"dim must be positive, got {dim}")
        self.dim = dim
        self.scoring = self._checked_scoring(scoring)
        if sample_top_m < 1:
            raise IndexInputError(f"sample_top_m must be at least 1, got {sample_top_m}")
        self.sample_top_m = sample_top_m
        shared = url is not None or client is not None
        if memory_search and shared:
            raise IndexInputError("memory_search is for embedded Qdrant only: a server's collection has other writers")
        self.collection = collection  # the alias: every search and write goes through it
        if client is None:
            client = QdrantClient(url=url, api_key=api_key) if url else QdrantClient(path=path)
        self.client = client
        self.remote = shared  # other processes may search and write this collection
        if not shared or self.target() is not None:
            # a shared collection is created by its writer only (IndexSync under the writer lock): a
            # replica starting beside a writer must never point the alias at an empty collection
            self.ensure_collection()
        # None: search in memory when embedded; False there searches embedded Qdrant itself (for comparison)
        self._matrix = self._load_matrix() if (not self.remote if memory_search is None else memory_search) else None

    # ---- writes ------------------------------------------------------------------------------
    def upsert(self, name: str, sample_embeddings: np.ndarray, *, version: str = "1", tenant: str | None = None,
               base_model: str | None = None, domain: str | None = None) -> None:
        """Index adapter `name` from its card's sample embeddings (samples, dim); replaces any previous entry."""
        self._write(self.collection, self._matrix, name, sample_embeddings, version=version, tenant=tenant,
                    base_model=base_model, domain=domain)

    def _write(self, collection: str, matrix: MatrixIndex | None, name: str, sample_embeddings: np.ndarray, *,
               version: str = "1", tenant: str | None = None, base_model: str | None = None,
               domain: str | None = None) -> None:
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
        previous = self._sample_count(name, collection)
        points = [models.PointStruct(id=_point_id(name, "centroid", 0), vector=centroid.tolist(),
                                     payload={**payload, "kind": "centroid", "idx": 0, "samples": len(samples)})]
        points += [models.PointStruct(id=_point_id(name, "sample", i), vector=v.tolist(),
                                      payload={**payload, "kind": "sample", "idx": i})
                   for i, v in enumerate(samples)]
        self.client.upsert(collection, points=points, wait=True)
        # a previous card may have had more samples than this one
        if previous is None:
            self.client.delete(collection, wait=True, points_selector=models.FilterSelector(filter=models.Filter(
                must=[_match("name", name), models.FieldCondition(key="idx", range=models.Range(gte=len(samples)))])))
        elif previous > len(samples):
            self._delete_ids([_point_id(name, "sample", i) for i in range(len(samples), previous)], collection)
        if matrix is not None:
            matrix.put(name, samples, version, tenant, base_model)

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

    def _sample_count(self, name: str, collection: str | None = None) -> int | None:
        """The indexed card's sample count read from its centroid point by id (no filtered scan): 0 when
        the adapter is absent, None when its points predate the count (then a filter finds them)."""
        found = self.client.retrieve(collection or self.collection, ids=[_point_id(name, "centroid", 0)],
                                     with_payload=["samples"])
        return found[0].payload.get("samples") if found else 0

    def _delete_ids(self, ids: list[str], collection: str | None = None) -> None:
        self.client.delete(collection or self.collection, wait=True, points_selector=models.PointIdsList(points=ids))

    # ---- rebuild: a new collection, then one alias switch ----------------------------------------
    def rebuild(self, entries: Iterable[IndexEntry]) -> int:
        """Replace the whole index by `entries`: they fill a new collection while searches still read
        the old one, then the alias moves to the new one in one Qdrant alias operation. Returns the
        adapter count. A failure deletes the new collection and leaves the old one serving."""
        new = self._create_collection()
        matrix = MatrixIndex(self.dim) if self._matrix is not None else None
        count = 0
        try:
            for entry in entries:
                self._write(new, matrix, entry.name, entry.samples, **entry.fields)
                count += 1
            replaced = self.target()
            self._point_alias(new)
        except BaseException:
            self.client.delete_collection(new)
            raise
        self._matrix = matrix
        # A server's other replicas may have resolved the alias to the replaced collection for a search
        # in flight: it stays until the next rebuild. An embedded collection has no other reader.
        self._drop_collections(keep={new, replaced} if self.remote else {new})
        return count

    def target(self) -> str | None:
        """The collection the alias names now (the collection itself if it predates aliases; None: neither exists)."""
        for alias in self.client.get_aliases().aliases:
            if alias.alias_name == self.collection:
                return alias.collection_name
        return self.collection if self._plain_collection_exists() else None

    def _plain_collection_exists(self) -> bool:
        """A collection named like the alias (indexes made before aliases were used)."""
        return any(c.name == self.collection for c in self.client.get_collections().collections)

    def _create_collection(self) -> str:
        name = f"{self.collection}--ix-{time.time_ns():x}{uuid.uuid4().hex[:6]}"
        self.client.create_collection(name, vectors_config=models.VectorParams(size=self.dim,
                                                                               distance=models.Distance.COSINE))
        if self.remote:  # embedded mode has no payload indexes; a server needs them for fast filters
            for key in _KEYWORD_FIELDS:
                self.client.create_payload_index(name, key, models.PayloadSchemaType.KEYWORD)
            self.client.create_payload_index(name, "idx", models.PayloadSchemaType.INTEGER)
        return name

    def _point_alias(self, collection: str) -> None:
        """Point the alias at `collection`: delete and create in ONE request, which Qdrant applies atomically."""
        ops = []
        if any(a.alias_name == self.collection for a in self.client.get_aliases().aliases):
            ops.append(models.DeleteAliasOperation(delete_alias=models.DeleteAlias(alias_name=self.collection)))
        elif self._plain_collection_exists():
            # Once, upgrading an index made before aliases: the old collection must go before its name can
            # become the alias; a search in the moment between the two calls fails and is retried.
            self.client.delete_collection(self.collection)
        ops.append(models.CreateAliasOperation(create_alias=models.CreateAlias(collection_name=collection,
                                                                               alias_name=self.collection)))
        self.client.update_collection_aliases(change_aliases_operations=ops)

    def _drop_collections(self, keep: set) -> None:
        pattern = collection_pattern(self.collection)
        for c in self.client.get_collections().collections:
            if pattern.fullmatch(c.name) and c.name not in keep:
                self.client.delete_collection(c.name)

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

    def indexed_fields(self) -> dict[str, tuple]:
        """name -> (version, tenant, base_model, domain) as the collection holds them (read from Qdrant,
        not from this process's memory: another writer may have written since)."""
        fields, offset = {}, None
        while True:
            points, offset = self.client.scroll(
                self.collection, scroll_filter=models.Filter(must=[_match("kind", "centroid")]), limit=256,
                offset=offset, with_payload=["name", "version", "tenant", "base_model", "domain"], with_vectors=False)
            for p in points:
                fields[p.payload["name"]] = entry_fields(p.payload.get("version"), p.payload.get("tenant"),
                                                         p.payload.get("base_model"), p.payload.get("domain"))
            if offset is None:
                return fields

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
        """Make the alias name a collection of the embedder's size: an existing one is checked; on
        first start (or a Qdrant server restarted without its storage) a new empty collection is
        created behind the alias."""
        target = self.target()
        if target is None:
            self._point_alias(self._create_collection())
            return
        size = self.client.get_collection(target).config.params.vectors.size
        if size != self.dim:
            raise IndexInputError(f"collection {self.collection!r} holds {size}-d vectors, the embedder gives {self.dim}")
