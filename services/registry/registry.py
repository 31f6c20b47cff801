"""The adapter registry: the source of truth, in Redis.

Every write is one optimistic transaction: WATCH the adapters hash, read, decide in
Python, then MULTI/EXEC the new record, the generation bump and the audit entry together.
A concurrent writer makes EXEC fail and the write is redone on fresh state, so racing
writers never interleave inside a record. Adding a version is two-phase: its files are
staged and checked in the store first, and the pointer flips only in the transaction."""
from __future__ import annotations

import logging
import random
import re
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import redis

from services.lora.adapter_files import AdapterValidationError, adapter_checksum, read_adapter
from services.registry.errors import (AccessDenied, AdapterNotFound, InvalidAdapter, QualityGateRefused,
                                      RegistryError, RegistryUnavailable, VersionConflict)
from services.registry.placement import PlacementStore
from services.registry.records import AdapterRecord, Canary, QualityReport, VersionRecord, Visibility
from services.registry.redis_access import bytes_client, guarded
from services.registry.bucket_store import BucketAdapterStore, download_checked
from services.registry.object_store import ObjectFolders, is_remote, is_uri
from services.registry.store import AdapterStore, StoreError, VersionFolderExists, check_name
from services.schemas import AdapterCard
from services.tenancy.tenants import TENANT_NAME

__all__ = ["AccessDenied", "AdapterNotFound", "AdapterRecord", "AdapterRegistry", "Canary", "InvalidAdapter",
           "QualityGateRefused", "RegistryError", "RegistryUnavailable", "VersionConflict", "VersionRecord"]

log = logging.getLogger(__name__)

ADAPTERS_KEY = "lr:registry:adapters"  # hash: name -> AdapterRecord JSON
VERSION_SEQ_KEY = "lr:registry:version-seq"  # hash: name -> last version number (survives retire)
GENERATION_KEY = "lr:registry:generation"  # bumped by every write
EMBEDDING_DIM_KEY = "lr:registry:embedding-dim"  # all cards share one embedder
AUDIT_MAXLEN = 10_000
MAX_ATTEMPTS = 50
VERSION = re.compile(r"^v[0-9]+$")


def embedding_key(name: str, version: str) -> str:
    return f"lr:registry:embedding:{name}:{version}"  # raw float32, C order, shape in the VersionRecord


def audit_key(name: str) -> str:
    return f"lr:registry:audit:{name}"  # a stream; kept after retire


