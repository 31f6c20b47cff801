"""The dynamic batcher, driven by a fake model step (the unit under test is the batching)."""
from __future__ import annotations

import asyncio
import threading

from services.lora.generation import GenerationRequest, GenerationResult


def fake_model(calls: list, fail: bool = False):
    def run(requests):
        calls.append(len(requests))
        if fail:
            raise RuntimeError("device lost")
        results = []
        for r in requests:
            words = [f"t{i}" for i in r.prompt_ids]
            for w in words:
                r.on_token(w)
            results.append(GenerationResult(text="".join(words), token_ids=list(r.prompt_ids), finish_reason="length",
                                            prompt_tokens=len(r.prompt_ids), completion_tokens=len(words)))
        return results
    return run


async def collect(batcher, request):
    return [item async for item in batcher.submit(request)]


def test_concurrent_requests_share_one_batch_and_stream_in_order():
    from services.serving.batcher import DynamicBatcher

    calls, batches = [], []
    batcher = DynamicBatcher(fake_model(calls), max_batch_size=8, wait_timeout_s=0.05,
                             on_batch=lambda rows, tokens, s: batches.append((rows, tokens)))

    async def main():
        return await asyncio.gather(*(collect(batcher, GenerationRequest(prompt_ids=list(range(n))))
                                      for n in (1, 2, 3)))

    outs = asyncio.run(main())
    assert calls == [3] and batches == [(3, 6)]
    for n, out in zip((1, 2, 3), outs):
        *pieces, result = out
        assert pieces == [f"t{i}" for i in range(n)] and result.text == "".join(pieces)
    assert batcher.stats.batches == 1 and batcher.stats.rows == 3
    results = [out[-1] for out in outs]
    assert all(r.batch_seconds > 0 and r.queue_seconds >= 0 for r in results)
    assert len({r.batch_seconds for r in results}) == 1  # one forward, one duration for its rows


def test_batches_are_capped_and_failures_reach_every_caller():
    from services.serving.batcher import DynamicBatcher

    calls = []
    batcher = DynamicBatcher(fake_model(calls), max_batch_size=2, wait_timeout_s=0.05)

    async def main():
        return await asyncio.gather(*(collect(batcher, GenerationRequest(prompt_ids=[1])) for _ in range(5)))

    assert len(asyncio.run(main())) == 5 and sorted(calls) == [1, 2, 2]

    broken = DynamicBatcher(fake_model([], fail=True), max_batch_size=4, wait_timeout_s=0.01)

    async def failing():
        return await asyncio.gather(*(collect(broken, GenerationRequest(prompt_ids=[1])) for _ in range(2)),
                                    return_exceptions=True)

    errors = asyncio.run(failing())
    assert all(isinstance(e, RuntimeError) and "device lost" in str(e) for e in errors)


def test_exclusive_work_runs_on_the_batch_thread():
    from services.serving.batcher import DynamicBatcher

    batcher = DynamicBatcher(lambda reqs: [], max_batch_size=1, wait_timeout_s=0)
    name = asyncio.run(batcher.run_exclusive(lambda: threading.current_thread().name))
    assert name.startswith("batch")
