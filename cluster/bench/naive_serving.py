"""The baseline of the serving benchmark: serving as LoraRetriever's released code does.

One request at a time on the model: retrieve the top-1 adapter (the same Retriever
deployment the product uses), load its PEFT folder from disk into the base model, generate,
unload. No batching, no adapter cache. Same base model, same chat template, greedy
decoding, and the product's Server-Timing header, so both are measured alike."""
from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import JSONResponse
from ray import serve

from deployments.fanout import call_with_own_id
from services.serving.openai_format import server_timing

naive_api = FastAPI()


@serve.deployment(name="NaivePeft", max_ongoing_requests=256)
@serve.ingress(naive_api)
class NaivePeft:
    def __init__(self, base_path: str, adapters_dir: str, retriever_app: str):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(base_path)
        self.model = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32).eval()
        self.adapters_dir = Path(adapters_dir)
        self.retriever = serve.get_deployment_handle("Retriever", retriever_app)
        self.lock = threading.Lock()  # the adapter is injected into the shared model: one request at a time

    @naive_api.post("/v1/chat/completions")
    async def chat(self, body: dict) -> JSONResponse:
        started = time.perf_counter()
        text = body["messages"][-1]["content"]
        retrieved = await call_with_own_id(self.retriever.retrieve.remote, text, top_k=1, exclude=[],
                                           min_similarity=-1.0, tenant=None)
        planned = time.perf_counter()
        name = retrieved["adapters"][0]["name"]
        result = await asyncio.get_running_loop().run_in_executor(
            None, self._generate, body["messages"], name, int(body.get("max_tokens", 16)), time.perf_counter())
        timing = server_timing(plan_s=planned - started, total_s=time.perf_counter() - started, results=[result])
        return JSONResponse({"choices": [{"index": 0, "message": {"role": "assistant", "content": result["text"]},
                                          "lora": {"composition": "selection", "adapters": [{"name": name}]}}]},
                            headers={"Server-Timing": timing})

    def _generate(self, messages: list[dict], name: str, max_tokens: int, waiting: float) -> dict:
        """`waiting` is when the request began to wait: for an executor thread, then for the model."""
        import torch
        from peft import PeftModel

        with self.lock:
            started = time.perf_counter()
            model = PeftModel.from_pretrained(self.model, self.adapters_dir / name)
            try:
                inputs = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                            return_tensors="pt", return_dict=True)
                with torch.no_grad():
                    out = model.generate(**inputs, max_new_tokens=max_tokens, do_sample=False)  # (1, prompt + new)
            finally:
                self.model = model.unload()  # the base model again, LoRA layers removed
            finished = time.perf_counter()
        new_ids = out[0, inputs["input_ids"].shape[1]:]
        return {"text": self.tokenizer.decode(new_ids, skip_special_tokens=True),
                "queue_seconds": started - waiting, "batch_seconds": finished - started}
