"""Dynamic batching: concurrent generation requests become one heterogeneous batch.

Callers `submit` a request and iterate over its text pieces as they are produced; a
single worker thread runs one batch at a time (the model is not re-entrant), so the
event loop stays free to accept requests and stream tokens meanwhile.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import AsyncIterator, Callable

from services.lora.generation import GenerationRequest, GenerationResult

log = logging.getLogger(__name__)

_DONE = object()


@dataclasses.dataclass
class BatchStats:
    batches: int = 0
    rows: int = 0
    last_batch_size: int = 0
    busy_seconds: float = 0.0


class DynamicBatcher:
    def __init__(self, run_batch: Callable[[list[GenerationRequest]], list[GenerationResult | BaseException]],
                 *, max_batch_size: int, wait_timeout_s: float,
                 on_batch: Callable[[int, int, float], None] | None = None):
        """run_batch returns one result per request, or an exception for a row that failed alone.
        on_batch(rows, new_tokens, seconds) is called after every successful batch (metrics)."""
        self.run_batch = run_batch
        self.on_batch = on_batch
        self.max_batch_size = max_batch_size
        self.wait_timeout_s = wait_timeout_s
        self.stats = BatchStats()
        self._pending: asyncio.Queue | None = None
        self._running_rows = 0
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="batch")
        self._loop_task: asyncio.Task | None = None

    @property
    def queue_len(self) -> int:
        """Requests waiting plus rows running now (the autoscaling and routing signal)."""
        return (self._pending.qsize() if self._pending else 0) + self._running_rows

    async def run_exclusive(self, fn: Callable, *args):
        """Run fn on the batch thread, between batches (for work that must not overlap a forward)."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def submit(self, request: GenerationRequest) -> AsyncIterator[str | GenerationResult]:
        """Yields text pieces as they are generated, then the GenerationResult."""
        if self._loop_task is None:
            self._pending = asyncio.Queue()
            self._loop_task = asyncio.get_running_loop().create_task(self._serve_forever())
        out: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        request = dataclasses.replace(
            request, on_token=lambda piece: loop.call_soon_threadsafe(out.put_nowait, piece)
        )
        await self._pending.put((request, out, time.perf_counter()))
        while True:
            item = await out.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    async def _serve_forever(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self._pending.get()]
            deadline = loop.time() + self.wait_timeout_s
            while len(batch) < self.max_batch_size:
                remaining = deadline - loop.time()
                if remaining <= 0 and self._pending.empty():
                    break
                try:
                    batch.append(await asyncio.wait_for(self._pending.get(), max(remaining, 0)))
                except asyncio.TimeoutError:
                    break
            await self._run(batch, loop)

    def _call_run_batch(self, requests: list[GenerationRequest]) -> list:
        try:
            return self.run_batch(requests)
        except StopIteration as err:  # a Future cannot carry StopIteration: the batch would never finish
            raise RuntimeError(f"batch failed: StopIteration {err}") from err

    async def _run(self, batch: list, loop: asyncio.AbstractEventLoop) -> None:
        requests = [req for req, _, _ in batch]
        self._running_rows = len(batch)
        started = time.perf_counter()
        try:
            results = await loop.run_in_executor(self._executor, self._call_run_batch, requests)
            seconds = time.perf_counter() - started
            for (_, out, enqueued), result in zip(batch, results):
                if isinstance(result, BaseException):  # this row alone failed; its caller hears why
                    out.put_nowait(result)
                    continue
                out.put_nowait(dataclasses.replace(result, queue_seconds=started - enqueued, batch_seconds=seconds))
            if self.on_batch is not None:
                self.on_batch(len(batch), sum(r.completion_tokens for r in results if not isinstance(r, BaseException)),
                              seconds)
        except Exception as err:  # the whole batch failed: every caller hears why
            log.exception("batch of %d failed", len(batch))
            for _, out, _ in batch:
                out.put_nowait(err)
        finally:
            self._running_rows = 0
            self.stats.batches += 1
            self.stats.rows += len(batch)
            self.stats.last_batch_size = len(batch)
            self.stats.busy_seconds += time.perf_counter() - started
            for _, out, _ in batch:
                out.put_nowait(_DONE)
