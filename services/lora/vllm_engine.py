"""The composer's second engine: vLLM, in a process of its own beside the replica.

vLLM pins its own torch and transformers, so it cannot be imported here: `VllmEngine` starts
services/lora/vllm_driver.py with vLLM's python (services/lora/vllm_env.py) and speaks to it over
one loopback connection. It offers what the serving batcher, streaming, cancellation, placement
and routing use of the native engine (`scheduler()`, `device_lock`, the adapter calls), so none
of them knows which engine runs:

- every row is ONE LoRA request: selection sends the adapter's own folder; mixture and fusion send
  a composite adapter built into the bounded, content-addressed folder cache
  (services/lora/composite.py). A LoRA name is an adapter version (name@version) or a composite's
  content address, and a name never changes content: a new version is a new name.
- tokens come back as ids; text, stop strings, logprobs and streaming pieces are made here by the
  same code as the native engine's (services/lora/scheduler.py `take_token`).
- a row whose caller left is aborted in vLLM at the next step.
"""
from __future__ import annotations

import itertools
import json
import logging
import os
import queue
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from services.composition import Composition, CompositionError
from services.errors import InvalidRequest, Unavailable
from services.lora.adapter_files import LoraAdapterWeights, check_adapter_name, read_adapter
from services.lora.composite import CompositeCache, composite_rank
from services.lora.generation import GenerationRequest, GenerationResult, TextStream, TokenLogprobs, check_request
from services.lora.sampling import GREEDY_BELOW
from services.lora.scheduler import CANCELLED, Row, emit, run_batch, take_token
from services.lora.structured import schema_of

log = logging.getLogger(__name__)

DRIVER = Path(__file__).with_name("vllm_driver.py")
# A step waits at most this long for the driver's next tokens, so that waiting requests join promptly.
STEP_WAIT_S = 0.02


class VllmEngineError(Unavailable):
    """The vLLM process failed or went away."""


@dataclass(frozen=True)
class VllmSettings:
    """What the vLLM process is started with (from composition.vllm and the shared composition fields)."""

    python: Path
    model: Path
    dtype: str  # "float32" | "bfloat16" | "float16"
    device: str  # "cpu" | "cuda"
    max_batch_rows: int  # max_num_seqs
    max_model_len: int
    max_loras: int
    max_cpu_loras: int
    max_lora_rank: int
    threads: int  # CPU: OpenMP threads bound to the first `threads` CPUs this process may use
    kv_cache_gib: float  # CPU: VLLM_CPU_KVCACHE_SPACE
    gpu_memory_utilization: float
    startup_timeout_s: float
    log_path: Path

    def engine_args(self) -> dict:
        args = {"model": str(self.model), "dtype": self.dtype, "max_model_len": self.max_model_len,
                "max_num_seqs": self.max_batch_rows, "seed": 0, "enable_lora": True,
                "max_lora_rank": self.max_lora_rank, "max_loras": self.max_loras, "max_cpu_loras": self.max_cpu_loras}
        if self.device != "cpu":
            args["gpu_memory_utilization"] = self.gpu_memory_utilization
        return args

    def env(self) -> dict:
        env = {"VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1"}
        if self.device == "cpu":
            cpus = sorted(os.sched_getaffinity(0))[:self.threads]
            env.update(VLLM_CPU_OMP_THREADS_BIND=",".join(map(str, cpus)), VLLM_CPU_KVCACHE_SPACE=f"{self.kv_cache_gib:g}")
        return env


