"""Folders of files named by URI: `file:///...`, `s3://bucket/prefix`, `gs://...`, `az://...`.

One library reads and writes them all: obstore (the Rust object_store crate under a small
Python API). It was chosen over fsspec + s3fs because it is one self-contained wheel with no
Python dependencies (s3fs pins aiobotocore, which pins botocore to a narrow range and would
fight the boto3 others install), its clients retry and time out on their own terms, and one
call opens any of the schemes above.

Credentials never sit in the config: the S3 client reads the standard environment
(`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, web identity on EKS;
on Kubernetes a Secret fills them, see docs/kubernetes.md); GCS and Azure read theirs
(`GOOGLE_SERVICE_ACCOUNT`, `AZURE_STORAGE_ACCOUNT_KEY`, ...). The config names only the
endpoint of an S3-compatible server, its region and whether plain http is allowed."""
from __future__ import annotations

import datetime
import logging
import re
from pathlib import Path
from urllib.parse import urlsplit

from services.config import ObjectStoreConfig
from services.errors import Unavailable

log = logging.getLogger(__name__)

SCHEME = re.compile(r"^([a-z][a-z0-9+.-]*)://")
REMOTE_SCHEMES = ("s3", "s3a", "gs", "az", "abfs", "abfss", "http", "https")


class ObjectStoreError(Unavailable):
    """An object store could not be read or written (unreachable, denied, missing object); the
    message names the URI and the cause."""


def is_uri(text: str) -> bool:
    return bool(SCHEME.match(str(text)))


def is_remote(text: str) -> bool:
    match = SCHEME.match(str(text))
    return bool(match) and match.group(1) in REMOTE_SCHEMES


def local_path(uri: str) -> Path:
    """The folder a `file://` URI (or a plain path) names."""
    text = str(uri)
    if not is_uri(text):
        return Path(text)
    parts = urlsplit(text)
    if parts.scheme != "file":
        raise ValueError(f"{uri} is not a local folder")
    return Path(parts.path)


def join(uri: str, *parts: str) -> str:
    return "/".join([str(uri).rstrip("/"), *parts])


class ObjectFolders:
    """Read, write, list and delete folders of files under URIs, with one config's settings."""

    def __init__(self, config: ObjectStoreConfig | None = None):
        self.config = config or ObjectStoreConfig()

    def _open(self, uri: str):
        """(obstore store rooted at the URI's bucket, the key prefix under it)."""
        from obstore.store import from_url

        parts = urlsplit(uri)
        root = f"{parts.scheme}://{parts.netloc}"
        cfg = self.config
        options = {"allow_http": cfg.allow_http, "connect_timeout": f"{cfg.connect_timeout_s}s",
                   "timeout": f"{cfg.timeout_s}s"}
        retry = {"max_retries": cfg.retries,
                 "retry_timeout": datetime.timedelta(seconds=cfg.timeout_s * (cfg.retries + 1))}
        extra = {}
        if parts.scheme in ("s3", "s3a"):
            extra = {k: v for k, v in (("endpoint", cfg.endpoint_url), ("region", cfg.region)) if v}
        try:
            store = from_url(root, config=extra or None, client_options=options, retry_config=retry)
        except Exception as err:  # a malformed URI or settings: obstore raises its own kinds
            raise ObjectStoreError(f"cannot open {uri}: {err}") from err
        return store, parts.path.strip("/")

    def list_files(self, uri: str) -> dict[str, tuple[int, float]]:
        """Relative path -> (size, modified unix time) of every object under the folder URI."""
        import obstore

        store, prefix = self._open(uri)
        found = {}
        try:
            for batch in obstore.list(store, prefix + "/" if prefix else None):
                for meta in batch:
                    found[meta["path"][len(prefix) + 1 if prefix else 0:]] = (meta["size"],
                                                                              meta["last_modified"].timestamp())
        except Exception as err:
            raise ObjectStoreError(f"cannot list {uri}: {short(err)}") from err
        return found

    def download(self, uri: str, names: list[str], dest: Path) -> None:
        """Copy the named files of folder `uri` into `dest` (which exists); raises ObjectStoreError."""
        import obstore

        store, prefix = self._open(uri)
        for name in names:
            key = f"{prefix}/{name}" if prefix else name
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            try:
                with open(dest / name, "wb") as handle:  # streamed: a base model's weights do not fit memory twice
                    for chunk in obstore.get(store, key).stream(min_chunk_size=8 * 2**20):
                        handle.write(memoryview(chunk))
            except FileNotFoundError as err:
                raise ObjectStoreError(f"{join(uri, name)} does not exist") from err
            except Exception as err:
                raise ObjectStoreError(f"cannot read {join(uri, name)}: {short(err)}") from err

    def upload(self, src: Path, names: list[str], uri: str) -> None:
        import obstore

        store, prefix = self._open(uri)
        for name in names:
            try:
                obstore.put(store, f"{prefix}/{name}" if prefix else name, src / name)
            except Exception as err:
                raise ObjectStoreError(f"cannot write {join(uri, name)}: {short(err)}") from err

    def delete(self, uri: str) -> None:
        """Delete every object under the folder URI (missing is fine)."""
        import obstore

        store, prefix = self._open(uri)
        keys = [join(prefix, name) for name in self.list_files(uri)]
        if keys:
            try:
                obstore.delete(store, keys)
            except Exception as err:
                raise ObjectStoreError(f"cannot delete {uri}: {short(err)}") from err


def short(err: Exception) -> str:
    """obstore's messages carry a multi-line debug dump after the first line."""
    return str(err).split("\n", 1)[0][:300]
