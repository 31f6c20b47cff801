"""Adapter versions in object storage (a real S3-compatible server on loopback, SeaweedFS): uploads to a
bucket store, folders registered where they are, the node cache that fetches and verifies them."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from registry_fixtures import BASE_MODEL, card, embeddings, redis_state, tiny_config
from test_registry_hostile import HOSTILE_FILES

from services.lora.adapter_files import SAFETENSORS_FILE, adapter_checksum
from services.registry.bucket_store import BucketAdapterStore
from services.registry.node_cache import AdapterFetchError, ChecksumMismatch, NodeAdapterCache, registry_resolver
from services.registry.object_store import ObjectFolders
from services.registry.registry import AdapterRegistry, InvalidAdapter


@pytest.fixture
def objects(s3):
    return ObjectFolders(s3.config)


@pytest.fixture
def bucket_registry(redis_client, s3, objects):
    store = BucketAdapterStore(f"{s3.root}/adapters", objects)
    return AdapterRegistry(redis_client, store, base_config=tiny_config(), base_model=BASE_MODEL, objects=objects)


def node_cache(registry, root: Path, objects) -> NodeAdapterCache:
    return NodeAdapterCache(root, registry_resolver(registry, root / "no-folder-store"), objects)


def add(registry, src, name="m", **kwargs):
    return registry.add_version(name, src, card(name), embeddings(), **kwargs)


def test_a_bucket_store_uploads_versions_and_a_node_fetches_them_once(bucket_registry, objects, adapter_dir, s3,
                                                                       tmp_path):
    src = adapter_dir(0)
    vrec = add(bucket_registry, src)
    assert vrec.uri.startswith(f"{s3.root}/adapters/m/v1-") and vrec.path == vrec.uri
    assert sorted(objects.list_files(vrec.uri)) == ["adapter_config.json", SAFETENSORS_FILE]

    cache = node_cache(bucket_registry, tmp_path / "node-a", objects)
    folder = cache.local_folder("m@v1")
    assert folder == tmp_path / "node-a" / "m" / "v1"
    assert adapter_checksum(folder) == vrec.checksum
    assert (folder / SAFETENSORS_FILE).read_bytes() == (src / SAFETENSORS_FILE).read_bytes()
    assert cache.local_folder("m@v1") == folder and cache.stats()["fetches"] == 1
    cache.drop("m@v1")  # the registry moved off it: the node's copy goes, a later use fetches again
    assert not folder.exists()
    assert cache.local_folder("m@v1") == folder and cache.stats()["fetches"] == 2
    # Another process on the node (a restarted replica) finds the verified copy and reads nothing.
    again = node_cache(bucket_registry, tmp_path / "node-a", objects)
    assert again.local_folder("m@v1") == folder and again.stats()["fetches"] == 0
    assert not list((tmp_path / "node-a" / ".staging").iterdir())


@pytest.mark.parametrize("case", ["nan", "extra_file", "pickle", "rank_mismatch"])
def test_a_refused_upload_to_a_bucket_leaves_redis_and_the_bucket_as_they_were(bucket_registry, objects,
                                                                                 adapter_dir, s3, case):
    add(bucket_registry, adapter_dir(1))  # an existing version, so the bucket is not empty
    before_redis, before_bucket = redis_state(s3_redis_url(bucket_registry)), objects.list_files(s3.root)
    src = adapter_dir(0)
    spoil, message = HOSTILE_FILES[case]
    spoil(src)
    with pytest.raises(InvalidAdapter, match=message):
        add(bucket_registry, src)
    assert redis_state(s3_redis_url(bucket_registry)) == before_redis
    assert objects.list_files(s3.root) == before_bucket


def s3_redis_url(registry) -> str:
    kwargs = registry.r.connection_pool.connection_kwargs
    return f"redis://{kwargs['host']}:{kwargs['port']}/{kwargs.get('db', 0)}"


def test_files_already_in_a_bucket_are_registered_where_they_are_after_the_same_checks(
        bucket_registry, objects, adapter_dir, s3, tmp_path):
    src = adapter_dir(2)
    (src / "README.md").write_text("PEFT writes this; it is skipped")
    uri = f"{s3.root}/trained/m-run-7"
    objects.upload(src, ["adapter_config.json", SAFETENSORS_FILE, "README.md"], uri)
    vrec = add(bucket_registry, uri + "/")
    assert vrec.uri == uri and vrec.checksum == adapter_checksum(src)
    assert node_cache(bucket_registry, tmp_path / "node", objects).local_folder("m@v1").is_dir()
    # Not the store's: retiring the version and collecting garbage leaves the files where they were.
    add(bucket_registry, adapter_dir(3))
    bucket_registry.retire_version("m", "v1")
    bucket_registry.collect_garbage(min_age_s=0)
    assert "README.md" in objects.list_files(uri)

    stray = adapter_dir(0)
    (stray / "setup.py").write_text("import os")
    bad = f"{s3.root}/trained/stray"
    objects.upload(stray, ["adapter_config.json", SAFETENSORS_FILE, "setup.py"], bad)
    before = redis_state(s3_redis_url(bucket_registry))
    with pytest.raises(InvalidAdapter, match=f"{bad}/setup.py: unexpected file"):
        add(bucket_registry, bad)
    with pytest.raises(InvalidAdapter, match="no files there"):
        add(bucket_registry, f"{s3.root}/trained/nothing-here")
    with pytest.raises(InvalidAdapter, match="not a folder path or an object store URI"):
        add(bucket_registry, "ftp://example.invalid/m")
    assert redis_state(s3_redis_url(bucket_registry)) == before


def test_files_that_fail_their_checksum_are_refused_deleted_and_never_served(bucket_registry, objects, adapter_dir,
                                                                             tmp_path, caplog):
    vrec = add(bucket_registry, adapter_dir(0))
    other = adapter_dir(1)  # valid weights of the same shapes: only the checksum tells them apart
    objects.upload(other, [SAFETENSORS_FILE], vrec.uri)
    cache = node_cache(bucket_registry, tmp_path / "node", objects)
    with pytest.raises(ChecksumMismatch, match="adapter 'm@v1' refused: its files in the adapter store do not match") \
            as refused:
        cache.local_folder("m@v1")
    assert "s3://" not in refused.value.message  # where files live is the log's, not the client's
    assert f"files at {vrec.uri} have sha256" in caplog.text
    assert not (tmp_path / "node" / "m" / "v1").exists()
    assert not list((tmp_path / "node" / ".staging").iterdir())
    assert cache.stats()["refused"] == 1 and cache.stats()["fetches"] == 0
    # Put right in the bucket, the next request's fetch succeeds: a refusal is not remembered.
    objects.upload(adapter_dir(0), [SAFETENSORS_FILE], vrec.uri)
    assert adapter_checksum(cache.local_folder("m@v1")) == vrec.checksum


def test_the_folder_store_records_file_uris_and_is_read_in_place_after_its_checksum(registry, adapter_dir, store,
                                                                                     tmp_path):
    vrec = add(registry, adapter_dir(0))
    folder = store.path("m", "v1")
    assert vrec.uri == folder.resolve().as_uri()
    cache = NodeAdapterCache(tmp_path / "cache", registry_resolver(registry, store.root))
    assert cache.local_folder("m@v1") == folder.resolve() and cache.stats()["fetches"] == 0
    cache.drop("m@v1")
    assert folder.is_dir()  # a folder read in place is the store's, never deleted by a node
    add(registry, adapter_dir(1))
    shutil.copyfile(adapter_dir(0) / SAFETENSORS_FILE, store.path("m", "v2") / SAFETENSORS_FILE)
    with pytest.raises(ChecksumMismatch, match="adapter 'm@v2' refused"):
        cache.local_folder("m@v2")
    assert (store.path("m", "v2") / SAFETENSORS_FILE).is_file()  # the store's own files are not deleted


def test_an_unreachable_object_store_is_a_clear_error_naming_the_version(bucket_registry, adapter_dir, s3, tmp_path,
                                                                         caplog):
    from cluster.redis_server import free_port
    from services.config import ObjectStoreConfig

    add(bucket_registry, adapter_dir(0))
    closed = ObjectFolders(ObjectStoreConfig(endpoint_url=f"http://127.0.0.1:{free_port()}", allow_http=True,
                                             retries=0, connect_timeout_s=1, timeout_s=2))
    cache = node_cache(bucket_registry, tmp_path / "node", closed)
    with pytest.raises(AdapterFetchError, match="adapter 'm@v1' cannot be fetched from the adapter store"):
        cache.local_folder("m@v1")
    assert "adapter m@v1 cannot be fetched: cannot list s3://" in caplog.text


def test_garbage_collection_in_a_bucket_store_deletes_retired_unheld_versions(bucket_registry, objects,
                                                                               adapter_dir, s3):
    first = add(bucket_registry, adapter_dir(0))
    second = add(bucket_registry, adapter_dir(1))
    bucket_registry.retire_version("m", "v1")
    assert bucket_registry.collect_garbage(in_use=["m@v1"], min_age_s=0) == []  # a replica still holds it
    assert bucket_registry.collect_garbage(min_age_s=0) == ["m@v1"]
    assert objects.list_files(first.uri) == {} and objects.list_files(second.uri)


def test_a_base_model_by_uri_is_fetched_once_per_node_and_appears_whole(objects, s3, tmp_path):
    from cluster.redis_server import free_port
    from services.config import ObjectStoreConfig
    from services.registry.model_cache import node_model_folder
    from services.registry.object_store import ObjectStoreError

    model = tmp_path / "model"
    (model / "sub").mkdir(parents=True)
    (model / "config.json").write_text('{"model_type": "llama"}')
    (model / "model.safetensors").write_bytes(b"w" * 3000)
    (model / "sub" / "tokenizer.json").write_text("{}")
    uri = f"{s3.root}/models/tiny"
    objects.upload(model, ["config.json", "model.safetensors", "sub/tokenizer.json"], uri)

    config_only = node_model_folder(uri, tmp_path / "node", objects, config_only=True)
    assert [p.name for p in config_only.iterdir() if p.name != ".complete"] == ["config.json"]
    folder = node_model_folder(uri, tmp_path / "node", objects)
    assert folder.name.startswith("tiny-") and (folder / "sub" / "tokenizer.json").read_text() == "{}"
    assert (folder / "model.safetensors").read_bytes() == b"w" * 3000
    # Found on the node afterwards: a server that is gone is not asked again, and the whole folder
    # serves a config-only caller.
    gone = ObjectFolders(ObjectStoreConfig(endpoint_url=f"http://127.0.0.1:{free_port()}", allow_http=True, retries=0,
                                           connect_timeout_s=1, timeout_s=2))
    assert node_model_folder(uri, tmp_path / "node", gone) == folder
    assert node_model_folder(uri, tmp_path / "node", gone, config_only=True) == folder
    with pytest.raises(ObjectStoreError, match="holds no config.json"):
        node_model_folder(f"{s3.root}/models/none", tmp_path / "node", objects)
