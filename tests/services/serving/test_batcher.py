"""The continuous batcher, driven by a fake engine whose rows emit one token per step (the unit
under test is the joining, leaving, streaming and failure handling, not the model)."""
from __future__ import annotations

import asyncio
import threading
import time

import pytest

from services.lora.generation import GenerationRequest, GenerationResult
from services.serving.batcher import ContinuousBatcher


class FakeRow:
    def __init__(self, request):
        self.request, self.admitted, self.cancelled, self.emitted = request, time.perf_counter(), False, []
        self.error = None  # a row that failed alone carries its error (none here)

    def result(self):
        return GenerationResult(text="".join(self.emitted), token_ids=list(self.request.prompt_ids),
                                finish_reason="length", prompt_tokens=len(self.request.prompt_ids),
                                completion_tokens=len(self.emitted))


class FakeScheduler:
    """Row r emits "t<id>" for each of its prompt ids, one per step, then leaves."""

    def __init__(self, engine):
        self.engine, self.rows, self.step_tokens = engine, [], 0

    @property
    def full(self):
        return len(self.rows) >= self.engine.max_rows

    def try_add(self, request):
        if "wide" in request.composition.adapters and self.rows:
            return None  # no free device slot until the running rows leave
        row = FakeRow(request)
        self.rows.append(row)
        return row

    def step(self):
        self.engine.step_sizes.append(len(self.rows))
        if self.engine.fail_next:
            self.engine.fail_next = False
            raise RuntimeError("device lost")
        for row in self.rows:
            if not row.cancelled:
                piece = f"t{row.request.prompt_ids[len(row.emitted)]}"
                row.emitted.append(piece)
                if row.request.on_token is not None:  # None: the caller wants the result alone
                    row.request.on_token(piece)
        self.step_tokens = len(self.rows)
        gone = [r for r in self.rows if r.cancelled or len(r.emitted) == len(r.request.prompt_ids)]
        self.rows = [r for r in self.rows if r not in gone]
        time.sleep(0.01)  # a step takes time, so concurrent callers meet in the running batch
        return gone

    def abort(self):
        rows, self.rows = self.rows, []
        return rows


class FakeEngine:
    def __init__(self, max_rows=8):
        self.max_rows, self.device_lock, self.step_sizes, self.fail_next = max_rows, threading.RLock(), [], False

    def scheduler(self):
        return FakeScheduler(self)


async def collect(batcher, request, stream=True):
    return [item async for item in batcher.submit(request, stream=stream)]


def test_requests_join_the_running_batch_and_leave_when_done():
    """A short request sent while a long one runs joins it and finishes first; each streams its own
    pieces in order and its result carries queue and run times."""
    engine, seen = FakeEngine(), []
    batcher = ContinuousBatcher(engine, on_batch=lambda rows, tokens, s: seen.append((rows, tokens)))

    async def main():
        long = asyncio.ensure_future(collect(batcher, GenerationRequest(prompt_ids=list(range(30)))))
        await asyncio.sleep(0.05)  # the long row is decoding by now
        short = await collect(batcher, GenerationRequest(prompt_ids=[7, 8]))
        assert not long.done()  # the short one left while the long one runs on
        return await long, short

    long, short = asyncio.run(main())
    assert long[:-1] == [f"t{i}" for i in range(30)] and long[-1].text == "".join(long[:-1])
    assert short[:-1] == ["t7", "t8"]
    assert max(engine.step_sizes) == 2 and batcher.stats.rows == 2
    assert batcher.stats.row_steps == sum(engine.step_sizes) and all(rows == tokens for rows, tokens in seen)
    assert short[-1].batch_seconds > 0 and short[-1].queue_seconds >= 0


def test_a_caller_that_does_not_stream_gets_the_result_alone():
    batcher = ContinuousBatcher(FakeEngine())
    [result] = asyncio.run(collect(batcher, GenerationRequest(prompt_ids=[3, 4, 5]), stream=False))
    assert isinstance(result, GenerationResult) and result.text == "t3t4t5"


def test_running_rows_are_capped_and_a_failed_step_reaches_every_running_caller():
    engine = FakeEngine(max_rows=2)
    batcher = ContinuousBatcher(engine)

    async def main(n):
        return await asyncio.gather(*(collect(batcher, GenerationRequest(prompt_ids=[1, 2])) for _ in range(n)),
                                    return_exceptions=True)

    assert all(out[-1].text == "t1t2" for out in asyncio.run(main(5)))
    assert max(engine.step_sizes) == 2
    engine.fail_next = True
    errors = asyncio.run(main(2))
    assert any(isinstance(e, RuntimeError) and "device lost" in str(e) for e in errors)
    assert all(out[-1].text == "t1t2" for out in asyncio.run(main(3)))  # the batcher serves on


def test_a_request_that_cannot_be_prepared_fails_alone():
    def prepare(request):
        if request.prompt_ids == [0]:
            raise ValueError("adapter files are gone")

    batcher = ContinuousBatcher(FakeEngine(), prepare=prepare)

    async def main():
        return await asyncio.gather(collect(batcher, GenerationRequest(prompt_ids=[0])),
                                    collect(batcher, GenerationRequest(prompt_ids=[3])), return_exceptions=True)

    bad, good = asyncio.run(main())
    assert isinstance(bad, ValueError) and good[-1].text == "t3"


def test_adapters_that_do_not_fit_wait_for_running_rows_then_run():
    from services.composition import Composition

    engine = FakeEngine()
    batcher = ContinuousBatcher(engine)

    async def main():
        first = asyncio.ensure_future(collect(batcher, GenerationRequest(prompt_ids=[1, 2, 3])))
        await asyncio.sleep(0.02)
        wide = await collect(batcher, GenerationRequest(prompt_ids=[4], composition=Composition.single("wide")))
        return await first, wide

    first, wide = asyncio.run(main())
    assert first[-1].text == "t1t2t3" and wide[-1].text == "t4"
    assert max(engine.step_sizes) == 1  # the wide row ran only once the first had left


def test_a_caller_that_goes_away_frees_its_row():
    engine = FakeEngine()
    batcher = ContinuousBatcher(engine)

    async def main():
        stream = batcher.submit(GenerationRequest(prompt_ids=list(range(100))))
        assert await stream.__anext__() == "t0"
        await stream.aclose()  # the client disconnected
        for _ in range(100):
            if batcher.queue_len == 0:
                break
            await asyncio.sleep(0.01)

    asyncio.run(main())
    assert batcher.queue_len == 0 and len(engine.step_sizes) < 10  # left long before its 100 tokens
    assert batcher.stats.cancelled == 1


def test_exclusive_work_runs_on_the_batch_thread_and_stop_iteration_is_an_error():
    batcher = ContinuousBatcher(FakeEngine())
    name = asyncio.run(batcher.run_exclusive(lambda: threading.current_thread().name))
    assert name == "batch"

    def stops():
        raise StopIteration("empty")

    with pytest.raises(RuntimeError, match="StopIteration"):
        asyncio.run(batcher.run_exclusive(stops))
