"""Iteration-level (continuous) batching: requests join the running batch between steps and leave
it in the step they finish, freeing their KV slot and their adapters at once.

One step:
1. prompt chunks of the rows still reading their prompt, at most `prefill_tokens` in all, oldest
   first, in one forward (only real tokens, packed; the padding of shorter chunks is not
   computed), so a long prompt holds the decoding rows back by one chunk, never by its whole
   length (a joining row first copies the longest prefix of its prompt that a row of the same
   composition has read, services/lora/prefix_cache.py);
2. a decode forward over the rows that have read their prompt, one per contiguous range of slots
   (a row still reading its prompt inside a range feeds a placeholder at its next free position,
   which its next chunk overwrites; a long stretch of such rows, a burst's, is skipped);
3. sampling: the rows that sample greedily with nothing shaping their logits take one batched
   argmax and one host transfer; the others are drawn together, each from its own generator;
4. finished and cancelled rows leave; the last row moves into each freed slot.
The driver (engine.generate, or the serving batcher's thread) holds the engine's device_lock
around `add` and `step`, so adapter slots are never rewritten under a forward.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

import torch

from services.lora.batch_meta import LoraBatchMeta, build_batch_meta
from services.lora.decoder import real_positions
from services.lora.generation import (GenerationRequest, GenerationResult, RowSampler, TextStream,
                                      TokenLogprobs)
from services.lora.pool import AdapterPoolFull

CANCELLED = "cancelled"  # internal finish reason: the row leaves without a result
# A decode forward covers a contiguous range of slots. Rows still reading their prompt between two
# decoding rows ride along with a placeholder token when at most this many lie between them (cheaper
# than a second forward's fixed cost); a longer stretch, such as the many rows of a burst still
# queued for their prompt chunks, is skipped.
PLACEHOLDER_GAP = 4


@dataclass(eq=False)
class Row:
    request: GenerationRequest
    sampler: RowSampler
    stream: TextStream
    slot_of: dict[str, int]  # the row's adapters -> device pool slot (held until it leaves)
    admitted: float  # time.perf_counter() when it joined
    fed: int = 0  # tokens already in its KV slot
    pending: int | None = None  # sampled token not yet in the cache
    finish: str | None = None
    cancelled: bool = False  # set from any thread; the row leaves at the end of the next step
    token_lps: list[dict] | None = None
    unsent: list[dict] = field(default_factory=list)  # logprobs not streamed yet
    prompt_lps: list[dict] | None = None
    error: Exception | None = None  # set when this row alone failed (its caller hears it; the batch goes on)

    @property
    def reading_prompt(self) -> bool:
        return self.fed < len(self.request.prompt_ids)

    def result(self) -> GenerationResult:
        return GenerationResult(text=self.stream.text, token_ids=self.stream.token_ids, finish_reason=self.finish,
                                prompt_tokens=len(self.request.prompt_ids),
                                completion_tokens=len(self.stream.token_ids), logprobs=self.token_lps,
                                prompt_logprobs=self.prompt_lps)


class DecodeScheduler:
    def __init__(self, engine, *, max_rows: int, prefill_tokens: int = 512):
        if max_rows < 1 or prefill_tokens < 1:
            raise ValueError("max_rows and prefill_tokens must be at least 1")
        self.engine, self.max_rows, self.prefill_tokens = engine, max_rows, prefill_tokens
        self.cache = engine.take_cache()
        self.rows: list[Row] = []  # rows[i] lives in cache slot i
        self.logprobs = TokenLogprobs(engine.tokenizer)
        self.step_tokens = 0  # tokens sampled by the last step
        # decode forwards' metadata by (the rows of the forward, pool writes): kept while they stay the same
        self._decode_meta: dict[tuple, LoraBatchMeta] = {}

    @property
    def full(self) -> bool:
        return len(self.rows) >= self.max_rows

    def try_add(self, request: GenerationRequest) -> Row | None:
        """`add`, or None when the request's adapters fit only once running rows leave (it waits);
        AdapterPoolFull still reaches the caller when they do not fit even with no row running."""
        try:
            return self.add(request)
        except AdapterPoolFull:
            if not self.rows:
                raise
            return None

    @torch.inference_mode()  # its prefix copy writes slots a step may have grown (inference tensors)
    def add(self, request: GenerationRequest) -> Row:
        """Admit a checked request; raises AdapterPoolFull (admitting nothing) when its adapters do
        not fit the device slots the running rows leave."""
        slot_of = self.engine.pool.acquire(list(request.composition.adapters))
        try:
            # its slot exists from now on: a decode forward may skip it, and a retiring row's move may read it
            self.cache.reserve(len(self.rows) + 1, self.cache.length)
            row = Row(request, RowSampler(request, self.engine.device, self.engine.vocab_size),
                      TextStream(self.engine.tokenizer, request.stop), slot_of, time.perf_counter(),
                      token_lps=[] if request.logprobs is not None else None)
            if request.prompt_logprobs:  # every prompt position is computed: its logprobs are asked for
                row.prompt_lps = [self.logprobs.first(request.prompt_ids[0])]
            else:
                row.fed = self.engine.prefix_cache.restore(request.composition, request.prompt_ids, self.cache,
                                                           len(self.rows))
        except BaseException:  # the row never joined: its adapters must not stay held
            self.engine.pool.release(list(slot_of))
            raise
        self.rows.append(row)
        return row

    @torch.inference_mode()
    def step(self) -> list[Row]:
        """One iteration; returns the rows that left (finished or cancelled)."""
        self.step_tokens = 0
        for row in self.rows:
            if row.cancelled:
                row.finish = CANCELLED
        self._prefill()
        self._decode()
        return self._retire()

    def abort(self) -> list[Row]:
        """Drop every row (after a failed step); returns them."""
        rows, self.rows = self.rows, []
        for row in rows:
            self.engine.pool.release(list(row.slot_of))
        self._decode_meta = {}
        return rows

    # -- forwards -----------------------------------------------------------
    def _forward(self, rows: list[Row], meta: LoraBatchMeta, tokens: list[list[int]], slots: list[int],
                 starts: list[int], lengths: list[int] | None = None) -> torch.Tensor:
        """Final hidden states (n, c, hidden) of the rows in cache slots `slots` (ascending); row b's
        first lengths[b] tokens are real (None: all), the rest padding, which is not computed."""
        device, width = self.engine.device, len(tokens[0])
        real = None if lengths is None else real_positions(lengths, width, device)
        self.engine.context.meta = meta if real is None else meta.take(real // width)
        try:
            return self.engine.decoder.forward(
                self.cache, torch.tensor(tokens, device=device), slots, torch.tensor(starts, device=device),
                max(starts) + width, real)
        finally:
            self.engine.context.meta = None

    def _meta(self, rows: list[Row]) -> LoraBatchMeta:
        slot_of = {key: slot for row in rows for key, slot in row.slot_of.items()}
        return build_batch_meta([row.request.composition for row in rows], slot_of, dtype=self.engine.lora_dtype,
                                device=self.engine.device)

    def _prefill(self) -> None:
        budget, chunk = self.prefill_tokens, {}  # slot -> prompt tokens it reads this step
        for i, row in enumerate(self.rows):
            if budget == 0:
                break
            if row.reading_prompt and row.finish is None:
                chunk[i] = min(len(row.request.prompt_ids) - row.fed, budget)
                budget -= chunk[i]
        if not chunk:
            return
        run = sorted(chunk)  # one forward, whether or not the slots are contiguous
        rows = [self.rows[i] for i in run]
        width = max(chunk[i] for i in run)
        tokens = [(r.request.prompt_ids[r.fed:r.fed + chunk[i]] + [self.engine.pad_id] * width)[:width]
                  for i, r in zip(run, rows)]
        hidden = self._forward(rows, self._meta(rows), tokens, run, [r.fed for r in rows],
                               [chunk[i] for i in run])  # (n, width, hidden)
        done = []
        for j, (i, row) in enumerate(zip(run, rows)):
            if row.request.prompt_logprobs:
                read = row.request.prompt_ids[row.fed + 1:row.fed + chunk[i] + 1]  # tokens these positions predict
                row.prompt_lps += self.logprobs.span(hidden[j, :len(read)], self.engine.project, read,
                                                     row.request.logprobs or 0)
            row.fed += chunk[i]
            if not row.reading_prompt:
                done.append((row, hidden[j, chunk[i] - 1]))
                self.engine.prefix_cache.store(row.request.composition, row.request.prompt_ids, self.cache, i)
        sampling = [(row, h) for row, h in done if row.request.max_tokens > 0]
        for row, _ in done:
            if row.request.max_tokens == 0:
                row.finish = "length"
        if sampling:
            self._sample([row for row, _ in sampling],
                         self.engine.project(torch.stack([h for _, h in sampling])))  # (m, vocab)

    def _decode(self) -> None:
        ready = [i for i, row in enumerate(self.rows) if row.pending is not None and row.finish is None]
        if not ready:
            return
        metas, states = {}, []  # states: (ready rows, hidden) in slot order
        for run in bridged_runs(ready, PLACEHOLDER_GAP):
            lo, rows = run[0], self.rows[run[0]:run[-1] + 1]
            key = (tuple(id(row) for row in rows), self.engine.pool.writes)
            metas[key] = self._decode_meta.get(key) or self._meta(rows)  # rebuilt when rows or slots changed
            decoding = set(run)
            tokens = [[row.pending if i in decoding else self.engine.pad_id] for i, row in enumerate(rows, lo)]
            hidden = self._forward(rows, metas[key], tokens, list(range(lo, run[-1] + 1)),
                                   [row.fed for row in rows])  # (len(rows), 1, hidden)
            states.append(hidden[torch.tensor(run, device=self.engine.device) - lo, 0])
        self._decode_meta = metas
        rows = [self.rows[i] for i in ready]
        for row in rows:
            row.fed, row.pending = row.fed + 1, None
        self._sample(rows, self.engine.project(torch.cat(states)))  # (len(ready), vocab)

    # -- sampling and streaming ------------------------------------------------
    def _sample(self, rows: list[Row], logits: torch.Tensor) -> None:
        """logits (len(rows), vocab): one token per row."""
        plain = [j for j, row in enumerate(rows) if row.sampler.plain]
        # float32 first: the same argmax, and bfloat16's argmax on CPU took 3x the conversion plus float32's
        picked = dict(zip(plain, logits[plain].float().argmax(-1).tolist())) if plain else {}
        drawn = [j for j in range(len(rows)) if j not in picked]
        if drawn:
            picked.update(zip(drawn, RowSampler.draw_rows([rows[j].sampler for j in drawn], logits[drawn])))
        asked = [j for j, row in enumerate(rows) if row.token_lps is not None and not ends_row(row, picked[j], self.engine.eos_ids)]
        entries = dict(zip(asked, self.logprobs.entries(
            torch.log_softmax(logits[asked].float(), dim=-1), [picked[j] for j in asked],
            [rows[j].request.logprobs for j in asked]))) if asked else {}
        for j, row in enumerate(rows):
            take_token(row, picked[j], entries.get(j), self.engine.eos_ids)
        self.step_tokens += len(rows)

    def _retire(self) -> list[Row]:
        left = [i for i, row in enumerate(self.rows) if row.finish is not None]
        gone = []
        for i in reversed(left):  # from the end, so a moved row is never one still to retire
            row, last = self.rows[i], len(self.rows) - 1
            if i != last:
                self.cache.move(last, i, self.rows[last].fed)
                self.rows[i] = self.rows[last]
            self.rows.pop()
            self.engine.pool.release(list(row.slot_of))
            gone.append(row)
        return gone[::-1]

    def release_memory(self) -> None:
        """Idle: give back what a burst or a long prompt grew the cache to (the caller decides when;
        shrinking at every empty moment made each next burst zero the memory again)."""
        if not self.rows:
            self.cache = self.engine.decoder.new_cache()

    def close(self) -> None:
        """Done with this scheduler (no rows): its cache goes back to the engine for the next one."""
        self.engine.park_cache(self.cache)


def run_batch(engine, requests: list[GenerationRequest]) -> list[GenerationResult]:
    """Every request to its end through `engine.scheduler()` (either engine), rows joining as others
    leave; results in the requests' order. A row that fails alone raises its error."""
    for request in requests:
        engine.check(request)
    scheduler, waiting = engine.scheduler(), deque(enumerate(requests))
    index: dict[int, int] = {}  # id(row) -> request index
    results: list[GenerationResult | None] = [None] * len(requests)
    try:
        while waiting or scheduler.rows:
            with engine.device_lock:
                while waiting and not scheduler.full:
                    row = scheduler.try_add(waiting[0][1])
                    if row is None:
                        break
                    index[id(row)] = waiting.popleft()[0]
                for row in scheduler.step():
                    if row.error is not None:
                        raise row.error
                    results[index[id(row)]] = row.result()
    finally:
        with engine.device_lock:
            scheduler.abort()  # a failed step: release the adapters of the rows still running
            scheduler.close()
    return results