class AdapterRegistry:
    def __init__(self, redis_client: redis.Redis, store: AdapterStore | BucketAdapterStore, *, base_config=None,
                 base_model: str, max_rank: int = 64, allow_unsafe_pickle: bool = False,
                 objects: ObjectFolders | None = None):
        """`base_config` (the base model's transformers config) is needed only to add versions;
        `objects` reads versions registered where they are in object storage (`add_version` with a URI)."""
        self.r = bytes_client(redis_client)
        self.store = store
        self.objects = objects or getattr(store, "objects", None) or ObjectFolders()
        self.base_config = base_config
        self.base_model = base_model
        self.max_rank = max_rank
        self.allow_unsafe_pickle = allow_unsafe_pickle

    # ---- reads ---------------------------------------------------------------
    def get(self, name: str) -> AdapterRecord:
        with guarded(self.r, f"read adapter '{name}'"):
            raw = self.r.hget(ADAPTERS_KEY, name)
        if raw is None:
            raise AdapterNotFound(f"adapter '{name}' is not registered")
        return AdapterRecord.model_validate_json(raw)

    def snapshot_with_generation(self) -> tuple[int, list[AdapterRecord]]:
        """Every record and the generation they belong to, read in one transaction."""
        with guarded(self.r, "read the adapter registry"):
            pipe = self.r.pipeline(transaction=True)
            pipe.get(GENERATION_KEY)
            pipe.hgetall(ADAPTERS_KEY)
            generation, raw = pipe.execute()
        records = [AdapterRecord.model_validate_json(v) for v in raw.values()]
        return int(generation or 0), sorted(records, key=lambda r: r.name)

    def snapshot(self) -> list[AdapterRecord]:
        """Everything, sorted by name (the vector index is rebuilt from this)."""
        return self.snapshot_with_generation()[1]

    def list(self, tenant: str | None = None) -> list[AdapterRecord]:
        """tenant=None: shared adapters only; a tenant also sees its own private ones."""
        return [r for r in self.snapshot() if r.visible_to(tenant)]

    def generation(self) -> int:
        with guarded(self.r, "read the registry generation"):
            return int(self.r.get(GENERATION_KEY) or 0)

    def card_embeddings(self, name: str, version: str | None = None) -> np.ndarray:
        """(samples, dim) float32 embeddings of a version's card (default: the active version)."""
        record = self.get(name)
        version = version or record.active_version
        if version is None:
            raise AdapterNotFound(f"adapter '{name}' has no active version")
        shape = record.version(version).embedding_shape
        with guarded(self.r, f"read the card embeddings of {name}@{version}"):
            raw = self.r.get(embedding_key(name, version))
        if raw is None or len(raw) != shape[0] * shape[1] * 4:
            raise RegistryError(f"card embeddings of {name}@{version} are missing or do not match {shape}")
        return np.frombuffer(raw, dtype=np.float32).reshape(shape).copy()

    def history(self, name: str) -> list[dict]:
        """Audit entries, oldest first: id, at (unix time), actor, action, version, detail."""
        with guarded(self.r, f"read the history of adapter '{name}'"):
            entries = self.r.xrange(audit_key(name))
        if not entries:
            self.get(name)  # raises AdapterNotFound for a name never registered
        return [{"id": entry_id.decode(), **{k.decode(): v.decode() for k, v in fields.items()}}
                | {"at": int(entry_id.split(b"-")[0]) / 1000} for entry_id, fields in entries]

    # ---- writes ----------------------------------------------------------------
    def add_version(self, name: str, src_dir: str | Path, card: AdapterCard, card_embeddings: np.ndarray, *,
                    tenant: str | None = None, visibility: Visibility = "shared", activate: bool = True,
                    actor: str = "operator") -> VersionRecord:
        """Validate, stage and register a new version of `name` (creating the adapter if new).

        `src_dir` is a local folder (copied into the store: a folder, or a bucket) or the URI of a
        folder already in object storage (s3://bucket/path: registered where it is, after the same
        checks on a downloaded copy; the store never deletes it). Any failure leaves the store and
        Redis as they were (the staged copy is deleted)."""
        if self.base_config is None:
            raise RegistryError("this registry handle has no base_config: it can read but not add versions")
        self._check_new_version_args(name, card, tenant, visibility)
        embeddings = check_embeddings(card_embeddings, len(card.sample), name)  # (samples, dim)
        for attempt in range(MAX_ATTEMPTS):
            with guarded(self.r, f"add a version of adapter '{name}'"), self.r.pipeline(transaction=True) as pipe:
                pipe.watch(ADAPTERS_KEY, VERSION_SEQ_KEY, EMBEDDING_DIM_KEY)
                current = parse_record(pipe.hget(ADAPTERS_KEY, name))
                self._check_fits_adapter(current, name, tenant, visibility)
                dim = pipe.get(EMBEDDING_DIM_KEY)
                if dim is not None and int(dim) != embeddings.shape[1]:
                    raise InvalidAdapter(f"card embeddings of '{name}' have dim {embeddings.shape[1]}; the "
                                         f"registry's embedder gives {int(dim)}")
                number = 1 + max([int(pipe.hget(VERSION_SEQ_KEY, name) or 0)]
                                 + [int(v[1:]) for v in self.store.versions(name) if VERSION.match(v)])
                version = f"v{number}"
                try:
                    staged, weights, checksum, owned = self._stage(name, version, src_dir)
                except VersionFolderExists:  # a concurrent writer staged this number first
                    backoff(attempt)
                    continue
                try:
                    now = time.time()
                    vrec = VersionRecord(
                        version=version, checksum=checksum, rank=weights.rank, scaling=weights.scaling,
                        target_modules=list(weights.target_modules), created_at=now, created_by=actor,
                        path=str(staged), uri=location_uri(staged), card=card, embedding_shape=embeddings.shape)
                    record = current or AdapterRecord(name=name, base_model=self.base_model, owner_tenant=tenant,
                                                      visibility=visibility, created_at=now, updated_at=now)
                    record = with_version(record, vrec, activate)
                    pipe.multi()
                    pipe.set(embedding_key(name, version), embeddings.tobytes())
                    pipe.hset(VERSION_SEQ_KEY, name, number)
                    pipe.set(EMBEDDING_DIM_KEY, embeddings.shape[1])
                    self._queue_write(pipe, record, "add_version" + ("+activate" if activate else ""), actor,
                                      version, f"checksum {checksum[:12]} rank {weights.rank}")
                    if self._execute_staged(pipe, name, version, checksum, staged):
                        log.info("added adapter version %s@%s (active: %s)", name, version, record.active_version)
                        return vrec
                    if owned:
                        self.store.delete_location(staged)
                except _OutcomeUnknown:
                    raise
                except BaseException:
                    if owned:
                        self.store.delete_location(staged)
                    raise
            backoff(attempt)
        raise VersionConflict(f"adapter '{name}' kept changing under concurrent writers; try again")

    def activate(self, name: str, version: str, actor: str = "operator", *, force: bool = False) -> AdapterRecord:
        """Serve `version` for plain `name` (a canary of that version is thereby promoted). A version
        whose quality gate failed is refused unless `force` (then the audit entry says so)."""
        forced: list[str] = []

        def change(record: AdapterRecord) -> AdapterRecord:
            forced[:] = gate_check(record, version, force, "promote")
            return with_active(record, version)

        return self._update(name, "activate", actor, version, change, detail=lambda: forced_detail(forced))

    def rollback(self, name: str, actor: str = "operator") -> str:
        """Re-activate the version active before the current one; returns it."""
        def change(record: AdapterRecord) -> AdapterRecord:
            earlier = [v for v in record.previous_active if v in record.versions and v != record.active_version]
            if not earlier:
                raise VersionConflict(f"adapter '{name}' has no earlier active version to roll back to")
            back = earlier[-1]
            canary = None if record.canary and record.canary.version == back else record.canary
            last = len(record.previous_active) - 1 - record.previous_active[::-1].index(back)
            return record.model_copy(update={
                "active_version": back, "canary": canary, "domain": record.versions[back].card.domain,
                "previous_active": record.previous_active[:last]})

        return self._update(name, "rollback", actor, None, change).active_version

    def set_canary(self, name: str, version: str, percent: float, actor: str = "operator", *, auto: bool = False,
                   min_requests: int | None = None, force: bool = False) -> AdapterRecord:
        """Send `percent` of plain `name`'s requests to `version`; `auto`: the canary verdict promotes
        or rolls back after `min_requests` canary requests. A failed quality gate needs `force`."""
        forced: list[str] = []

        def change(record: AdapterRecord) -> AdapterRecord:
            if record.active_version is None or version == record.active_version:
                raise VersionConflict(f"a canary of '{name}' needs an active version other than '{version}'")
            forced[:] = gate_check(record, version, force, "canary")
            canary = Canary(version=version, percent=percent, auto=auto, min_requests=min_requests if auto else None,
                            forced=bool(forced), started_at=time.time())
            return record.model_copy(update={"canary": canary})

        if not 0 < percent < 100:
            raise InvalidAdapter(f"canary percent {percent} of '{name}' must be above 0 and below 100")
        if auto and (min_requests is None or min_requests < 1):
            raise InvalidAdapter(f"an automatic canary of '{name}' needs min_requests of at least 1")
        return self._update(name, "set_canary", actor, version, change,
                            detail=lambda: f"{percent}%{' auto' if auto else ''} {forced_detail(forced)}".strip())

    def clear_canary(self, name: str, actor: str = "operator") -> AdapterRecord:
        return self._update(name, "clear_canary", actor, None, lambda r: r.model_copy(update={"canary": None}))

    def finish_canary(self, name: str, version: str, promote: bool, verdict: str,
                      actor: str = "canary-verdict") -> AdapterRecord | None:
        """Apply an automatic canary verdict: promote `version` or end its canary, with the numbers in
        the audit log. None (nothing written) if that canary already ended (another replica judged it)."""
        applied = []

        def change(record: AdapterRecord) -> AdapterRecord:
            applied.clear()
            if record.canary is None or record.canary.version != version or not record.canary.auto:
                return record
            applied.append(True)
            done = with_active(record, version) if promote else record.model_copy(update={"canary": None})
            return done.model_copy(update={"last_verdict": f"{version} {'promoted' if promote else 'rolled back'}: "
                                                           f"{verdict}"})

        after = self._update(name, "canary_promote" if promote else "canary_rollback", actor, version, change,
                             detail=verdict)
        return after if applied else None

    def set_quality(self, name: str, version: str, report: QualityReport, actor: str = "quality-gate") -> AdapterRecord:
        """Store the quality gate's report with the version."""
        def change(record: AdapterRecord) -> AdapterRecord:
            vrec = record.version(version).model_copy(update={"quality": report})
            return record.model_copy(update={"versions": {**record.versions, version: vrec}})

        return self._update(name, "quality_gate", actor, version, change, detail=report.summary())

    def set_pinned(self, name: str, pinned: bool, actor: str = "operator") -> AdapterRecord:
        return self._update(name, "pin" if pinned else "unpin", actor, None,
                            lambda r: r.model_copy(update={"pinned": pinned}))

    def set_visibility(self, name: str, visibility: Visibility, tenant: str | None = None,
                       actor: str = "operator") -> AdapterRecord:
        """Change who may use an adapter; private needs an owner tenant."""
        check_visibility(name, visibility, tenant)
        return self._update(name, "set_visibility", actor, None,
                            lambda r: r.model_copy(update={"visibility": visibility, "owner_tenant": tenant}),
                            detail=f"{visibility} {tenant or ''}".strip())

    def retire_version(self, name: str, version: str, actor: str = "operator") -> AdapterRecord:
        """Drop one version (not the active or canary one); its files stay for collect_garbage."""
        def change(record: AdapterRecord) -> AdapterRecord:
            record.version(version)
            if version == record.active_version or (record.canary and record.canary.version == version):
                raise VersionConflict(f"version '{version}' of '{name}' is active or in canary; move off it first")
            versions = {k: v for k, v in record.versions.items() if k != version}
            return record.model_copy(update={"versions": versions})

        return self._update(name, "retire_version", actor, version, change,
                            also=lambda pipe: pipe.delete(embedding_key(name, version)))

    def retire(self, name: str, actor: str = "operator") -> None:
        """Remove the adapter from the registry; files stay until collect_garbage (replicas may hold them)."""
        versions: list[str] = []

        def change(record: AdapterRecord) -> None:
            versions.extend(record.versions)
            return None

        self._update(name, "retire", actor, None, change,
                     also=lambda pipe: [pipe.delete(embedding_key(name, v)) for v in versions])

    def collect_garbage(self, in_use: Iterable[str] = (), min_age_s: float = 300.0) -> list[str]:
        """Delete store folders no registry version names and no replica holds ('name@version' in
        `in_use`, e.g. every replica's resident list from placement); returns what was deleted.
        Folders younger than `min_age_s` stay: an add in flight has staged its folder before its
        record lands."""
        records = self.snapshot()
        live = {f"{r.name}@{v}" for r in records for v in r.versions} | set(in_use)
        if isinstance(self.store, BucketAdapterStore):
            return self._collect_bucket_garbage(records, live, min_age_s)
        deleted = []
        for name in self.store.names():
            for version in self.store.versions(name):
                folder = self.store.path(name, version)
                if f"{name}@{version}" not in live and time.time() - folder.stat().st_mtime >= min_age_s:
                    self.store.delete(name, version)
                    deleted.append(f"{name}@{version}")
        return deleted

    def _collect_bucket_garbage(self, records: list[AdapterRecord], live: set[str], min_age_s: float) -> list[str]:
        """collect_garbage in a bucket store: its folders are <name>/<version>-<token>; a folder the
        registry names, or whose name@version a replica holds, stays."""
        named = {vrec.uri for r in records for vrec in r.versions.values()}
        deleted = []
        for folder, modified in self.store.folders().items():
            name, version = folder.rsplit("/", 2)[-2], folder.rsplit("/", 1)[-1].rsplit("-", 1)[0]
            if folder in named or f"{name}@{version}" in live or time.time() - modified < min_age_s:
                continue
            self.store.delete_location(folder)
            deleted.append(f"{name}@{version}")
        return deleted

    def collect_garbage_unheld(self) -> list[str]:
        """collect_garbage, sparing what any composer replica reports resident (placement)."""
        with guarded(self.r, "read the composers' resident adapters"):
            replicas = PlacementStore(self.r).replicas()
        return self.collect_garbage({key for state in replicas.values() for key in state.resident})

    def missing_files(self) -> list[str]:
        """'name@version' of registered versions in the folder store whose folder is gone (the store
        lost them); versions in object storage are not looked at."""
        if not isinstance(self.store, AdapterStore):
            return []
        return [f"{r.name}@{version}" for r in self.snapshot() for version, vrec in r.versions.items()
                if not is_remote(vrec.uri or "") and not self.store.path(r.name, version).is_dir()]

    # ---- internals ---------------------------------------------------------------
    def _check_new_version_args(self, name: str, card: AdapterCard, tenant: str | None, visibility: str) -> None:
        try:
            check_name(name)
        except StoreError as err:
            raise InvalidAdapter(str(err)) from err
        if card.model_name != name:
            raise InvalidAdapter(f"card model_name '{card.model_name}' does not match adapter name '{name}'")
        check_visibility(name, visibility, tenant)

    def _check_fits_adapter(self, current: AdapterRecord | None, name: str, tenant: str | None,
                            visibility: str) -> None:
        if current is None:
            return
        if current.base_model != self.base_model:
            raise VersionConflict(f"adapter '{name}' was registered for base model '{current.base_model}', "
                                  f"not '{self.base_model}'")
        if tenant != current.owner_tenant:
            owner = f"tenant '{current.owner_tenant}'" if current.owner_tenant else "the operator (no tenant)"
            raise AccessDenied(f"adapter '{name}' belongs to {owner}, not {tenant or 'the operator'}")
        if current.visibility != visibility:
            raise VersionConflict(f"adapter '{name}' is {current.visibility}; a {visibility} version would change "
                                  "that: change it first with `loraretriever adapters visibility`")

    def _stage(self, name: str, version: str, src_dir: str | Path):
        """Copy, validate and checksum the files; returns (where they are now, weights, checksum, whether
        the store owns them). A folder in object storage is checked on a downloaded copy and stays where it is."""
        found = {}

        def verify(copy: Path) -> None:
            found["weights"] = read_adapter(copy, base_config=self.base_config, base_model=self.base_model,
                                            max_rank=self.max_rank, allow_unsafe_pickle=self.allow_unsafe_pickle,
                                            name=name)
            found["checksum"] = adapter_checksum(copy)

        remote = is_remote(str(src_dir))
        if is_uri(str(src_dir)) and not remote:
            raise InvalidAdapter(f"adapter '{name}' refused: {src_dir} is not a folder path or an object store URI")
        try:
            if remote:
                staged = str(src_dir).rstrip("/")
                with tempfile.TemporaryDirectory(prefix=f"{name}-check-") as tmp:
                    download_checked(self.objects, staged, Path(tmp), allow_unsafe_pickle=self.allow_unsafe_pickle)
                    verify(Path(tmp))
            else:
                staged = self.store.stage(name, version, src_dir, allow_unsafe_pickle=self.allow_unsafe_pickle,
                                          verify=verify)
        except VersionFolderExists:
            raise
        except (AdapterValidationError, StoreError) as err:
            raise InvalidAdapter(f"adapter '{name}' refused: {err}") from err
        return staged, found["weights"], found["checksum"], not remote

    def _execute_staged(self, pipe, name: str, version: str, checksum: str, staged: Path) -> bool:
        """EXEC; True once registered, False if a concurrent writer won (redo on fresh state).

        redis-py reports a dropped connection under WATCH as a WatchError too, and a lost EXEC
        reply may hide a success, so on any failure read back whether this version landed."""
        try:
            pipe.execute()
            return True
        except redis.RedisError as err:
            try:
                landed = self.get(name).versions.get(version)
            except AdapterNotFound:
                landed = None
            except RegistryUnavailable:
                raise _OutcomeUnknown(f"cannot add {name}@{version}: Redis became unavailable ({err}) and it is "
                                      f"unknown whether the version was registered; its files stay at {staged} "
                                      "until collect_garbage") from err
            if landed is not None and landed.checksum == checksum:
                return True
            if isinstance(err, redis.WatchError):
                return False
            raise RegistryUnavailable(f"cannot add a version of adapter '{name}': Redis failed ({err})") from err

    def _update(self, name: str, action: str, actor: str, version: str | None,
                change: Callable[[AdapterRecord], AdapterRecord | None], *,
                detail: str | Callable[[], str] = "", also: Callable | None = None) -> AdapterRecord | None:
        """Read-decide-write one record atomically; `change` returns the new record (None = delete).
        A callable `detail` is read after `change` (it may describe what `change` decided)."""
        for attempt in range(MAX_ATTEMPTS):
            with guarded(self.r, f"{action} adapter '{name}'"), self.r.pipeline(transaction=True) as pipe:
                try:
                    pipe.watch(ADAPTERS_KEY)
                    current = parse_record(pipe.hget(ADAPTERS_KEY, name))
                    if current is None:
                        raise AdapterNotFound(f"adapter '{name}' is not registered")
                    record = change(current)
                    if record == current:
                        return current  # nothing to write (e.g. activating the active version)
                    pipe.multi()
                    if also is not None:
                        also(pipe)
                    self._queue_write(pipe, record, action, actor, version, detail() if callable(detail) else detail,
                                      name=name)
                    pipe.execute()
                    return record
                except redis.WatchError:
                    pass
            backoff(attempt)
        raise VersionConflict(f"adapter '{name}' kept changing under concurrent writers; try again")

    @staticmethod
    def _queue_write(pipe, record: AdapterRecord | None, action: str, actor: str, version: str | None,
                     detail: str, *, name: str | None = None) -> None:
        name = name or record.name
        if record is None:
            pipe.hdel(ADAPTERS_KEY, name)
        else:
            record = record.model_copy(update={"updated_at": time.time()})
            pipe.hset(ADAPTERS_KEY, name, record.model_dump_json())
        pipe.incr(GENERATION_KEY)
        pipe.xadd(audit_key(name), {"actor": actor, "action": action, "version": version or "", "detail": detail},
                  maxlen=AUDIT_MAXLEN, approximate=True)


