"""Adapter weights on disk: root/<name>/<version>/ holding a PEFT LoRA folder.

A version folder appears only whole: files are copied into a private staging folder
on the same filesystem, checked there, then renamed into place in one step. The copy is
what gets checked, so a source folder that changes underneath cannot slip past."""
from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from services.errors import InvalidRequest
from services.lora.adapter_files import CONFIG_FILE, PICKLE_FILE, SAFETENSORS_FILE

log = logging.getLogger(__name__)

# Names and versions become folder names and Redis key parts: no separators, no '..', no '@' or ':'.
SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
STAGING_DIR = ".staging"
# Files PEFT's save_pretrained writes beside the adapter that carry nothing we serve.
IGNORED_FILES = frozenset({"README.md"})


class StoreError(InvalidRequest):
    """A refused name, source folder or file; the message names it."""


class VersionFolderExists(StoreError):
    """The version folder is there already (staged by someone else)."""


def check_name(value: str, what: str = "adapter name") -> str:
    if not isinstance(value, str) or not SAFE_NAME.match(value) or ".." in value:
        raise StoreError(f"{what} {value!r} must be 1-128 of A-Z a-z 0-9 . _ - , start alphanumeric, "
                         "and contain no '..' or path separator")
    return value


class AdapterStore:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    def path(self, name: str, version: str) -> Path:
        return self.root / check_name(name) / check_name(version, "version")

    def source_files(self, src_dir: str | Path, *, allow_unsafe_pickle: bool = False) -> list[Path]:
        return source_files(src_dir, allow_unsafe_pickle=allow_unsafe_pickle)

    def stage(self, name: str, version: str, src_dir: str | Path, *, allow_unsafe_pickle: bool = False,
              verify: Callable[[Path], None] | None = None) -> Path:
        """Copy the adapter into root/<name>/<version>/ atomically; returns that folder.

        `verify` runs on the staged copy before it is published; if it raises, nothing is left."""
        final = self.path(name, version)
        files = self.source_files(src_dir, allow_unsafe_pickle=allow_unsafe_pickle)
        if final.exists():
            raise VersionFolderExists(f"{final}: version folder exists already")
        tmp = Path(tempfile.mkdtemp(prefix=f"{name}-{version}-", dir=self._staging()))
        claimed = False
        try:
            for file in files:
                shutil.copyfile(file, tmp / file.name)  # follows in-folder links: copies bytes, never links
                fsync_file(tmp / file.name)
            if verify is not None:
                verify(tmp)
            tmp.chmod(0o755)  # mkdtemp makes it private; replicas may run as another user
            final.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.mkdir(final)  # claims the version: fails if a concurrent stage got there first
            except FileExistsError:
                raise VersionFolderExists(f"{final}: version folder exists already") from None
            claimed = True
            os.rename(tmp, final)  # onto our own empty folder: one atomic step
            fsync_dir(final.parent)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            if claimed:
                remove_if_empty(final)
            remove_if_empty(final.parent)
            raise
        log.info("staged adapter %s@%s at %s", name, version, final)
        return final

    def delete_location(self, location: str | Path) -> None:
        """Remove the version folder `stage` returned."""
        folder = Path(location)
        self.delete(folder.parent.name, folder.name)

    def delete(self, name: str, version: str) -> None:
        """Remove a version folder (missing is fine); the adapter folder goes when empty."""
        final = self.path(name, version)
        if final.exists():
            # Rename first so readers never see a half-deleted folder.
            doomed = Path(tempfile.mkdtemp(prefix=f"{name}-{version}-del-", dir=self._staging()))
            os.rename(final, doomed / "v")
            shutil.rmtree(doomed)
        remove_if_empty(final.parent)

    def versions(self, name: str) -> list[str]:
        folder = self.root / check_name(name)
        return sorted(p.name for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []

    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and p.name != STAGING_DIR)

    def _staging(self) -> Path:
        staging_root = self.root / STAGING_DIR
        staging_root.mkdir(parents=True, exist_ok=True)
        return staging_root


def source_files(src_dir: str | Path, *, allow_unsafe_pickle: bool = False) -> list[Path]:
    """The files of `src_dir` to copy; refuses anything unexpected or pointing outside it."""
    src = Path(src_dir)
    if not src.is_dir():
        raise StoreError(f"{src}: not a directory")
    src = src.resolve()
    allowed = {CONFIG_FILE, SAFETENSORS_FILE} | ({PICKLE_FILE} if allow_unsafe_pickle else set())
    files = []
    for entry in sorted(src.iterdir()):
        if entry.name in IGNORED_FILES:
            continue
        if entry.name == PICKLE_FILE and not allow_unsafe_pickle:
            raise StoreError(f"{entry}: pickle weights are refused (they can run code); "
                             f"convert to {SAFETENSORS_FILE} or allow unsafe pickle")
        if entry.name not in allowed:
            raise StoreError(f"{entry}: unexpected file in an adapter folder "
                             f"(allowed: {', '.join(sorted(allowed))})")
        target = entry.resolve()
        if entry.is_symlink() and target.parent != src:
            raise StoreError(f"{entry}: symlink points outside the adapter folder ({target})")
        if not target.is_file():
            raise StoreError(f"{entry}: not a regular file")
        files.append(entry)
    if not any(f.name == CONFIG_FILE for f in files):
        raise StoreError(f"{src}: no {CONFIG_FILE}")
    return files


def fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:
        pass
