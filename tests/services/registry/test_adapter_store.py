"""AdapterStore: whole folders or nothing, and no file from outside the source folder."""
from __future__ import annotations

import os

import pytest
from registry_fixtures import tree_state

from services.registry.store import StoreError, VersionFolderExists


def test_stage_copies_the_adapter_files_only(store, adapter_dir):
    src = adapter_dir(0)
    staged = store.stage("math", "v1", src)
    assert staged == store.path("math", "v1") == store.root / "math" / "v1"
    assert sorted(p.name for p in staged.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (staged / name).read_bytes() == (src / name).read_bytes()
    assert list((store.root / ".staging").iterdir()) == []
    assert store.names() == ["math"] and store.versions("math") == ["v1"]


@pytest.mark.parametrize("name", ["../evil", "a/b", "..", "a..b", "", ".hidden", "x@v1", "a\\b", "n:1", "é"])
def test_refuses_unsafe_names(store, adapter_dir, name):
    with pytest.raises(StoreError, match="adapter name"):
        store.stage(name, "v1", adapter_dir(0))
    with pytest.raises(StoreError, match="version"):
        store.stage("ok", name or "/", adapter_dir(0, "other"))
    assert tree_state(store.root) == {}


def test_pickle_weights_only_when_allowed(store, adapter_dir):
    src = adapter_dir(0)
    (src / "adapter_model.safetensors").rename(src / "adapter_model.bin")
    with pytest.raises(StoreError, match="adapter_model.bin: pickle weights are refused"):
        store.stage("p", "v1", src)
    staged = store.stage("p", "v1", src, allow_unsafe_pickle=True)
    assert sorted(p.name for p in staged.iterdir()) == ["adapter_config.json", "adapter_model.bin"]


def test_refuses_a_symlink_leaving_the_folder(store, adapter_dir, tmp_path):
    src = adapter_dir(0)
    outside = tmp_path / "secret.safetensors"
    (src / "adapter_model.safetensors").rename(outside)
    (src / "adapter_model.safetensors").symlink_to(outside)
    with pytest.raises(StoreError, match="symlink points outside"):
        store.stage("s", "v1", src)
    assert not store.path("s", "v1").exists()


def test_copies_the_bytes_of_a_symlink_inside_the_folder(store, adapter_dir):
    src = adapter_dir(0)
    (src / "adapter_model.safetensors").rename(src / "README.md")  # an ignored name holds the real bytes
    (src / "adapter_model.safetensors").symlink_to(src / "README.md")
    staged = store.stage("s", "v1", src)
    assert not (staged / "adapter_model.safetensors").is_symlink()
    assert (staged / "adapter_model.safetensors").read_bytes() == (src / "README.md").read_bytes()


@pytest.mark.parametrize("extra", ["train.py", "subdir"])
def test_refuses_unexpected_files(store, adapter_dir, extra):
    src = adapter_dir(0)
    if extra == "subdir":
        (src / extra).mkdir()
    else:
        (src / extra).write_text("import os")
    with pytest.raises(StoreError, match=f"{extra}: unexpected file"):
        store.stage("u", "v1", src)
    assert tree_state(store.root) == {}


def test_a_failed_verify_leaves_nothing(store, adapter_dir):
    store.stage("keep", "v1", adapter_dir(0))
    before = tree_state(store.root)

    def refuse(copy):
        assert (copy / "adapter_config.json").is_file()  # verify sees the staged copy
        raise ValueError("bad weights")

    with pytest.raises(ValueError, match="bad weights"):
        store.stage("new", "v1", adapter_dir(1), verify=refuse)
    assert tree_state(store.root) == before


def test_an_existing_version_is_never_overwritten(store, adapter_dir):
    first = store.stage("a", "v1", adapter_dir(0))
    content = tree_state(first)
    with pytest.raises(VersionFolderExists):
        store.stage("a", "v1", adapter_dir(1))
    assert tree_state(first) == content


def test_delete_removes_the_version_and_the_empty_adapter_folder(store, adapter_dir):
    store.stage("d", "v1", adapter_dir(0))
    store.stage("d", "v2", adapter_dir(1))
    store.delete("d", "v1")
    assert store.versions("d") == ["v2"]
    store.delete("d", "v2")
    store.delete("d", "v2")  # missing is fine
    assert not (store.root / "d").exists() and store.names() == []


def test_staged_folder_is_readable_by_others(store, adapter_dir):
    staged = store.stage("m", "v1", adapter_dir(0))
    assert os.stat(staged).st_mode & 0o755 == 0o755