class _OutcomeUnknown(RegistryUnavailable):
    """The outcome of an add is unknown: its files must stay (a record may point at them)."""


def location_uri(location: str | Path) -> str:
    """A store location as the URI composers resolve: object storage as it is, a folder as file://."""
    return str(location) if is_uri(str(location)) else Path(location).resolve().as_uri()


def parse_record(raw: bytes | None) -> AdapterRecord | None:
    return None if raw is None else AdapterRecord.model_validate_json(raw)


def with_version(record: AdapterRecord, vrec: VersionRecord, activate: bool) -> AdapterRecord:
    duplicate = next((v.version for v in record.versions.values() if v.checksum == vrec.checksum), None)
    if duplicate:
        raise VersionConflict(f"adapter '{record.name}' already has these exact files as version '{duplicate}'")
    record = record.model_copy(update={"versions": {**record.versions, vrec.version: vrec}})
    if activate:
        return with_active(record, vrec.version)
    if record.active_version is None:
        return record.model_copy(update={"domain": vrec.card.domain})
    return record


def with_active(record: AdapterRecord, version: str) -> AdapterRecord:
    if record.active_version == version:
        return record
    previous = record.previous_active + ([record.active_version] if record.active_version else [])
    canary = None if record.canary and record.canary.version == version else record.canary
    return record.model_copy(update={"active_version": version, "canary": canary,
                                     "domain": record.versions[version].card.domain,
                                     "previous_active": previous[-20:]})


