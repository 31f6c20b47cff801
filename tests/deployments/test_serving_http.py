"""The Serve app over real HTTP: the openai client for the happy paths, httpx for errors."""
from __future__ import annotations

import json

import httpx
import pytest
from openai import OpenAI



@pytest.fixture(scope="module")
def client(serve_cluster):
    return OpenAI(base_url=f"{serve_cluster.url}/v1", api_key=serve_cluster.api_key, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def task_prompts(serve_cluster):
    """One held-out query per demo task: {task: prompt}."""
    prompts = {}
    for q in serve_cluster.zoo.queries:
        prompts.setdefault(q.task, q.inputs)
    return prompts


def test_models_lists_base_auto_and_adapters(client, serve_cluster):
    ids = {m.id for m in client.models.list().data}
    assert {"tiny-random-llama", "auto"} | {c.model_name for c in serve_cluster.zoo.cards} <= ids


def test_mixed_prompts_get_their_own_adapters_in_shared_steps(client, task_prompts, composer_status):
    tasks = sorted(task_prompts)
    before = composer_status()["batches"]
    resp = client.completions.create(model="auto", prompt=[task_prompts[t] for t in tasks], max_tokens=6,
                                     extra_body={"lora": {"composition": "selection"}})
    after = composer_status()["batches"]
    chosen = [c.model_extra["lora"]["adapters"][0]["name"] for c in sorted(resp.choices, key=lambda c: c.index)]
    assert chosen == tasks
    assert after["rows"] - before["rows"] == len(tasks)
    steps, row_steps = after["steps"] - before["steps"], after["row_steps"] - before["row_steps"]
    assert row_steps > steps  # rows with different adapters shared decode steps (continuous batch)


def test_answers_equal_the_core_engine_for_the_same_composition(client, serve_cluster, task_prompts):
    from services.lora.engine import CompositionEngine
    from services.lora.generation import GenerationRequest
    from services.composition import AdapterKey, Composition, CompositionMode

    prompt = task_prompts[sorted(task_prompts)[0]]
    resp = client.completions.create(model="auto", prompt=prompt, max_tokens=8,
                                     extra_body={"lora": {"composition": "mixture", "top_k": 2}})
    lora = resp.choices[0].model_extra["lora"]
    assert lora["composition"] == "mixture" and len(lora["adapters"]) == 2
    engine = CompositionEngine.from_pretrained(serve_cluster.zoo.base, device="cpu")
    keys = []
    for a in lora["adapters"]:
        key = str(AdapterKey(a["name"], a["version"]))
        engine.load_adapter(key, f"{serve_cluster.cfg.adapter_store.path}/{a['name']}/{a['version']}")
        keys.append(key)
    ids = engine.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    mixture = Composition.of(CompositionMode.mixture, keys, [a["weight"] for a in lora["adapters"]])
    [expected] = engine.generate([GenerationRequest(prompt_ids=ids, composition=mixture, max_tokens=8)])
    assert resp.choices[0].text == expected.text
    assert resp.usage.completion_tokens == expected.completion_tokens


def test_named_adapter_chat_and_streaming(client, serve_cluster, task_prompts):
    name = sorted(task_prompts)[1]
    chat = client.chat.completions.create(model=name, max_tokens=5,
                                          messages=[{"role": "user", "content": task_prompts[name]}])
    assert chat.choices[0].model_extra["lora"]["adapters"][0]["name"] == name
    assert chat.choices[0].message.role == "assistant"

    pieces, finish, lora = [], None, None
    for chunk in client.chat.completions.create(model=name, max_tokens=5, stream=True,
                                                messages=[{"role": "user", "content": task_prompts[name]}]):
        choice = chunk.choices[0]
        lora = lora or (choice.model_extra or {}).get("lora")
        pieces.append(choice.delta.content or "")
        finish = choice.finish_reason or finish
    assert "".join(pieces) == chat.choices[0].message.content  # greedy: same text streamed or not
    assert finish in ("stop", "length") and lora["adapters"][0]["name"] == name


def test_streaming_a_list_of_prompts(client, task_prompts):
    prompts = [task_prompts[t] for t in sorted(task_prompts)]
    texts = {i: "" for i in range(len(prompts))}
    finished = set()
    for chunk in client.completions.create(model="auto", prompt=prompts, max_tokens=4, stream=True):
        for c in chunk.choices:
            texts[c.index] += c.text
            if c.finish_reason:
                finished.add(c.index)
    whole = client.completions.create(model="auto", prompt=prompts, max_tokens=4)
    assert finished == set(texts)
    assert [texts[c.index] for c in whole.choices] == [c.text for c in whole.choices]


def test_retrievers_encode_on_the_cpus_they_reserved(serve_cluster):
    """embedder.threads unset: a replica's encoding threads follow its num_cpus (0.1 here: one thread)."""
    from services.retrieval.host_runtime import host_backend

    [retriever] = httpx.get(f"{serve_cluster.url}/admin/status", headers=serve_cluster.admin, timeout=30).json()["retrievers"]
    assert serve_cluster.cfg.embedder.threads is None and serve_cluster.cfg.deployments.retriever.num_cpus == 0.1
    assert retriever["embedder"] == {"backend": host_backend("onnx"), "threads": 1}


def test_retrieve_endpoint_scores_and_excludes(serve_cluster, task_prompts):
    task = sorted(task_prompts)[0]
    headers = {"Authorization": f"Bearer {serve_cluster.api_key}"}
    r = httpx.post(f"{serve_cluster.url}/v1/retrieve", headers=headers, timeout=60,
                   json={"input": task_prompts[task], "lora": {"top_k": 3}}).json()
    adapters = r["data"][0]["adapters"]
    assert adapters[0]["name"] == task and adapters[0]["score"] >= adapters[-1]["score"]
    r = httpx.post(f"{serve_cluster.url}/v1/retrieve", headers=headers, timeout=60,
                   json={"input": task_prompts[task], "lora": {"exclude": [task]}}).json()
    assert task not in [a["name"] for a in r["data"][0]["adapters"]]


@pytest.mark.parametrize("body, status, fragment", [
    ({"model": "auto"}, 400, "prompt"),
    ({"model": "auto", "prompt": "hi", "max_tokens": -1}, 400, "max_tokens"),
    ({"model": "auto", "prompt": "hi", "max_tokens": 10**6}, 400, "max_tokens"),
    ({"model": "auto", "prompt": "hi", "temperature": "hot"}, 400, "temperature"),
    ({"model": "auto", "prompt": [], "max_tokens": 2}, 400, "prompt"),
    ({"model": "auto", "prompt": ["x"] * 1000}, 400, "prompt"),
    ({"model": "no-such-adapter", "prompt": "hi"}, 404, "does not exist"),
    ({"model": "auto", "prompt": "hi", "lora": {"composition": "blend"}}, 400, "composition"),
    ({"model": "auto", "prompt": "hi", "suffix": "!"}, 400, "suffix"),
    ({"model": "auto", "prompt": "hi", "n": "2"}, 400, "n"),
])
def test_bad_requests_get_openai_shaped_4xx(serve_cluster, body, status, fragment):
    r = httpx.post(f"{serve_cluster.url}/v1/completions", json=body, timeout=60,
                   headers={"Authorization": f"Bearer {serve_cluster.api_key}"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert fragment in err["message"] and err["type"]


def test_unknown_fields_are_ignored_and_named_in_a_header(serve_cluster):
    r = httpx.post(f"{serve_cluster.url}/v1/completions", timeout=60,
                   headers={"Authorization": f"Bearer {serve_cluster.api_key}"},
                   json={"model": "tiny-random-llama", "prompt": "hi", "max_tokens": 2, "surprise": 1})
    assert r.status_code == 200 and r.headers["x-ignored-fields"] == "surprise"


def test_invalid_json_and_missing_key(serve_cluster):
    r = httpx.post(f"{serve_cluster.url}/v1/completions", content=b"{not json", timeout=30,
                   headers={"Authorization": f"Bearer {serve_cluster.api_key}", "Content-Type": "application/json"})
    assert r.status_code == 400 and "error" in r.json()
    r = httpx.post(f"{serve_cluster.url}/v1/completions", json={"model": "auto", "prompt": "hi"}, timeout=30)
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"


def test_request_id_is_echoed(serve_cluster):
    r = httpx.post(f"{serve_cluster.url}/v1/completions", timeout=60,
                   headers={"Authorization": f"Bearer {serve_cluster.api_key}", "X-Request-Id": "trace-42"},
                   json={"model": "tiny-random-llama", "prompt": "hello", "max_tokens": 2})
    assert r.status_code == 200 and r.headers["x-request-id"] == "trace-42"
    assert r.json()["choices"][0]["lora"] == {"composition": "none", "adapters": []}
    assert json.loads(r.text)["id"] == "trace-42"
    timing = dict(part.split(";dur=") for part in r.headers["server-timing"].split(", "))
    assert set(timing) == {"plan", "queue", "compose", "total"}
    ms = {name: float(value) for name, value in timing.items()}
    assert ms["compose"] > 0 and ms["queue"] >= 0 and ms["plan"] >= 0
    assert ms["plan"] + ms["queue"] + ms["compose"] <= ms["total"] + 1.0  # parts of the whole (1 ms rounding)


def test_auto_is_the_default_and_says_what_it_decided(client, task_prompts):
    resp = client.completions.create(model="auto", prompt=task_prompts[sorted(task_prompts)[0]], max_tokens=4)
    lora = resp.choices[0].model_extra["lora"]
    assert lora["decision"]["policy"] == "auto" and lora["decision"]["reason"]
    assert lora["composition"] in ("selection", "mixture", "none")


def test_a_new_active_version_gets_a_gain_table(serve_cluster, tmp_path):
    """Last in the module: it adds a version. The composer measures the new version's compositions
    with its nearest neighbours on its card; `adapters show` (the admin API) lists the table per version."""
    import base64

    import httpx

    from cluster.demo.variants import variant_adapter

    name = sorted(serve_cluster.zoo.adapters)[0]
    folder = variant_adapter(serve_cluster.zoo.adapters[name], tmp_path / "v2", 1.1)
    card = next(c for c in serve_cluster.zoo.cards if c.model_name == name)
    files = {f: base64.b64encode((folder / f).read_bytes()).decode()
             for f in ("adapter_config.json", "adapter_model.safetensors")}
    r = httpx.post(f"{serve_cluster.url}/admin/adapters", headers=serve_cluster.admin, timeout=600,
                   json={"name": name, "card": card.model_dump(), "files": files})
    assert r.status_code == 200, r.text
    version = r.json()["version"]
    measured = r.json()["compatibility"]["measured"]
    assert measured[0] == f"{name}@{version}"
    shown = httpx.get(f"{serve_cluster.url}/admin/adapters/{name}", headers=serve_cluster.admin, timeout=60).json()
    table = shown["compatibility"][version]
    assert table["adapter"] == f"{name}@{version}" and len(table["neighbours"]) == 2
    assert {"base", f"selection:{name}@{version}"} <= set(table["measures"])
    assert all(0.0 <= acc <= 1.0 and lp <= 0.0 for acc, lp in table["measures"].values())
