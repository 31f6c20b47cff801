"""The vLLM side of a composer's vLLM engine, run by vLLM's own python (services/lora/vllm_env.py):

    <vllm-venv>/bin/python -I vllm_driver.py CONFIG.json

It imports only the standard library and vLLM (never the project: that environment has its own
torch and transformers). It starts vLLM's AsyncLLM with the engine arguments in CONFIG.json,
listens on a loopback port, prints "READY <port>" on stdout and serves one connection, the
composer's, in newline-delimited JSON:

  in:  {"op": "generate", "id", "prompt_ids", "lora": {"name", "id", "path"} | null, "params": {...}}
       {"op": "abort", "id"}   {"op": "remove_lora" | "pin_lora", "lora_id"}
  out: {"id", "tokens": [new ids], "lps": [[logprob, [[id, logprob], ...]], ...] | null,
        "plps": (first message only, with prompt logprobs) [null, [logprob, [[id, logprob], ...]], ...],
        "finish": null | "stop" | "length" | "abort"}
       {"id", "error": message, "invalid": true when vLLM refused the request's parameters}

It exits when the composer's process is gone or closes the connection, and a sentinel process kills
its process group if it is killed itself, so no engine outlives its replica.
"""
from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import threading
import time


def log(message: str) -> None:
    print(f"[vllm-driver] {message}", file=sys.stderr, flush=True)


ENGINES: list = []  # the running AsyncLLM, shut down before exiting (else its core processes outlive us)


def exit_now(reason: str) -> None:
    log(f"{reason}; exiting")
    for engine in ENGINES:
        engine.shutdown()
    os.killpg(os.getpgrp(), signal.SIGKILL)  # this process leads its group: vLLM's core processes go too


def watch_parent() -> None:
    """Exit when the composer's process is gone (this process is re-parented)."""
    parent = os.getppid()

    def wait() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        exit_now("the composer went away")

    threading.Thread(target=wait, daemon=True).start()


def guard_group() -> None:
    """Fork a sentinel that kills this process group once the driver is gone, however it went. Ray
    SIGKILLs a replica's child processes when the replica goes, which skips exit_now, and vLLM's
    core processes (the replica's grandchildren) would outlive it holding gigabytes. Call it first:
    a fork before any thread starts."""
    driver = os.getpid()
    if os.fork():
        return
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1):  # not the composer's pipe: it must see the driver's stdout close when the driver dies
        os.dup2(devnull, fd)
    while os.getppid() == driver:
        time.sleep(0.5)
    os.killpg(os.getpgrp(), signal.SIGKILL)


def sampling_params(params: dict):
    from vllm.sampling_params import RequestOutputKind, SamplingParams, StructuredOutputsParams

    params = dict(params)
    structured = params.pop("structured_outputs", None)
    if structured is not None:
        params["structured_outputs"] = StructuredOutputsParams(**structured)
    if params.get("logit_bias"):
        params["logit_bias"] = {int(k): v for k, v in params["logit_bias"].items()}
    return SamplingParams(**params, output_kind=RequestOutputKind.DELTA)


def ranked(entry: dict, k: int) -> list:
    """[[token, logprob], ...] of the k most likely (vLLM adds the sampled token when outside them)."""
    best = sorted(((lp.rank, token, lp.logprob) for token, lp in entry.items() if lp.rank is not None and lp.rank <= k))
    return [[token, logprob] for _, token, logprob in best]


def logprob_list(entries, tokens: list[int], k: int) -> list:
    return [None if entry is None else [entry[token].logprob, ranked(entry, k)] for entry, token in zip(entries, tokens)]


class Driver:
    def __init__(self, engine):
        self.engine = engine
        self.tasks: dict[str, asyncio.Task] = {}
        self.writer: asyncio.StreamWriter | None = None

    def send(self, message: dict) -> None:
        if self.writer is not None and not self.writer.is_closing():
            self.writer.write((json.dumps(message) + "\n").encode())

    async def generate(self, message: dict) -> None:
        from vllm.inputs import TokensPrompt
        from vllm.lora.request import LoRARequest

        rid, params = message["id"], message["params"]
        lora = message.get("lora")
        lora = LoRARequest(lora["name"], lora["id"], lora["path"]) if lora else None
        k, pk = params.get("logprobs") or 0, params.get("prompt_logprobs") or 0
        first = True
        try:
            sampling = sampling_params(params)
            async for out in self.engine.generate(TokensPrompt(prompt_token_ids=message["prompt_ids"]), sampling,
                                                  rid, lora_request=lora):
                completion = out.outputs[0]
                tokens = list(completion.token_ids)
                reply = {"id": rid, "tokens": tokens, "finish": completion.finish_reason if out.finished else None,
                         "lps": None if params.get("logprobs") is None or completion.logprobs is None
                         else logprob_list(completion.logprobs, tokens, k)}
                if first and params.get("prompt_logprobs") is not None and out.prompt_logprobs is not None:
                    reply["plps"] = logprob_list(out.prompt_logprobs, message["prompt_ids"], pk)
                first = False
                self.send(reply)
                await self.writer.drain()
        except asyncio.CancelledError:
            await self.engine.abort(rid)
            self.send({"id": rid, "tokens": [], "finish": "abort"})
        except (ValueError, TypeError) as err:  # vLLM refused the request's parameters
            self.send({"id": rid, "error": f"{type(err).__name__}: {err}", "invalid": True})
        except Exception as err:  # noqa: BLE001 - the composer hears why this row failed
            log(f"request {rid} failed: {err!r}")
            self.send({"id": rid, "error": f"{type(err).__name__}: {err}", "invalid": False})
        finally:
            self.tasks.pop(rid, None)

    async def control(self, message: dict) -> None:
        op = message["op"]
        if op == "remove_lora":
            await self.engine.remove_lora(message["lora_id"])
        elif op == "pin_lora":
            await self.engine.pin_lora(message["lora_id"])

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.writer is not None:  # one composer per driver
            writer.close()
            return
        self.writer = writer
        while line := await reader.readline():
            message = json.loads(line)
            op = message["op"]
            if op == "generate":
                self.tasks[message["id"]] = asyncio.create_task(self.generate(message))
            elif op == "abort":
                task = self.tasks.get(message["id"])
                if task is not None:
                    task.cancel()
            else:
                await self.control(message)
        exit_now("the composer closed its connection")


async def run(config: dict) -> None:
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    engine = AsyncLLM.from_engine_args(AsyncEngineArgs(**config["engine_args"], disable_log_stats=True))
    ENGINES.append(engine)
    driver = Driver(engine)
    server = await asyncio.start_server(driver.serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    print(f"READY {port}", flush=True)
    async with server:
        await server.serve_forever()


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: vllm_driver.py CONFIG.json", file=sys.stderr)
        return 2
    guard_group()
    with open(argv[0]) as handle:
        config = json.load(handle)
    os.environ.update(config.get("env", {}))  # before vLLM is imported: thread binding, KV cache size
    watch_parent()
    asyncio.run(run(config))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
