"""What a composer replica does, without Ray: get adapter versions' files on this node (the node
cache fetches and verifies them off the batch thread), load them into the engine's pool on first
use, tokenize, and feed the continuous batcher."""
from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import functools
import logging
import tempfile
import threading
from pathlib import Path
from typing import AsyncIterator

from pydantic import Field

from services.composition import AdapterKey
from services.evaluation.generation import chat_prompt_ids
from services.lora.adapter_files import AdapterValidationError
from services.lora.compatibility import CardTokens, GainTable, measure_gains
from services.lora.generation import GenerationRequest, GenerationResult
from services.lora.structured import JsonGrammars
from services.schemas import ChatMessage, CompositionPlan, Strict
from services.registry.node_cache import NodeAdapterCache, folder_resolver
from services.serving.batcher import ContinuousBatcher
from services.errors import InvalidRequest, Unavailable

log = logging.getLogger(__name__)


def store_fault(key: str, err: Exception) -> Unavailable:
    """The files of a registered version are gone or unreadable; the caller is told which adapter,
    the log gets the details (store paths stay out of the answer)."""
    log.warning("adapter %s cannot be loaded from the adapter store: %s", key, err)
    return Unavailable(f"adapter '{key}' cannot be loaded from the adapter store (files missing or unreadable)")


class ComposeJob(Strict):
    """One prompt with its composition plan and sampling parameters (ingress -> composer)."""

    request_id: str
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    plan: CompositionPlan = Field(default_factory=CompositionPlan)
    max_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    stop: list[str] = Field(default_factory=list)
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = Field(default_factory=dict)
    logprobs: int | None = None  # alternatives per token; None: no logprobs
    prompt_logprobs: bool = False
    response_format: dict | None = None  # ResponseFormat.wire(): constrained decoding
    stream: bool = True  # False: the result alone, without a piece per token on the way


class AdapterLoads:
    """Adapter versions being fetched (NodeAdapterCache.local_folder) and read into CPU tensors on
    worker threads, so a slow network read never stalls the batch thread. One load per key at a
    time; a failed load is forgotten at once, so the next request for that key tries again."""

    def __init__(self, cache: NodeAdapterCache, read, workers: int = 2):
        self.cache, self.read = cache, read  # read(key, folder) -> LoraAdapterWeights (the engine's)
        self._threads = concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="adapter-load")
        self._pending: dict[str, concurrent.futures.Future] = {}
        self._lock = threading.RLock()  # RLock: a done callback may run inside start()

    def start(self, key: str) -> concurrent.futures.Future:
        """The load of `key` in flight (or done and not yet taken); starts one if there is none."""
        with self._lock:
            future = self._pending.get(key)
            if future is None:
                future = self._pending[key] = self._threads.submit(self._load, key)
                future.add_done_callback(lambda f: f.exception() is not None and self._drop(key, f))
            return future

    def take(self, key: str, future: concurrent.futures.Future):
        """(folder, weights) of a finished load; raises what the load raised."""
        self._drop(key, future)
        return future.result()

    def _drop(self, key: str, future: concurrent.futures.Future) -> None:
        with self._lock:
            if self._pending.get(key) is future:
                del self._pending[key]

    def _load(self, key: str):
        folder = self.cache.local_folder(key)  # fetched and checked against the registry's checksum
        try:
            return folder, self.read(key, folder)
        except AdapterValidationError as err:
            raise store_fault(key, err) from err


