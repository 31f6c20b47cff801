"""The clients people put in front of LLM servers, against one real cluster on the tiny demo zoo:
the `openai` client (every OpenAI field the server accepts, refuses or ignores, usage and billing,
logprobs checked against PEFT, structured output), LangChain's ChatOpenAI, LiteLLM, and an
lm-eval `local-completions` run of a small multiple-choice task."""
from __future__ import annotations

import json
import os
from typing import Literal

import httpx
import openai
import pytest
import torch
from openai import OpenAI
from pydantic import BaseModel

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # litellm reads its price list from the network otherwise


class Verdict(BaseModel):
    """A structured answer: every field from a closed set, so a random tiny model ends it in a few tokens."""

    colour: Literal["red", "green", "blue"]
    sure: bool


@pytest.fixture(scope="module")
def client(serve_cluster):
    return OpenAI(base_url=f"{serve_cluster.url}/v1", api_key=serve_cluster.api_key, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def adapter(serve_cluster):
    return sorted(c.model_name for c in serve_cluster.zoo.cards)[0]


@pytest.fixture(scope="module")
def prompt(serve_cluster, adapter):
    return next(q.inputs for q in serve_cluster.zoo.queries if q.task == adapter)


def billed(serve_cluster) -> dict:
    r = httpx.get(f"{serve_cluster.url}/admin/tenants/acme/usage", headers=serve_cluster.admin, timeout=30)
    return r.json()["usage"]


def delta(before: dict, after: dict) -> dict:
    return {k: after.get(k, 0) - before.get(k, 0) for k in ("prompt_tokens", "completion_tokens")}


# ---- the openai client ------------------------------------------------------------------------
def test_what_clients_send_is_accepted_and_unknown_fields_are_named(client, adapter, prompt):
    raw = client.chat.completions.with_raw_response.create(
        model=adapter, max_completion_tokens=4, presence_penalty=0, frequency_penalty=0, logprobs=False, user="u-1",
        parallel_tool_calls=False, stop="\n\n", seed=3, metadata={"k": "v"}, store=False,
        messages=[{"role": "developer", "content": "Answer briefly."},
                  {"role": "user", "name": "ann", "content": [{"type": "text", "text": prompt}]}],
        extra_body={"not_an_openai_field": 1})
    reply = raw.parse()
    assert raw.headers["x-ignored-fields"] == "not_an_openai_field"
    assert reply.choices[0].finish_reason in ("stop", "length") and reply.usage.completion_tokens <= 4


@pytest.mark.parametrize("kwargs, param", [
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:,"}}]}]},
     "messages.0.content.0"),
    ({"messages": [{"role": "tool", "content": "x", "tool_call_id": "1"}]}, "messages.0"),
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"logit_bias": {"99999999": 5}}, "logit_bias"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}},
     "response_format"),
])
def test_fields_that_would_change_the_answer_are_refused_by_name(client, adapter, kwargs, param):
    kwargs = {"messages": [{"role": "user", "content": "hi"}], **kwargs}
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model=adapter, max_tokens=2, **kwargs)
    assert refused.value.body["param"] == param, refused.value.body


def test_n_answers_usage_streamed_or_not_is_billed_to_the_tenant(client, serve_cluster, adapter, prompt):
    before = billed(serve_cluster)
    many = client.completions.create(model=adapter, prompt=prompt, n=3, seed=5, temperature=1.0, max_tokens=6)
    assert sorted(c.index for c in many.choices) == [0, 1, 2]
    one = client.completions.create(model=adapter, prompt=prompt, max_tokens=6)
    assert many.usage.prompt_tokens == one.usage.prompt_tokens  # a prompt is billed once, whatever n
    chunks = list(client.chat.completions.create(model=adapter, max_tokens=6, stream=True,
                                                 stream_options={"include_usage": True},
                                                 messages=[{"role": "user", "content": prompt}]))
    streamed = chunks[-1].usage
    assert chunks[-1].choices == [] and streamed.prompt_tokens > 0 and streamed.completion_tokens > 0
    usages = [many.usage, one.usage, streamed]
    assert delta(before, billed(serve_cluster)) == {"prompt_tokens": sum(u.prompt_tokens for u in usages),
                                                    "completion_tokens": sum(u.completion_tokens for u in usages)}


@pytest.fixture(scope="module")
def peft_oracle(serve_cluster, adapter):
    """The independent oracle: transformers + PEFT on the adapter version the cluster serves."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    version = serve_cluster.admin_tool.registry.get(adapter).active_version
    base = AutoModelForCausalLM.from_pretrained(serve_cluster.zoo.base, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, f"{serve_cluster.cfg.adapter_store.path}/{adapter}/{version}").eval()
    return model, AutoTokenizer.from_pretrained(serve_cluster.zoo.base)


def oracle_logprobs(peft_oracle, ids: list[int]) -> torch.Tensor:
    model, _ = peft_oracle
    with torch.inference_mode():
        return torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), dim=-1)


def test_completion_echo_logprobs_equal_peft(client, adapter, prompt, peft_oracle):
    """Prompt logprobs with max_tokens 0 (what evaluation harnesses ask), under the adapter's composition."""
    reply = client.completions.create(model=adapter, prompt=prompt, max_tokens=0, echo=True, logprobs=2)
    choice = reply.choices[0]
    ids = peft_oracle[1](prompt, add_special_tokens=False)["input_ids"]
    expected = oracle_logprobs(peft_oracle, ids)
    assert choice.text == prompt and len(choice.logprobs.token_logprobs) == len(ids)
    assert choice.logprobs.token_logprobs[0] is None
    got = torch.tensor(choice.logprobs.token_logprobs[1:])
    assert torch.allclose(got, expected[torch.arange(len(ids) - 1), ids[1:]], atol=1e-3)
    assert reply.usage.prompt_tokens == len(ids) and reply.usage.completion_tokens == 0


