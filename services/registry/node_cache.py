"""The one way a composer, whatever its engine, gets an adapter version's files on its node.

    cache = NodeAdapterCache(cache_root, resolve, ObjectFolders(cfg.adapter_store.objects))
    folder = cache.local_folder("name@v2")  # blocking: call it off the batch thread

`local_folder` returns a folder on this node holding exactly the files the registry
registered for that version (adapter_config.json and the weights), checked against the
registry's sha256. Where they live comes from `resolve(name, version)` (`registry_resolver`
reads the registry, `folder_resolver` the folder layout alone, for tools without a registry):

- a local folder (the folder store, or a volume every node mounts at the same path) is used in
  place, its checksum checked on first use in this process;
- object storage (s3://, gs://, az://) is downloaded into a private staging folder under
  `cache_root`, checked there, then renamed to `cache_root/<name>/<version>/` with the verified
  checksum beside the files (`.checksum`). The cache never holds a half-written or unverified
  version; a later call (or process) finds it there and reads nothing over the network.

Files that do not match the registry's checksum are deleted and never returned:
`ChecksumMismatch`. Anything else that goes wrong (unreachable store, missing object or folder)
is an `AdapterFetchError`. Both are `Unavailable` (HTTP 503) and name the version, not where its
files are (clients never see store paths or bucket names; the log has them). Concurrent calls for
one version share one fetch; different versions fetch in parallel."""
from __future__ import annotations

import logging
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from services.composition import AdapterKey
from services.errors import Unavailable
from services.lora.adapter_files import CONFIG_FILE, PICKLE_FILE, SAFETENSORS_FILE, adapter_checksum
from services.registry.object_store import ObjectFolders, ObjectStoreError, is_remote, local_path

log = logging.getLogger(__name__)

ADAPTER_FILES = (CONFIG_FILE, SAFETENSORS_FILE, PICKLE_FILE)  # what a version folder may hold
CHECKSUM_FILE = ".checksum"  # beside a cached version's files: the checksum it was verified against
STAGING = ".staging"


@dataclass(frozen=True)
class VersionSource:
    uri: str  # a folder: plain path, file://..., s3://bucket/prefix/name/v2, ...
    checksum: str | None  # the registry's sha256 of the files; None only for folder_resolver (no registry)


class AdapterFetchError(Unavailable):
    """A version's files cannot be had on this node now; the message names the version and cause."""


class ChecksumMismatch(AdapterFetchError):
    """Files whose sha256 differs from the registry's: refused, deleted, never served."""