class ComposerService:
    def __init__(self, engine, adapters: NodeAdapterCache | str | Path, *, max_prompt_tokens: int, on_batch=None):
        """engine: a CompositionEngine or a VllmEngine (services/lora/vllm_engine.py), the same calls; its max_batch_rows bounds the running batch. adapters: the
        node's NodeAdapterCache, or a folder in the store layout <root>/<name>/<version> read as it
        is (tools and tests without a registry)."""
        self.engine = engine
        if not isinstance(adapters, NodeAdapterCache):
            adapters = NodeAdapterCache(tempfile.gettempdir(), folder_resolver(adapters))
        self.adapters = adapters
        self.loads = AdapterLoads(adapters, engine.read)
        self.max_prompt_tokens = max_prompt_tokens
        self.batcher = ContinuousBatcher(engine, prepare=self._prepare, on_batch=on_batch)

    @functools.cached_property
    def grammars(self) -> JsonGrammars:
        """Made on the first request with a response_format (wrapping the tokenizer takes about 1 s)."""
        return JsonGrammars(self.engine.tokenizer, self.engine.vocab_size)

    async def fetch(self, keys) -> None:
        """Have every key's files fetched and read (off the batch thread); raises the first failure."""
        missing = [k for k in dict.fromkeys(keys) if not self.engine.has_adapter(k)]
        await asyncio.gather(*(asyncio.wrap_future(self.loads.start(k)) for k in missing))

    def install(self, key: str) -> concurrent.futures.Future | None:
        """On the batch thread: put `key` in the engine's pool if its load is done (None once it is
        there; raises what the load raised), else the load's future to wait for."""
        if self.engine.has_adapter(key):
            return None
        future = self.loads.start(key)
        if not future.done():
            return future
        # The registry validated these files when the version was added: missing, unreadable or
        # altered files now are a server-side fault (503), not a bad request.
        folder, weights = self.loads.take(key, future)
        self.engine.install_adapter(key, weights, folder)
        log.info("loaded adapter %s from %s", key, folder)
        return None

    def ensure_loaded(self, keys: list[str]) -> None:
        """On the batch thread, after `fetch(keys)`: install each key (raises if one is not ready)."""
        for key in keys:
            if self.install(key) is not None:
                raise Unavailable(f"adapter '{key}' is still being fetched; retry shortly")

    def _prepare(self, request: GenerationRequest) -> list[concurrent.futures.Future] | None:
        """Before a request joins the running batch (on the batch thread): install its adapters (a
        registry sync may have dropped a version since the request was planned) and re-read any
        whose CPU copy was let go. Adapters still being fetched: their futures (the batcher sets the
        request aside meanwhile). An adapter that cannot be had fails this request alone, with the
        reason; the running rows go on."""
        pending = []
        for key in dict.fromkeys(request.composition.adapters):
            future = self.install(key)
            if future is not None:
                pending.append(future)
            else:
                self.ensure_readable(key)
        return pending or None

    def ensure_readable(self, key: str) -> None:
        """Re-read now, from the store, an adapter that is neither on the device nor in the CPU
        tier (the forward would otherwise do it and fail the whole batch)."""
        try:
            self.engine.ensure_in_memory(key)
        except (AdapterValidationError, OSError) as err:
            raise store_fault(key, err) from err

    async def measure_gains(self, jobs: list[tuple[str, list[str]]],
                            cards: dict[str, list[tuple[str, str]]]) -> list[GainTable]:
        """The gain table of each (adapter, neighbours) job of name@version keys on the adapter's card
        samples (inputs, targets), on the batch thread between batches (services/lora/compatibility.py)."""
        await self.fetch(sorted({key for adapter, neighbours in jobs for key in (adapter, *neighbours)}))
        return await self.batcher.run_exclusive(self._measure_gains, jobs, cards)

    def _measure_gains(self, jobs, cards) -> list[GainTable]:
        if not self.engine.scores_compatibility:
            raise Unavailable("compatibility gains need the native engine's logits; this composer runs "
                              "composition.engine=vllm (measure on a native composer, or set the policy's mode)")
        self.ensure_loaded(sorted({key for adapter, neighbours in jobs for key in (adapter, *neighbours)}))
        tok = self.engine.tokenizer
        out = []
        for adapter, neighbours in jobs:
            samples = cards[adapter]
            card = CardTokens([chat_prompt_ids(tok, inputs) for inputs, _ in samples],
                              [tok(targets, add_special_tokens=False)["input_ids"] for _, targets in samples])
            out.append(measure_gains(self.engine, adapter, neighbours, card))
        return out

    def tokenize(self, job: ComposeJob) -> list[int]:
        tok = self.engine.tokenizer
        if job.messages is not None:
            ids = tok.apply_chat_template([m.template_turn() for m in job.messages], add_generation_prompt=True,
                                          tokenize=True, return_dict=False)
        else:
            ids = tok(job.prompt, add_special_tokens=False)["input_ids"]
        if len(ids) > self.max_prompt_tokens:
            raise InvalidRequest(f"prompt has {len(ids)} tokens; the limit is {self.max_prompt_tokens}", param="prompt")
        return list(ids)

    def to_request(self, job: ComposeJob) -> GenerationRequest:
        """The row for the batcher, checked here: a bad row must not fail the batch it would join."""
        request = GenerationRequest(
            prompt_ids=self.tokenize(job),
            composition=job.plan.to_composition(),
            max_tokens=job.max_tokens,
            temperature=job.temperature,
            top_p=job.top_p,
            stop=list(job.stop),
            seed=job.seed,
            presence_penalty=job.presence_penalty,
            frequency_penalty=job.frequency_penalty,
            logit_bias=dict(job.logit_bias),
            logprobs=job.logprobs,
            prompt_logprobs=job.prompt_logprobs,
            constraint=self.grammars.constraint(job.response_format)
            if job.response_format and self.engine.own_grammars else None,
            response_format=job.response_format,
        )
        self.engine.check(request)
        return request

    async def generate(self, job: ComposeJob) -> AsyncIterator[str | GenerationResult]:
        """Text pieces (when the job streams), then the result (the plan's adapters are loaded before
        the row joins)."""
        async for item in self.batcher.submit(self.to_request(job), stream=job.stream):
            yield item

    async def follow_catalog(self, catalog) -> tuple[list[str], list[str]]:
        """sync_with_catalog between two steps (never under a forward), pinned versions fetched first."""
        try:
            await self.fetch(sorted(pinned_keys(catalog)))
        except Unavailable as err:
            log.warning("cannot pin: %s", err.message)
        return await self.batcher.run_exclusive(self.sync_with_catalog, catalog)

    def sync_with_catalog(self, catalog) -> tuple[list[str], list[str]]:
        """Drop loaded versions the registry no longer serves (neither active nor canary) and
        pin or unpin by the registry's flag; runs between steps. Returns (dropped keys, stale keys
        kept because running rows still use them: a later sync drops them). A request still naming
        a dropped version reloads it from the store."""
        live, pinned = set(), pinned_keys(catalog)
        for rec in catalog.records.values():
            if rec.active_version is not None:
                live.add(str(AdapterKey(rec.name, rec.active_version)))
            if rec.canary is not None:
                live.add(str(AdapterKey(rec.name, rec.canary.version)))
        stale = [k for k in self.engine.loaded_adapters() if k not in live]
        busy = self.engine.adapters_in_use()
        dropped = [k for k in stale if k not in busy]
        for key in dropped:
            self.engine.unload_adapter(key)
            self.adapters.drop(key)  # its fetched copy too: a node's cache holds what is served
        for key in sorted(pinned):  # pinned adapters are resident before anyone asks
            try:
                self.ensure_loaded([key])
            except Unavailable as err:
                log.warning("cannot pin: %s", err.message)
        for key in self.engine.loaded_adapters():
            if key in pinned:
                self.engine.pin(key)
            else:
                self.engine.unpin(key)
        return dropped, [k for k in stale if k in busy]

    def resident(self) -> list[str]:
        return self.engine.resident_adapters()

    def pool_stats(self) -> dict:
        """The engine's pool counters and this node's fetches (fetches, fetch_seconds, fetch_bytes, refused)."""
        return {**self.engine.pool_stats(), **self.adapters.stats()}

    @property
    def queue_len(self) -> int:
        return self.batcher.queue_len

    def batch_stats(self) -> dict:
        return dataclasses.asdict(self.batcher.stats)


def pinned_keys(catalog) -> set[str]:
    """name@version of every pinned adapter's active version."""
    return {str(AdapterKey(rec.name, rec.active_version)) for rec in catalog.records.values()
            if rec.pinned and rec.active_version is not None}
