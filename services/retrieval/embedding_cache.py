"""Embeddings of recently seen prompts, keyed by a hash of the text.

A repeated prompt (a client's retry, a template filled with the same question, a chat resent with
its history) skips the embedder, most of retrieval's cost. What is cached is the embedding, not
the search result: the search still runs on every request against the index as it is now, so an
adapter registered, replaced or retired since is seen at once and nothing needs invalidating.
The embedder is fixed for a replica's life (a retrained model is a new replica), so a cached
vector never goes stale.
"""
from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict

import numpy as np


def text_key(text: str) -> bytes:
    """16 bytes per entry however long the prompt (prompts may be tens of kilobytes)."""
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()


class EmbeddingCache:
    """Bounded LRU of text -> unit embedding (dim,) float32; thread-safe."""

    def __init__(self, entries: int):
        if entries < 0:
            raise ValueError(f"entries must be at least 0, got {entries}")
        self.entries = entries
        self._vectors: OrderedDict[bytes, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def lookup(self, texts: list[str]) -> tuple[list[np.ndarray | None], list[bytes]]:
        """Each text's cached vector (None when absent) and its key."""
        keys = [text_key(t) for t in texts]
        with self._lock:
            found = []
            for key in keys:
                vector = self._vectors.get(key)
                if vector is not None:
                    self._vectors.move_to_end(key)
                found.append(vector)
            hits = sum(v is not None for v in found)
            self.hits += hits
            self.misses += len(found) - hits
        return found, keys

    def store(self, keys: list[bytes], vectors: np.ndarray) -> None:
        """vectors (len(keys), dim): kept read-only, so a caller cannot alter a shared entry."""
        if not self.entries:
            return
        with self._lock:
            for key, vector in zip(keys, vectors):
                vector = vector.copy()
                vector.flags.writeable = False
                self._vectors[key] = vector
                self._vectors.move_to_end(key)
            while len(self._vectors) > self.entries:
                self._vectors.popitem(last=False)

    def stats(self) -> dict:
        with self._lock:
            return {"hits": self.hits, "misses": self.misses, "size": len(self._vectors), "entries": self.entries}