def ends_row(row: Row, token: int, eos_ids: set[int]) -> bool:
    """An end-of-sequence token that ends the row (it is no output token: no text, no logprobs)."""
    return token in eos_ids and not row.request.ignore_eos


def take_token(row: Row, token: int, entry: dict | None, eos_ids: set[int]) -> None:
    """The row's next token, whichever engine produced it: text, stop strings, length, logprobs,
    streaming. entry: the token's logprobs when the row asked for them (None for an ending EOS)."""
    request, stream = row.request, row.stream
    if ends_row(row, token, eos_ids):
        row.finish, piece = "stop", stream.flush()
    else:
        if row.token_lps is not None:
            row.token_lps.append(entry)
            row.unsent.append(entry)
        piece = stream.push(token)
        if stream.stopped:
            row.finish = "stop"
        elif len(stream.token_ids) >= request.max_tokens:
            row.finish, piece = "length", piece + stream.flush()
        else:
            row.pending = token
    emit(row, piece)


def emit(row: Row, piece: str) -> None:
    """Stream a text piece (with the logprobs not sent yet, when the row asked for them)."""
    request = row.request
    if request.on_token is not None and (piece or (row.finish and row.unsent)):
        if row.token_lps is None:
            request.on_token(piece)
        else:
            request.on_token({"text": piece, "logprobs": row.unsent})
            row.unsent = []


def bridged_runs(slots: list[int], gap: int) -> list[list[int]]:
    """Sorted slots in runs whose neighbours are at most `gap` slots apart:
    [0, 1, 3, 9] with gap 1 -> [[0, 1, 3], [9]] (slot 2 rides along in the first forward)."""
    runs: list[list[int]] = []
    for slot in slots:
        if runs and slot - runs[-1][-1] <= gap + 1:
            runs[-1].append(slot)
        else:
            runs.append([slot])
    return runs
