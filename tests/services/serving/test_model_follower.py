"""A retriever replica follows the active retriever model without a gap: the new model's
embedder and index are prepared on a background thread while the current pair answers, then
switched between two batches; rollback goes back the same way; a model that cannot load leaves
the current one serving. Real registry (redis-server, tiny zoo), real embedders (the "tuned"
version is a copy of the packaged model's folder: the switch is under test, not the training),
real embedded index."""
from __future__ import annotations

import shutil
import threading
import time

import pytest
from registered_zoo import register_tiny_zoo

from services.retrieval.embedder import Embedder, packaged_model_path
from services.retrieval.model_versions import ACTIVE_KEY, MODELS_KEY, ModelVersion, RetrieverModels
from services.serving.index_sync import IndexSync
from services.serving.model_follower import ModelFollower, ServingModel, prepare_model


@pytest.fixture
def replica(tiny_zoo, redis_server, tmp_path):
    from services.wiring import make_index

    admin, r, cfg = register_tiny_zoo(tiny_zoo, redis_server, tmp_path / "store", db=8,
                                      embedder={"backend": "torch"},
                                      retriever_tuning={"models_path": str(tmp_path / "models")})
    models = RetrieverModels(r, cfg.retriever_tuning.root())
    shutil.copytree(packaged_model_path(), models.root / "r1")
    r.hset(MODELS_KEY, "r1", ModelVersion(version="r1", path=str(models.root / "r1"), created_at=time.time(),
                                          candidate_top1=90.0, current_top1=80.0, compared_with=None,
                                          adapters=sorted(tiny_zoo.adapters), fingerprint="x",
                                          scoring="samples", hybrid_weight=0.8).model_dump_json())
    r.hset(MODELS_KEY, "r2", ModelVersion(version="r2", path=str(models.root / "gone"), created_at=time.time(),
                                          candidate_top1=90.0, current_top1=80.0, compared_with="r1",
                                          adapters=[], fingerprint="y").model_dump_json())
    sync = IndexSync(admin.registry, make_index(cfg, admin.embedder.dim), redis=r)
    sync.refresh(force=True)
    follower = ModelFollower(ServingModel(None, admin.embedder, sync), models.active_version,
                             lambda v: prepare_model(cfg, admin.registry, r, models, v, "replica", ready_timeout_s=60))
    yield follower, r, sorted(tiny_zoo.adapters), [q.inputs for q in tiny_zoo.queries]
    r.flushdb()


def test_switch_and_rollback_without_a_gap_and_a_broken_model_is_not_taken(replica):
    follower, r, names, prompts = replica
    answers, bad, stop = [], [], threading.Event()

    def ask() -> None:  # what the replica's batches do: one model for the embedding and the search
        while not stop.is_set():
            model = follower.serving()
            found = model.sync.index.search(model.embedder.encode(prompts), top_k=len(names))
            answers.append(model.version)
            bad.extend(r for r in found if sorted(a.name for a in r.adapters) != names)

    def wait_for(version, timeout_s=120.0) -> None:
        deadline = time.monotonic() + timeout_s
        while follower.serving().version != version:
            assert time.monotonic() < deadline, f"still serving {follower.current.version}, wanted {version}"
            follower.poll()
            time.sleep(0.2)

    asker = threading.Thread(target=ask)
    asker.start()
    try:
        r.set(ACTIVE_KEY, "r1")
        wait_for("r1")
        assert isinstance(follower.current.embedder, Embedder) and follower.current.sync.index.names() == names
        assert follower.current.sync.index.scoring == "samples"  # the serving r1 won its tuning with
        assert follower.current.hybrid_weight == 0.8
        r.delete(ACTIVE_KEY)  # rollback to the configured embedder
        wait_for(None)
        assert follower.current.sync.index.scoring == "centroid"
        r.set(ACTIVE_KEY, "r2")  # its folder is gone: it cannot load
        for _ in range(10):
            follower.poll()
            time.sleep(0.2)
        assert follower.serving().version is None
        time.sleep(0.5)
    finally:
        stop.set()
        asker.join(60)
    assert not bad, f"{len(bad)} answers missed adapters during the switches"
    assert {None, "r1"} <= set(answers)  # answers came from both models, before and after