class VllmProcess:
    """The driver process and the connection to it; a reader thread puts every message it sends on `events`."""

    def __init__(self, settings: VllmSettings):
        self.settings = settings
        self.events: queue.SimpleQueue = queue.SimpleQueue()
        self._send_lock = threading.Lock()
        config = {"engine_args": settings.engine_args(), "env": settings.env()}
        settings.log_path.parent.mkdir(parents=True, exist_ok=True)
        handle, config_path = tempfile.mkstemp(prefix="vllm-driver-", suffix=".json")
        with os.fdopen(handle, "w") as out:
            json.dump(config, out)
        env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}
        log.info("starting vLLM (%s) for %s; its log is %s", settings.python, settings.model, settings.log_path)
        self._log = settings.log_path.open("a")
        self.sock = None
        # -I: the driver sees neither the project nor its folder
        self.proc = subprocess.Popen([str(settings.python), "-I", str(DRIVER), config_path],
                                     stdin=subprocess.DEVNULL, start_new_session=True,
                                     stdout=subprocess.PIPE, stderr=self._log, env=env, text=True)
        self.sock = self._connect(settings.startup_timeout_s)
        os.unlink(config_path)
        self._reader = threading.Thread(target=self._read, name="vllm-reader", daemon=True)
        self._reader.start()

    def _connect(self, timeout: float) -> socket.socket:
        started, port = time.monotonic(), None
        ready: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=self._read_stdout, args=(ready,), daemon=True).start()
        try:
            line = ready.get(timeout=timeout)
        except queue.Empty:
            line = ""
        if line.startswith("READY "):
            port = int(line.split()[1])
        if port is None:
            self.close()
            raise VllmEngineError(f"vLLM did not start within {timeout:g} s (exit code {self.proc.poll()}); "
                                  f"its log is {self.settings.log_path}")
        log.info("vLLM ready on 127.0.0.1:%d after %.1f s", port, time.monotonic() - started)
        return socket.create_connection(("127.0.0.1", port))

    def _read_stdout(self, ready: queue.SimpleQueue) -> None:
        """vLLM logs on stdout: every line goes to the log; the driver's READY line also to `ready`."""
        for line in self.proc.stdout:
            if line.startswith("READY "):
                ready.put(line)
            self._log.write(line)
            self._log.flush()
        ready.put("")

    def _read(self) -> None:
        with self.sock.makefile("r") as lines:
            for line in lines:
                self.events.put(json.loads(line))
        self.events.put({"closed": True})

    def send(self, message: dict) -> None:
        data = (json.dumps(message) + "\n").encode()
        try:
            with self._send_lock:
                self.sock.sendall(data)
        except OSError as err:
            raise VllmEngineError(f"the vLLM process is gone ({err}); its log is {self.settings.log_path}") from err

    def close(self) -> None:
        """Stop the driver and every process vLLM started (they share the driver's process group:
        vLLM's engine-core processes outlived a driver that exited on its own)."""
        if self.sock is not None:
            self.sock.close()  # the driver shuts vLLM down and exits when its connection closes
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
        self._log.close()


def vllm_params(request: GenerationRequest) -> dict:
    """The request's sampling as vLLM's SamplingParams fields (the driver builds the object)."""
    params = {
        "temperature": 0.0 if request.temperature < GREEDY_BELOW else request.temperature,
        "top_p": request.top_p,
        "seed": request.seed,
        # max_tokens 0 (echo with logprobs): vLLM needs one token; the row ends before taking it
        "max_tokens": max(request.max_tokens, 1),
        "ignore_eos": request.ignore_eos,
        "presence_penalty": request.presence_penalty,
        "frequency_penalty": request.frequency_penalty,
        "logit_bias": {str(t): v for t, v in request.logit_bias.items()} or None,
        "logprobs": request.logprobs,
        "prompt_logprobs": (request.logprobs or 0) if request.prompt_logprobs else None,
        "stop": list(request.stop) or None,  # vLLM stops too; the text is cut here, as natively
        "detokenize": bool(request.stop),  # vLLM's text is only needed to find stop strings
    }
    schema = schema_of(request.response_format) if request.response_format else None
    if schema is not None:  # compact JSON, as the native grammar (services/lora/structured.py)
        params["structured_outputs"] = {"json": schema, "disable_any_whitespace": True}
    return params


