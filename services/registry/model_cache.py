"""The base model by URI: `base_model.path: s3://bucket/models/smollm2` is fetched once per node.

Chosen over a Kubernetes init container: one code path for KubeRay, `ray start` clusters and a
laptop, with the same object store settings and credentials as the adapters, and a node that
joins later (the autoscaler) fetches on its own. The first replica on a node fetches; replicas
starting beside it wait on a file lock and then find the folder complete. The folder appears
whole (staged, every file's size checked against the listing, then renamed), under
<cache>/models/<last path part>-<hash of the URI>/; a later start reads nothing over the network.
Only config.json is fetched where the config alone is needed (the registry on the ingress)."""
from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import shutil
import tempfile
import time
from pathlib import Path

from services.registry.object_store import ObjectFolders, ObjectStoreError

log = logging.getLogger(__name__)

COMPLETE = ".complete"  # the listing the folder was checked against


def node_model_folder(uri: str, cache_root: str | Path, objects: ObjectFolders, *, config_only: bool = False) -> Path:
    """This node's copy of the model folder at `uri` (fetched on first use); raises ObjectStoreError."""
    uri = uri.rstrip("/")
    tag = hashlib.sha256(uri.encode()).hexdigest()[:12]
    models = Path(cache_root) / "models"
    whole = models / f"{uri.rsplit('/', 1)[-1]}-{tag}"
    final = whole.with_name(whole.name + "-config") if config_only else whole
    for done in (whole, final):  # the whole folder serves a config-only caller too
        if (done / COMPLETE).is_file():
            return done
    models.mkdir(parents=True, exist_ok=True)
    with open(models / f".lock-{final.name}", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one fetch per node; the others wait here, then find it done
        if (final / COMPLETE).is_file():
            return final
        listing = objects.list_files(uri)
        if config_only:
            listing = {k: v for k, v in listing.items() if k == "config.json"}
        if "config.json" not in listing:
            raise ObjectStoreError(f"{uri} holds no config.json: not a Hugging Face model folder")
        started = time.perf_counter()
        tmp = Path(tempfile.mkdtemp(prefix=f"{final.name}-", dir=models))
        try:
            for name in sorted(listing):  # one at a time, logged: a model's weights take a while
                objects.download(uri, [name], tmp)
                log.info("base model %s: fetched %s (%d bytes)", uri, name, listing[name][0])
            wrong = [n for n, (size, _) in listing.items() if (tmp / n).stat().st_size != size]
            if wrong:
                raise ObjectStoreError(f"{uri}: {wrong[0]} changed size while it was fetched; try again")
            (tmp / COMPLETE).write_text(json.dumps({n: size for n, (size, _) in listing.items()}))
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    total = sum(size for size, _ in listing.values())
    log.info("base model %s on this node at %s: %d files, %d bytes in %.1f s", uri, final, len(listing), total,
             time.perf_counter() - started)
    return final
