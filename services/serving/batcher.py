"""Continuous batching for a composer replica: concurrent requests join the engine's running batch
between decode steps and leave it when they finish.

Callers `submit` a request and iterate over its text pieces as they are produced. One worker
thread owns the engine's scheduler (the model is not re-entrant): between two steps it runs the
exclusive work callers queued (adapter loads, registry syncs), admits waiting requests while a row
slot and device slots for their adapters are free, then runs one step. A caller that goes away
(its client disconnected) cancels its row, which leaves at the end of the next step. The event
loop stays free to accept requests and stream tokens meanwhile.
"""
from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import logging
import queue
import threading
import time
from typing import AsyncIterator, Callable

from services.lora.generation import GenerationRequest, GenerationResult

log = logging.getLogger(__name__)

_DONE = object()
# Seconds without a request before the running batch's KV memory shrinks back: long enough that a
# lull between bursts does not make the next burst allocate and zero it again.
IDLE_RELEASE_S = 30.0


@dataclasses.dataclass
class BatchStats:
    steps: int = 0
    rows: int = 0  # requests admitted
    row_steps: int = 0  # rows summed over steps: row_steps / steps is the mean running batch
    last_batch_size: int = 0  # rows in the last step
    busy_seconds: float = 0.0
    cancelled: int = 0  # rows that left because their caller had gone (a client disconnect)


@dataclasses.dataclass(eq=False)
class _Entry:
    request: GenerationRequest
    deliver: Callable  # thread-safe: puts a piece, a result, an exception or _DONE on the caller's queue
    enqueued: float
    row: object = None  # the scheduler's Row once admitted
    cancelled: bool = False