def gate_check(record: AdapterRecord, version: str, force: bool, action: str) -> list[str]:
    """Refuse (QualityGateRefused) a version whose quality gate failed, unless forced; returns the
    overridden reasons (empty when nothing was overridden)."""
    report = record.version(version).quality
    if report is None or report.passed is not False:
        return []
    if not force:
        raise QualityGateRefused(f"{action} of {record.name}@{version} refused: {report.summary()}; "
                                 "--force overrides (written to the audit log)")
    return report.reasons


def forced_detail(reasons: list[str]) -> str:
    return f"forced over the quality gate: {'; '.join(reasons)}" if reasons else ""


def check_visibility(name: str, visibility: str, tenant: str | None) -> None:
    if visibility not in ("shared", "private"):
        raise InvalidAdapter(f"visibility {visibility!r} of '{name}' must be 'shared' or 'private'")
    if tenant is not None and not TENANT_NAME.match(tenant):
        raise InvalidAdapter(f"tenant name {tenant!r} is not a valid tenant name")
    if visibility == "private" and tenant is None:
        raise InvalidAdapter(f"private adapter '{name}' needs an owner tenant")


def check_embeddings(embeddings, samples: int, name: str) -> np.ndarray:
    """(samples, dim) finite floats -> C-ordered float32."""
    array = np.asarray(embeddings)
    if array.ndim != 2 or array.shape[0] != samples or array.shape[1] < 1:
        raise InvalidAdapter(f"card embeddings of '{name}' have shape {array.shape}; expected ({samples}, dim)")
    if not np.issubdtype(array.dtype, np.floating) or not np.isfinite(array).all():
        raise InvalidAdapter(f"card embeddings of '{name}' must be finite floats")
    return np.ascontiguousarray(array, dtype=np.float32)


def backoff(attempt: int) -> None:
    time.sleep(random.uniform(0, 0.002 * min(attempt + 1, 20)))
