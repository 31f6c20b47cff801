"""The vLLM side of the peer benchmark, run by the vLLM virtual environment's python.

    <vllm-venv>/bin/python peer_vllm.py WORKLOAD.json RESULTS.json

It imports only the standard library and vLLM (never the project: that environment has its own
transformers). WORKLOAD.json says the engine (model folder, dtype, threads, LoRA adapters) and
the runs: "offline" runs submit every request at once to `LLM.generate`; "open_loop" runs submit
each request at its arrival time to the async engine and record when its tokens came. Each run's
"warmup" requests run first, untimed, all at once. Every request carries prompt token ids, so
both systems read the same tokens. RESULTS.json gets the versions, the engine's start-up time
and, per run, the raw timings and output token ids (the caller computes the statistics, the
same way for both systems).
"""
from __future__ import annotations

import asyncio
import gc
import json
import os
import statistics
import sys
import time


def configure_threads(threads: int, kv_cache_gib: int) -> None:
    """Before vLLM is imported: bind its OpenMP threads to `threads` of the CPUs this process may
    use (its default "auto" keeps one core for the scheduler, half of a 2-core machine)."""
    cpus = sorted(os.sched_getaffinity(0))[:threads]
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = ",".join(str(c) for c in cpus)
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(kv_cache_gib)
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


def engine_args(work: dict) -> dict:
    args = {"model": work["model"], "dtype": work["dtype"], "max_model_len": work["max_model_len"],
            "max_num_seqs": work["max_num_seqs"], "seed": 0}
    if work["device"] != "cpu":  # the benchmark's process may still hold some of the GPU's memory
        args["gpu_memory_utilization"] = 0.5
    lora = work.get("lora")
    if lora:
        args.update(enable_lora=True, max_lora_rank=lora["max_rank"], max_loras=lora["max_loras"],
                    max_cpu_loras=max(len(lora["adapters"]), lora["max_loras"]))
    return args


def lora_requests(work: dict) -> dict:
    from vllm.lora.request import LoRARequest

    adapters = (work.get("lora") or {}).get("adapters", {})
    return {name: LoRARequest(name, i, path) for i, (name, path) in enumerate(sorted(adapters.items()), 1)}


def output_ids(completion, eos_ids: set[int]) -> list[int]:
    """Generated token ids without a final EOS (the project's engine does not count it either)."""
    ids = list(completion.token_ids)
    return ids[:-1] if ids and ids[-1] in eos_ids else ids


def stop_ids(work: dict) -> set[int]:
    """Token ids that end an answer: none when EOS is ignored (then an EOS is just a token)."""
    return set() if work.get("ignore_eos") else set(work["eos_ids"])


def sampling_params(work: dict, request: dict, **extra):
    """The run's sampling (greedy unless the work says otherwise) and the request's token limit."""
    from vllm import SamplingParams

    return SamplingParams(temperature=work.get("temperature", 0.0), top_p=work.get("top_p", 1.0),
                          max_tokens=request.get("max_tokens") or work["max_tokens"],
                          ignore_eos=work.get("ignore_eos", False), **extra)


def run_offline(work: dict) -> dict:
    from vllm import LLM
    from vllm.inputs import TokensPrompt

    started = time.perf_counter()
    llm = LLM(**engine_args(work))
    loras = lora_requests(work)
    for request in loras.values():  # preloaded: no run pays for reading an adapter
        llm.llm_engine.add_lora(request)
    startup = time.perf_counter() - started
    eos = stop_ids(work)
    results = {}

    def generate(requests: list[dict]):
        prompts = [TokensPrompt(prompt_token_ids=r["prompt_ids"]) for r in requests]
        params = [sampling_params(work, r) for r in requests]
        lora = [loras[r["adapter"]] if r.get("adapter") else None for r in requests] if loras else None
        return llm.generate(prompts, params, lora_request=lora, use_tqdm=False)

    for run in work["runs"]:
        walls = []
        for _ in range(work.get("repeats", 1)):  # each repeat starts from an empty prefix cache, as the first
            llm.reset_prefix_cache()
            generate(run["warmup"])
            began = time.perf_counter()
            outputs = generate(run["requests"])
            walls.append(time.perf_counter() - began)
        ids = [output_ids(o.outputs[0], eos) for o in outputs]
        results[run["name"]] = {"wall_s": statistics.median(walls), "walls_s": walls, "output_ids": ids}
        log(f"{run['name']}: {len(ids)} requests, {sum(map(len, ids))} tokens in {walls} s")
    return {"startup_s": startup, "runs": results}


async def run_open_loop(work: dict) -> dict:
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.inputs import TokensPrompt
    from vllm.sampling_params import RequestOutputKind
    from vllm.v1.engine.async_llm import AsyncLLM

    started = time.perf_counter()
    engine = AsyncLLM.from_engine_args(AsyncEngineArgs(**engine_args(work), disable_log_stats=True))
    loras = lora_requests(work)
    for request in loras.values():
        await engine.add_lora(request)
    startup = time.perf_counter() - started
    eos = stop_ids(work)
    counter = iter(range(1 << 62))

    async def one(request: dict, t0: float) -> dict:
        await asyncio.sleep(max(t0 + request["at"] - time.perf_counter(), 0))
        lora = loras[request["adapter"]] if request.get("adapter") else None
        params = sampling_params(work, request, output_kind=RequestOutputKind.DELTA)
        first = last = None
        ids: list[int] = []
        async for out in engine.generate(TokensPrompt(prompt_token_ids=request["prompt_ids"]), params,
                                         f"r{next(counter)}", lora_request=lora):
            new = [t for t in out.outputs[0].token_ids if t not in eos] if out.outputs else []
            if new:  # the EOS step is no token (the project's engine neither streams nor counts it)
                last = time.perf_counter() - t0
                first = last if first is None else first
                ids.extend(new)
        end = time.perf_counter() - t0
        return {"at": request["at"], "first": first if first is not None else end,
                "last": last if last is not None else end, "end": end, "tokens": len(ids)}

    async def play(requests: list[dict]) -> list[dict]:
        t0 = time.perf_counter()
        return list(await asyncio.gather(*(one(r, t0) for r in requests)))

    results = {}
    try:
        for run in work["runs"]:
            await play(run["warmup"])
            records = await play(run["requests"])
            results[run["name"]] = {"requests": records}
            log(f"{run['name']}: {len(records)} requests, {sum(r['tokens'] for r in records)} tokens")
    finally:
        engine.shutdown()
    return {"startup_s": startup, "runs": results}


def log(message: str) -> None:
    print(f"[vllm] {message}", file=sys.stderr, flush=True)


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: peer_vllm.py WORKLOAD.json RESULTS.json", file=sys.stderr)
        return 2
    with open(argv[0]) as handle:
        work = json.load(handle)
    if work["device"] == "cpu":
        configure_threads(work["threads"], work["kv_cache_gib"])
    import torch
    import vllm

    if work["mode"] == "offline":
        results = run_offline(work)
    else:
        results = asyncio.run(run_open_loop(work))
        gc.collect()  # the engine's __del__ now, not at exit when the modules it calls are gone
    results.update(vllm_version=vllm.__version__, torch_version=torch.__version__,
                   omp_threads_bind=os.environ.get("VLLM_CPU_OMP_THREADS_BIND"))
    with open(argv[1], "w") as handle:
        json.dump(results, handle)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