class ContinuousBatcher:
    def __init__(self, engine, *, prepare: Callable[[GenerationRequest], None] | None = None,
                 on_batch: Callable[[int, int, float], None] | None = None):
        """engine: a CompositionEngine (its `scheduler()`, `device_lock`). prepare(request) runs on
        the worker thread before a request joins (adapter loads); what it raises fails that request
        alone. It may return futures the request must wait for (adapter fetches running on other
        threads): the request is set aside, the batch goes on without it, and it comes back when they
        are done (or fails with the first one's exception). on_batch(rows, new_tokens, seconds) is
        called after every step (metrics)."""
        self.engine, self.prepare, self.on_batch = engine, prepare, on_batch
        self.stats = BatchStats()
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()  # _Entry or (fn, args, Future)
        self._waiting: collections.deque[_Entry] = collections.deque()
        self._running: dict[int, _Entry] = {}  # id(row) -> entry
        self._parked: set[_Entry] = set()  # waiting for adapter fetches off this thread
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()

    @property
    def queue_len(self) -> int:
        """Requests waiting plus rows running now (the autoscaling and routing signal)."""
        return self._inbox.qsize() + len(self._waiting) + len(self._parked) + len(self._running)

    def _ensure_thread(self) -> None:
        with self._start_lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._serve_forever, name="batch", daemon=True)
                self._thread.start()

    async def run_exclusive(self, fn: Callable, *args):
        """Run fn on the batch thread between two steps (work that must not overlap a forward)."""
        self._ensure_thread()
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._inbox.put((fn, args, future))
        return await asyncio.wrap_future(future)

    async def submit(self, request: GenerationRequest, *,
                     stream: bool = True) -> AsyncIterator[str | dict | GenerationResult]:
        """Yields text pieces as they are generated (unless stream is False), then the GenerationResult."""
        self._ensure_thread()
        loop = asyncio.get_running_loop()
        out: asyncio.Queue = asyncio.Queue()

        def deliver(item) -> None:
            loop.call_soon_threadsafe(out.put_nowait, item)

        entry = _Entry(dataclasses.replace(request, on_token=deliver if stream else None), deliver,
                       time.perf_counter())
        self._inbox.put(entry)
        try:
            while True:
                item = await out.get()
                if item is _DONE:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            entry.cancelled = True  # a no-op once done; otherwise the caller left: free the row
            if entry.row is not None:
                entry.row.cancelled = True

    # -- the worker thread ------------------------------------------------------
    def _serve_forever(self) -> None:
        scheduler = self.engine.scheduler()
        while True:
            try:
                idle = not self._running and not self._waiting
                item = None
                if idle:
                    try:
                        item = self._inbox.get(timeout=IDLE_RELEASE_S)
                    except queue.Empty:
                        scheduler.release_memory()
                        item = self._inbox.get()
                self._take(item)
                while not self._inbox.empty():
                    self._take(self._inbox.get_nowait())
                self._admit(scheduler)
                if scheduler.rows:
                    self._step(scheduler)
            except Exception:  # the thread must outlive any one fault: every later request depends on it
                log.exception("batch thread: unexpected fault; serving goes on")

    def _take(self, item) -> None:
        if item is None:
            return
        if isinstance(item, _Entry):
            self._waiting.append(item)
            return
        fn, args, future = item
        if future.set_running_or_notify_cancel():
            try:
                future.set_result(fn(*args))
            except StopIteration as err:  # a Future cannot carry StopIteration: its awaiter would hang
                future.set_exception(RuntimeError(f"exclusive work failed: StopIteration {err}"))
            except BaseException as err:  # noqa: BLE001 - handed to the awaiting caller
                future.set_exception(err)

    def _admit(self, scheduler) -> None:
        while self._waiting and not scheduler.full:
            entry = self._waiting[0]
            if entry.cancelled:
                self._waiting.popleft()
                continue
            try:
                pending = self.prepare(entry.request) if self.prepare is not None else None
                if pending:
                    self._park(self._waiting.popleft(), pending)
                    continue
                with self.engine.device_lock:
                    entry.row = scheduler.try_add(entry.request)
            except Exception as err:  # this request alone cannot run; its caller hears why
                self._fail(self._waiting.popleft(), err)
                continue
            if entry.row is None:
                return  # its adapters fit once running rows leave
            self._waiting.popleft()
            self._running[id(entry.row)] = entry
            self.stats.rows += 1

    def _step(self, scheduler) -> None:
        started, rows = time.perf_counter(), len(scheduler.rows)
        try:
            with self.engine.device_lock:
                finished = scheduler.step()
        except Exception as err:  # the step failed: every running row's caller hears why
            log.exception("decode step over %d rows failed", rows)
            with self.engine.device_lock:
                for row in scheduler.abort():
                    self._fail(self._running.pop(id(row)), err)
            return
        now = time.perf_counter()
        self.stats.steps += 1
        self.stats.row_steps += rows
        self.stats.last_batch_size = rows
        self.stats.busy_seconds += now - started
        if self.on_batch is not None:
            self.on_batch(rows, scheduler.step_tokens, now - started)
        for row in finished:
            entry = self._running.pop(id(row))
            if row.error is not None:
                self._fail(entry, row.error)
                continue
            if row.cancelled:
                self.stats.cancelled += 1
            else:
                entry.deliver(dataclasses.replace(row.result(), queue_seconds=row.admitted - entry.enqueued,
                                                  batch_seconds=now - row.admitted))
            entry.deliver(_DONE)

    def _park(self, entry: _Entry, pending: list[concurrent.futures.Future]) -> None:
        """Set `entry` aside until every future in `pending` is done; then `_unpark` runs on this thread."""
        self._parked.add(entry)
        left, lock = [len(pending)], threading.Lock()

        def one_done(_future) -> None:  # on the fetching thread
            with lock:
                left[0] -= 1
                last = left[0] == 0
            if last:
                self._inbox.put((self._unpark, (entry, pending), concurrent.futures.Future()))

        for future in pending:
            future.add_done_callback(one_done)

    def _unpark(self, entry: _Entry, pending: list[concurrent.futures.Future]) -> None:
        self._parked.discard(entry)
        failed = next((f.exception() for f in pending if f.exception() is not None), None)
        if failed is not None:
            self._fail(entry, failed)
        else:
            self._waiting.appendleft(entry)  # prepared again at once: installs what was fetched

    @staticmethod
    def _fail(entry: _Entry, err: Exception) -> None:
        entry.deliver(err)
        entry.deliver(_DONE)
