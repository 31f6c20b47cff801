"""Adapter versions in object storage: <uri>/<name>/<version>-<token>/{adapter_config.json, weights}.

The counterpart of the folder store (store.py) when `adapter_store.uri` names a bucket. The
files are checked on a private local copy first (the same checks as the folder store, then
the registry's validation and checksum), and only then uploaded. A bucket has no atomic
rename or mkdir, so every upload goes to a folder of its own (`<version>-<token>`): two
writers that raced for one version number never overwrite each other's files, and the loser
deletes its folder. Readers go by the registry record, which names the folder and lands only
after the upload finished, so nothing reads a half-uploaded version.

Also here: reading a folder already in a bucket (`adapters add NAME s3://...`) onto local disk
with the same file checks as an upload."""
from __future__ import annotations

import logging
import secrets
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from services.registry.object_store import ObjectFolders, join
from services.registry.store import StoreError, check_name, source_files

log = logging.getLogger(__name__)

MAX_FOLDER_FILES = 8  # a PEFT folder holds two or three files; more is not an adapter folder
MAX_FOLDER_BYTES = 512 * 1024 * 1024


class BucketAdapterStore:
    def __init__(self, uri: str, objects: ObjectFolders, *, scratch: str | Path | None = None):
        """scratch: a local folder for the checked copies (None: the system's temp folder)."""
        self.uri = uri.rstrip("/")
        self.objects = objects
        self.scratch = scratch

    def versions(self, name: str) -> list[str]:
        """Version numbers come from the registry alone here (folders carry a token)."""
        return []

    def stage(self, name: str, version: str, src_dir: str | Path, *, allow_unsafe_pickle: bool = False,
              verify: Callable[[Path], None] | None = None) -> str:
        """Check a local copy of `src_dir`, then upload it; returns the new folder's URI."""
        files = source_files(src_dir, allow_unsafe_pickle=allow_unsafe_pickle)
        location = join(self.uri, check_name(name), f"{check_name(version, 'version')}-{secrets.token_hex(4)}")
        with tempfile.TemporaryDirectory(prefix=f"{name}-{version}-", dir=self.scratch) as tmp:
            for file in files:
                shutil.copyfile(file, Path(tmp) / file.name)  # bytes, never links
            if verify is not None:
                verify(Path(tmp))
            try:
                self.objects.upload(Path(tmp), [f.name for f in files], location)
            except BaseException:
                self.delete_location(location)
                raise
        log.info("uploaded adapter %s@%s to %s", name, version, location)
        return location

    def delete_location(self, uri: str) -> None:
        try:
            self.objects.delete(uri)
        except Exception as err:  # the record never named it: only space is lost until gc
            log.warning("could not delete %s: %s", uri, err)

    def folders(self) -> dict[str, float]:
        """Every version folder's URI -> its newest object's time."""
        out: dict[str, float] = {}
        for path, (_, modified) in self.objects.list_files(self.uri).items():
            parts = path.split("/")
            if len(parts) >= 3:
                folder = join(self.uri, parts[0], parts[1])
                out[folder] = max(out.get(folder, 0.0), modified)
        return out


def download_checked(objects: ObjectFolders, uri: str, dest: Path, *, allow_unsafe_pickle: bool) -> list[Path]:
    """Copy the folder `uri` into `dest` with the checks an uploaded folder gets (only the adapter's
    files, PEFT's README skipped, no subfolders, bounded size); returns the copied files."""
    listing = objects.list_files(uri)
    if not listing:
        raise StoreError(f"{uri}: no files there")
    if len(listing) > MAX_FOLDER_FILES or sum(size for size, _ in listing.values()) > MAX_FOLDER_BYTES:
        raise StoreError(f"{uri}: holds {len(listing)} files; an adapter folder holds adapter_config.json and "
                         f"its weights (at most {MAX_FOLDER_BYTES // 2**20} MiB)")
    subfolders = sorted(p for p in listing if "/" in p)
    if subfolders:
        raise StoreError(f"{join(uri, subfolders[0])}: subfolders are not allowed in an adapter folder")
    objects.download(uri, sorted(listing), dest)
    try:
        return source_files(dest, allow_unsafe_pickle=allow_unsafe_pickle)
    except StoreError as err:  # name the bucket, not the scratch copy
        raise StoreError(str(err).replace(str(dest.resolve()), uri).replace(str(dest), uri)) from None
