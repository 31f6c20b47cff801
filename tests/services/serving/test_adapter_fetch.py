"""A composer fetches adapter versions from object storage off its batch thread: while one version's
fetch is stalled (a real S3 server behind a held link), the running rows keep stepping; only the
request that needs it waits, then answers as a composer that read the files from disk would. A
fetched file that fails the registry's checksum fails its own request, never the batch."""
from __future__ import annotations

import asyncio
import shutil
import time

import pytest
from held_link import HeldLink

from services.config import ObjectStoreConfig
from services.lora.adapter_files import SAFETENSORS_FILE
from services.registry.bucket_store import BucketAdapterStore
from services.registry.node_cache import ChecksumMismatch, NodeAdapterCache, registry_resolver
from services.registry.object_store import ObjectFolders
from services.registry.registry import AdapterRegistry
from services.schemas import CompositionPlan, UsedAdapter
from services.serving.composer_service import ComposeJob, ComposerService


@pytest.fixture
def bucket(s3, redis_client, tiny_zoo):
    """The zoo's adapters registered in a bucket store; names sorted."""
    from transformers import AutoConfig

    objects = ObjectFolders(s3.config)
    registry = AdapterRegistry(redis_client, BucketAdapterStore(f"{s3.root}/adapters", objects),
                               base_config=AutoConfig.from_pretrained(tiny_zoo.base), base_model="tiny-random-llama")
    names = sorted(tiny_zoo.adapters)
    for card in tiny_zoo.cards:
        registry.add_version(card.model_name, tiny_zoo.adapters[card.model_name], card,
                             [[1.0, 0.0]] * len(card.sample))
    return registry, objects, names


def composer(tiny_zoo, adapters) -> ComposerService:
    from services.lora.engine import CompositionEngine

    engine = CompositionEngine.from_pretrained(tiny_zoo.base, device="cpu", dtype="float32", max_adapters_per_row=1,
                                               device_slots=4, cpu_slots=4)
    return ComposerService(engine, adapters, max_prompt_tokens=256)


def job(service: ComposerService, name: str, max_tokens: int) -> ComposeJob:
    plan = CompositionPlan(adapters=[UsedAdapter(name=name, version="v1", weight=1.0)], composition="selection")
    no_eos = {eos: -100.0 for eos in service.engine.eos_ids}  # rows run their full length
    return ComposeJob(request_id=f"r-{name}-{max_tokens}", prompt="12 + 7 =", plan=plan, max_tokens=max_tokens,
                      logit_bias=no_eos)


async def answer(service: ComposerService, compose: ComposeJob):
    return [item async for item in service.generate(compose)][-1]


async def until(condition, what: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting until {what}")
        await asyncio.sleep(0.01)


def test_a_stalled_fetch_holds_only_the_request_that_needs_it(bucket, s3, tiny_zoo, tmp_path):
    registry, _, (running, fetched, _) = bucket
    link = HeldLink(int(s3.server.endpoint.rsplit(":", 1)[1]))
    via_link = ObjectFolders(ObjectStoreConfig(**{**s3.config.model_dump(), "endpoint_url": link.endpoint}))
    service = composer(tiny_zoo, NodeAdapterCache(tmp_path / "node", registry_resolver(registry, tmp_path / "none"),
                                                  via_link))
    for name in (running, fetched):  # the oracle reads the same files from a folder
        shutil.copytree(tiny_zoo.adapters[name], tmp_path / "folder" / name / "v1")
    oracle = composer(tiny_zoo, tmp_path / "folder")

    async def scenario():
        long_row = asyncio.create_task(answer(service, job(service, running, 200)))
        await until(lambda: service.batcher.stats.steps > 0, "the long row runs")
        link.hold()
        waiting = asyncio.create_task(answer(service, job(service, fetched, 8)))
        await until(lambda: link.waiting > 0, "the fetch reaches the held link")
        steps = service.batcher.stats.steps
        await until(lambda: service.batcher.stats.steps >= steps + 20, "the batch steps on during the fetch")
        assert link.waiting > 0 and not waiting.done() and service.queue_len == 2
        link.release()
        return await waiting, await long_row

    try:
        got, long_result = asyncio.run(scenario())
    finally:
        link.close()
    expected = asyncio.run(answer(oracle, job(oracle, fetched, 8)))
    assert got.token_ids == expected.token_ids and got.text == expected.text
    assert long_result.completion_tokens == 200
    assert service.pool_stats()["fetches"] == 2


def test_a_file_failing_its_checksum_fails_its_request_alone_and_is_never_served(bucket, tiny_zoo, tmp_path):
    registry, objects, (running, spoiled, _) = bucket
    uri = registry.get(spoiled).version("v1").uri
    objects.upload(tiny_zoo.adapters[running], [SAFETENSORS_FILE], uri)  # valid weights, not the registered ones
    service = composer(tiny_zoo, NodeAdapterCache(tmp_path / "node", registry_resolver(registry, tmp_path / "none"),
                                                  objects))

    async def scenario():
        long_row = asyncio.create_task(answer(service, job(service, running, 60)))
        await until(lambda: service.batcher.stats.steps > 0, "the long row runs")
        results = await asyncio.gather(*(answer(service, job(service, spoiled, 4)) for _ in range(3)),
                                       return_exceptions=True)
        return results, await long_row

    results, long_result = asyncio.run(scenario())
    for result in results:
        assert isinstance(result, ChecksumMismatch), result
        assert f"adapter '{spoiled}@v1' refused" in result.message
    assert long_result.completion_tokens == 60
    assert not service.engine.has_adapter(f"{spoiled}@v1")
    assert not (tmp_path / "node" / spoiled).exists()