class VllmEngine:
    """See the module docstring. One driver thread (the batcher's) calls `scheduler()` and the
    adapter methods; `device_lock` exists because the batcher takes it around admissions and steps."""

    own_grammars = False  # response_format goes to vLLM's structured outputs
    scores_compatibility = False  # compatibility scores need logits of a forward: the native engine

    def __init__(self, settings: VllmSettings, tokenizer, *, vocab_size: int, base_config, composites: CompositeCache,
                 max_adapters_per_row: int, max_rank: int, base_model: str | None = None,
                 allow_unsafe_pickle: bool = False, eos_ids: set[int] | None = None):
        self.settings, self.tokenizer, self.vocab_size = settings, tokenizer, vocab_size
        self.base_config, self.composites = base_config, composites
        self.max_adapters_per_row, self.max_rank = max_adapters_per_row, max_rank
        self.base_model, self.allow_unsafe_pickle = base_model, allow_unsafe_pickle
        self.max_batch_rows = settings.max_batch_rows
        self.eos_ids = eos_ids if eos_ids is not None else {tokenizer.eos_token_id}
        self.device_lock = threading.RLock()
        self.paths: dict[str, Path] = {}  # adapter key -> its folder (as the composer's loading path gave it)
        self.ranks: dict[str, int] = {}
        self._weights: OrderedDict[str, LoraAdapterWeights] = OrderedDict()  # for composites, LRU first
        self.lora_ids: dict[str, int] = {}  # LoRA name -> vLLM's id; a name is never reused for other content
        self.lora_keys: dict[str, tuple[str, ...]] = {}  # LoRA name -> the adapter keys it is made of
        self.recent: OrderedDict[str, None] = OrderedDict()  # LoRA names by last use: our view of vLLM's slots
        self.in_use: dict[str, int] = {}  # adapter key -> running rows using it
        self.pinned: set[str] = set()
        self.counters = {"hits": 0, "misses": 0, "loads": 0, "evictions": 0, "load_seconds": 0.0}
        self._ids = itertools.count(1)
        self._requests = itertools.count()
        self.process = VllmProcess(settings)

    # -- adapters (the same calls the native engine offers) ----------------------------
    def read(self, key: str, path) -> LoraAdapterWeights:
        """Validate an adapter folder (the same checks as the native engine's)."""
        return read_adapter(path, base_config=self.base_config, base_model=self.base_model, max_rank=self.max_rank,
                            allow_unsafe_pickle=self.allow_unsafe_pickle, name=key.partition("@")[0])

    def weights(self, key: str) -> LoraAdapterWeights:
        """An installed adapter's weights, for composites (at most max_cpu_loras kept; re-read from its folder)."""
        weights = self._weights.get(key)
        if weights is None:
            weights = self._weights[key] = self.read(key, self.paths[key])
            while len(self._weights) > self.settings.max_cpu_loras:
                self._weights.popitem(last=False)
        self._weights.move_to_end(key)
        return weights

    def load_adapter(self, key: str, path) -> LoraAdapterWeights:
        check_adapter_name(key)
        started = time.perf_counter()
        weights = self.install_adapter(key, self.read(key, path), path)
        self.counters["load_seconds"] += time.perf_counter() - started
        return weights

    def install_adapter(self, key: str, weights: LoraAdapterWeights, path) -> LoraAdapterWeights:
        """Record a version `read` from `path` (the folder the composer's adapter-loading path gave);
        vLLM reads the folder itself on first use."""
        check_adapter_name(key)
        self.paths[key], self.ranks[key] = Path(path), weights.rank
        self._weights[key] = weights
        self._weights.move_to_end(key)
        while len(self._weights) > self.settings.max_cpu_loras:
            self._weights.popitem(last=False)
        return weights

    def unload_adapter(self, key: str) -> None:
        """Forget the version and drop every LoRA made of it from vLLM (its rows have left)."""
        self.paths.pop(key, None)
        self.ranks.pop(key, None)
        self._weights.pop(key, None)
        self.pinned.discard(key)
        for name in [n for n, keys in self.lora_keys.items() if key in keys]:
            self.process.send({"op": "remove_lora", "lora_id": self.lora_ids.pop(name)})
            del self.lora_keys[name]
            self.recent.pop(name, None)

    def ensure_in_memory(self, key: str) -> None:
        """The folder must still be readable: vLLM reads it when the LoRA is not cached."""
        if key in self.paths and not self.paths[key].is_dir():
            raise OSError(f"{self.paths[key]}: the adapter folder is gone")

    def has_adapter(self, key: str) -> bool:
        return key in self.paths

    def pin(self, key: str) -> None:
        if key in self.paths and key not in self.pinned:
            self.pinned.add(key)
            self.process.send({"op": "pin_lora", "lora": self._lora(key, (key,), self.paths[key])})

    def unpin(self, key: str) -> None:
        self.pinned.discard(key)  # vLLM cannot unpin: the LoRA stays until the version is unloaded

    def loaded_adapters(self) -> list[str]:
        return list(self.paths)

    def adapters_in_use(self) -> set[str]:
        return set(self.in_use)

    def resident_adapters(self) -> list[str]:
        """Adapters in the LoRAs used most recently, as many as vLLM's device slots (max_loras), and
        the pinned ones: vLLM keeps its slots least recently used, so this is where they are."""
        names = list(self.recent)[-self.settings.max_loras:]
        keys = {key for name in names for key in self.lora_keys.get(name, ())} | self.pinned
        return sorted(keys)

    def pool_stats(self) -> dict:
        return {**self.counters, "resident": len(self.resident_adapters()), "device_slots": self.settings.max_loras,
                "loaded": len(self.paths), "pinned": len(self.pinned), "engine": "vllm", **self.composites.stats()}

    # -- rows ---------------------------------------------------------------------------
    def check(self, request: GenerationRequest) -> None:
        check_request(request, self.vocab_size)

    def lora_for(self, composition: Composition) -> tuple[dict | None, str | None]:
        """The row's LoRA request ({"name", "id", "path"}, None for the base model) and the composite
        it holds (release it when the row leaves; None for the base model and selection)."""
        if composition.is_base:
            return None, None
        if len(composition.adapters) > self.max_adapters_per_row:
            raise CompositionError(f"a row uses {len(composition.adapters)} adapters; the limit is "
                                   f"{self.max_adapters_per_row}")
        rank = composite_rank(composition, self.ranks)
        if rank > self.settings.max_lora_rank:
            ranks = ", ".join(str(self.ranks[k]) for k in composition.adapters)
            raise CompositionError(
                f"the {composition.mode.value} of adapters of ranks {ranks} is one LoRA of rank {rank}; this "
                f"composer's vLLM engine serves ranks up to composition.vllm.max_lora_rank={self.settings.max_lora_rank}"
                f" (use fewer adapters, fusion, or selection)")
        if composition.mode.value == "selection" or composition.weights == (1.0,) and not composition.fuses:
            key = composition.adapters[0]
            return self._lora(key, (key,), self.paths[key]), None
        started = time.perf_counter()
        name, path = self.composites.acquire(composition, self.weights)
        self.counters["load_seconds"] += time.perf_counter() - started
        return self._lora(name, composition.adapters, path), name

    def _lora(self, name: str, keys: tuple[str, ...], path: Path) -> dict:
        if name not in self.lora_ids:
            self.lora_ids[name] = next(self._ids)
            self.lora_keys[name] = tuple(keys)
        if name in self.recent:
            self.counters["hits"] += 1
            self.recent.move_to_end(name)
        else:
            self.counters["misses"] += 1
            self.counters["loads"] += 1
            self.recent[name] = None
            if len(self.recent) > self.settings.max_loras:
                self.recent.popitem(last=False)
                self.counters["evictions"] += 1
        return {"name": name, "id": self.lora_ids[name], "path": str(path)}

    def scheduler(self) -> "VllmScheduler":
        return VllmScheduler(self)

    def generate(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        """Every request to its end, as one continuous batch (offline use: tests, benchmarks)."""
        return run_batch(self, requests)

    def close(self) -> None:
        self.process.close()


@dataclass(eq=False)
class VllmRow(Row):
    rid: str = ""
    composite: str | None = None  # the composite folder this row holds


class VllmScheduler:
    """The batcher's view of the vLLM process: rows join by a "generate" message, each step hands
    over the tokens that arrived, rows leave when finished or cancelled (then aborted in vLLM)."""

    def __init__(self, engine: VllmEngine):
        self.engine = engine
        self.rows: list[VllmRow] = []
        self.by_rid: dict[str, VllmRow] = {}
        self.logprobs = TokenLogprobs(engine.tokenizer)
        self.step_tokens = 0

    @property
    def full(self) -> bool:
        return len(self.rows) >= self.engine.max_batch_rows

    def try_add(self, request: GenerationRequest) -> VllmRow:
        engine = self.engine
        lora, composite = engine.lora_for(request.composition)
        rid = f"r{next(engine._requests)}"
        row = VllmRow(request, None, TextStream(engine.tokenizer, request.stop), {}, time.perf_counter(),
                      token_lps=[] if request.logprobs is not None else None, rid=rid, composite=composite)
        for key in request.composition.adapters:
            engine.in_use[key] = engine.in_use.get(key, 0) + 1
        try:
            engine.process.send({"op": "generate", "id": rid, "prompt_ids": list(request.prompt_ids), "lora": lora,
                                 "params": vllm_params(request)})
        except BaseException:  # the row never joined: nothing stays held
            self._release(row)
            raise
        self.rows.append(row)
        self.by_rid[rid] = row
        return row

    def step(self) -> list[VllmRow]:
        """The tokens that arrived (waiting up to STEP_WAIT_S for the first); returns the rows that left."""
        self.step_tokens = 0
        for row in self.rows:
            if row.cancelled and row.finish is None:
                row.finish = CANCELLED
                self.engine.process.send({"op": "abort", "id": row.rid})
        if not any(row.finish for row in self.rows):
            try:
                self._apply(self.engine.process.events.get(timeout=STEP_WAIT_S))
            except queue.Empty:
                pass
        while True:
            try:
                self._apply(self.engine.process.events.get_nowait())
            except queue.Empty:
                break
        return self._retire()

    def _apply(self, event: dict) -> None:
        if event.get("closed"):
            raise VllmEngineError(f"the vLLM process closed its connection; its log is {self.engine.settings.log_path}")
        row = self.by_rid.get(event["id"])
        if row is None or row.finish is not None:  # a row that already left (late tokens of an abort)
            return
        if "error" in event:
            kind = InvalidRequest if event.get("invalid") else Unavailable
            row.error = kind(f"the vLLM engine cannot serve this request: {event['error']}")
            row.finish = "error"
            return
        request = row.request
        if event.get("plps") is not None:
            prompt = request.prompt_ids
            row.prompt_lps = [self.logprobs.first(prompt[0])] + [
                self.logprobs.entry(token, lp, top) for token, (lp, top) in zip(prompt[1:], event["plps"][1:])]
        if request.max_tokens == 0:  # only the prompt was asked for
            row.finish = "length"
            emit(row, "")
        lps = event.get("lps")
        for i, token in enumerate(event["tokens"]):
            if row.finish is not None:
                break
            entry = self.logprobs.entry(token, *lps[i]) if lps and row.token_lps is not None else None
            take_token(row, token, entry, self.engine.eos_ids)
            self.step_tokens += 1
        finish = event.get("finish")
        if finish and row.finish is None:  # vLLM ended the row first (its own stop check, an abort)
            row.finish = finish if finish in ("stop", "length") else "stop"
            emit(row, row.stream.flush())
        elif row.finish is not None and not finish:
            self.engine.process.send({"op": "abort", "id": row.rid})  # we ended it (a stop string): vLLM stops too

    def _retire(self) -> list[VllmRow]:
        gone = [row for row in self.rows if row.finish is not None]
        if gone:
            self.rows = [row for row in self.rows if row.finish is None]
            for row in gone:
                self._release(row)
        return gone

    def _release(self, row: VllmRow) -> None:
        self.by_rid.pop(row.rid, None)
        if row.composite is not None:
            self.engine.composites.release(row.composite)
        for key in row.request.composition.adapters:
            left = self.engine.in_use.get(key, 0) - 1
            if left > 0:
                self.engine.in_use[key] = left
            else:
                self.engine.in_use.pop(key, None)

    def abort(self) -> list[VllmRow]:
        rows, self.rows = self.rows, []
        for row in rows:
            if row.finish is None:
                self.engine.process.send({"op": "abort", "id": row.rid})
            self._release(row)
        return rows

    def release_memory(self) -> None:
        """vLLM manages its own KV cache."""

    def close(self) -> None:
        """Nothing is parked: vLLM's cache lives in its process."""