class NodeAdapterCache:
    def __init__(self, cache_root: str | Path, resolve: Callable[[str, str], VersionSource],
                 objects: ObjectFolders | None = None):
        self.root = Path(cache_root)
        self.resolve = resolve
        self.objects = objects or ObjectFolders()
        self._lock = threading.Lock()
        self._key_locks: dict[str, threading.Lock] = {}
        self._verified: dict[str, Path] = {}  # key -> checked folder, this process
        self.counters = {"fetches": 0, "fetch_seconds": 0.0, "fetch_bytes": 0, "refused": 0}

    def local_folder(self, key: str) -> Path:
        """A verified local folder of `key` ('name@version'); blocking. Raises AdapterFetchError."""
        adapter = AdapterKey.parse(key)
        with self._lock:
            lock = self._key_locks.setdefault(key, threading.Lock())
        with lock:  # one fetch per key; the others wait for it and find it done
            if key in self._verified and self._verified[key].is_dir():
                return self._verified[key]
            source = self.resolve(adapter.name, adapter.version)
            if is_remote(source.uri):
                folder = self._cached(adapter, source)
            else:
                folder = local_path(source.uri)
                if not folder.is_dir():
                    log.warning("adapter %s: no folder at %s", key, source.uri)
                    raise AdapterFetchError(f"adapter '{key}' has no files in the adapter store")
                self._check(key, folder, source, delete=False)
            self._verified[key] = folder
            return folder

    def drop(self, key: str) -> None:
        """Forget `key` and delete this node's fetched copy of it (a version the registry no longer
        serves); a folder read in place is never touched. A later call fetches it again."""
        adapter = AdapterKey.parse(key)
        with self._lock:
            lock = self._key_locks.setdefault(key, threading.Lock())
        with lock:
            self._verified.pop(key, None)
            copy = self.root / adapter.name / adapter.version
            if (copy / CHECKSUM_FILE).is_file():
                shutil.rmtree(copy, ignore_errors=True)

    def stats(self) -> dict:
        with self._lock:
            return dict(self.counters)

    def _cached(self, adapter: AdapterKey, source: VersionSource) -> Path:
        final = self.root / adapter.name / adapter.version
        marker = final / CHECKSUM_FILE
        if marker.is_file() and source.checksum is not None and marker.read_text() == source.checksum:
            return final
        if final.exists():  # a version of that name with other files (the registry lost and reused it)
            shutil.rmtree(final)
        (self.root / STAGING).mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f"{adapter.name}-{adapter.version}-", dir=self.root / STAGING))
        try:
            started = time.perf_counter()
            try:
                names = [n for n in self.objects.list_files(source.uri) if n in ADAPTER_FILES]
                if CONFIG_FILE not in names:
                    raise ObjectStoreError(f"{source.uri} holds no {CONFIG_FILE}")
                self.objects.download(source.uri, names, tmp)
            except ObjectStoreError as err:
                log.warning("adapter %s cannot be fetched: %s", adapter, err.message)
                raise AdapterFetchError(f"adapter '{adapter}' cannot be fetched from the adapter store (unreachable "
                                        "or files missing); retry shortly") from err
            seconds = time.perf_counter() - started
            size = sum((tmp / n).stat().st_size for n in names)
            self._check(str(adapter), tmp, source, delete=True)
            if source.checksum is not None:
                (tmp / CHECKSUM_FILE).write_text(source.checksum)
            tmp.chmod(0o755)
            final.parent.mkdir(parents=True, exist_ok=True)
            tmp.rename(final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        with self._lock:
            self.counters["fetches"] += 1
            self.counters["fetch_seconds"] += seconds
            self.counters["fetch_bytes"] += size
        log.info("fetched adapter %s from %s: %d bytes in %.3f s, checksum verified", adapter, source.uri, size,
                 seconds)
        return final

    def _check(self, key: str, folder: Path, source: VersionSource, *, delete: bool) -> None:
        if source.checksum is None:
            return
        try:
            actual = adapter_checksum(folder)
        except Exception as err:  # a file missing: AdapterValidationError; unreadable: OSError
            log.warning("adapter %s cannot be read at %s: %s", key, source.uri, err)
            raise AdapterFetchError(f"adapter '{key}' cannot be read from the adapter store (files missing or "
                                    "unreadable)") from err
        if actual != source.checksum:
            if delete:
                shutil.rmtree(folder, ignore_errors=True)
            with self._lock:
                self.counters["refused"] += 1
            log.error("adapter %s refused: files at %s have sha256 %s, the registry recorded %s", key, source.uri,
                      actual[:12], source.checksum[:12])
            raise ChecksumMismatch(f"adapter '{key}' refused: its files in the adapter store do not match the "
                                   "registry's checksum")


def folder_resolver(store_root: str | Path) -> Callable[[str, str], VersionSource]:
    """Versions in the folder layout <root>/<name>/<version>, taken as they are (no registry, no checksum):
    for tools and tests that build a composer without a registry."""
    root = Path(store_root)
    return lambda name, version: VersionSource(str(root / name / version), None)


def registry_resolver(registry, store_root: str | Path) -> Callable[[str, str], VersionSource]:
    """Where the registry says a version lives, with its checksum. A version the registry no longer
    knows (retired since the request was planned) or cannot tell now (Redis away) is read from the
    folder store if it is there, as before versions had URIs; a version once resolved is remembered
    (a version's files never change)."""
    from services.registry.errors import AdapterNotFound, RegistryUnavailable

    known: dict[tuple[str, str], VersionSource] = {}
    fallback = folder_resolver(store_root)

    def resolve(name: str, version: str) -> VersionSource:
        if (name, version) in known:
            return known[(name, version)]
        try:
            record = registry.get(name).version(version)
        except (AdapterNotFound, RegistryUnavailable) as err:
            log.info("adapter %s@%s: registry lookup failed (%s); reading the folder store", name, version, err)
            return fallback(name, version)
        source = VersionSource(record.uri or fallback(name, version).uri, record.checksum)
        known[(name, version)] = source
        return source

    return resolve