def test_chat_logprobs_equal_peft(client, adapter, prompt, peft_oracle):
    messages = [{"role": "user", "content": prompt}]
    reply = client.chat.completions.create(model=adapter, messages=messages, max_tokens=5, logprobs=True,
                                           top_logprobs=3)
    tokenizer = peft_oracle[1]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    content = reply.choices[0].logprobs.content
    assert content, "no logprobs came back"
    # The oracle decodes greedily itself: re-tokenizing the answer's text need not give back the
    # tokens a random tiny model generated.
    ids = list(ids)
    for entry in content:
        position = oracle_logprobs(peft_oracle, ids)[-1]
        assert entry.logprob == pytest.approx(float(position.max()), abs=1e-3)  # greedy: the top token
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(position.topk(3).values.tolist(), abs=1e-3)
        assert entry.token == tokenizer.decode([int(position.argmax())])
        ids.append(int(position.argmax()))


def test_structured_output_parses_into_the_schema(client, adapter):
    reply = client.chat.completions.parse(model=adapter, max_tokens=40, response_format=Verdict,
                                          messages=[{"role": "user", "content": "Is the sky blue?"}])
    assert isinstance(reply.choices[0].message.parsed, Verdict)
    obj = client.chat.completions.create(model="auto", max_tokens=60, response_format={"type": "json_object"},
                                         messages=[{"role": "user", "content": "Describe a cat as JSON."}])
    if obj.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(obj.choices[0].message.content), dict)


def test_models_carry_lineage_and_one_can_be_fetched(client, serve_cluster, adapter):
    listed = {m.id: m.model_extra for m in client.models.list().data}
    assert listed[adapter]["root"] == listed[adapter]["parent"] == "tiny-random-llama"
    one = client.models.retrieve(adapter)
    assert one.id == adapter and one.model_extra["parent"] == "tiny-random-llama"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")


# ---- LangChain, LiteLLM -----------------------------------------------------------------------
def test_langchain_chat_openai_invoke_stream_batch_structured(serve_cluster, adapter, prompt):
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(base_url=f"{serve_cluster.url}/v1", api_key=serve_cluster.api_key, model=adapter,
                     max_tokens=8, temperature=0, max_retries=0, stream_usage=True)
    answer = llm.invoke(prompt)
    assert answer.usage_metadata["output_tokens"] > 0
    assert "".join(chunk.content for chunk in llm.stream(prompt)) == answer.content
    assert [m.content for m in llm.batch([prompt, prompt])] == [answer.content] * 2
    structured = ChatOpenAI(base_url=f"{serve_cluster.url}/v1", api_key=serve_cluster.api_key, model=adapter,
                            max_tokens=40, temperature=0, max_retries=0).with_structured_output(Verdict)
    assert isinstance(structured.invoke("Is the sky blue?"), Verdict)


def test_litellm_completion_and_stream(serve_cluster, adapter, prompt):
    import litellm

    common = dict(model=f"openai/{adapter}", api_base=f"{serve_cluster.url}/v1", api_key=serve_cluster.api_key,
                  messages=[{"role": "user", "content": prompt}], max_tokens=6, temperature=0)
    reply = litellm.completion(**common)
    assert reply.usage.completion_tokens > 0
    text = "".join(chunk.choices[0].delta.content or "" for chunk in litellm.completion(**common, stream=True))
    assert text == reply.choices[0].message.content


# ---- lm-eval ----------------------------------------------------------------------------------
DOCS = [{"question": "Capital letters of 'abc':", "choices": [" ABC", " abc", " Abc"], "answer": 0},
        {"question": "2 + 3 =", "choices": [" 5", " 6", " 23"], "answer": 0},
        {"question": "The opposite of hot is", "choices": [" cold", " warm", " red"], "answer": 0},
        {"question": "Reverse 'ab':", "choices": [" ba", " ab", " aa"], "answer": 0}]


def test_lm_eval_local_completions_scores_a_multiple_choice_task(serve_cluster, tmp_path, monkeypatch):
    """Loglikelihood of each choice through echo + logprobs, through retrieval (`auto`)."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps(doc) + "\n" for doc in DOCS))
    (tmp_path / "tiny_choice.yaml").write_text(
        "task: tiny_choice\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\noutput_type: multiple_choice\n"
        "doc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\ndoc_to_target: '{{answer}}'\n"
        "metric_list:\n  - metric: acc\n")
    monkeypatch.setenv("OPENAI_API_KEY", serve_cluster.api_key)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    results = lm_eval.simple_evaluate(
        model="local-completions",
        model_args={"base_url": f"{serve_cluster.url}/v1/completions", "model": "auto",
                    "tokenizer_backend": "huggingface", "tokenizer": str(serve_cluster.zoo.base),
                    "tokenized_requests": False, "batch_size": 4, "max_retries": 1},
        tasks=["tiny_choice"], task_manager=TaskManager(include_path=str(tmp_path)), limit=len(DOCS))
    scores = results["results"]["tiny_choice"]
    assert 0.0 <= scores["acc,none"] <= 1.0
    assert results["n-samples"]["tiny_choice"]["effective"] == len(DOCS)
