"""Embedder backends against plain transformers mean pooling (the oracle), instruction handling, errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModel, AutoTokenizer

from services.retrieval import DEFAULT_INSTRUCTION
from services.retrieval.embedder import BACKENDS, Embedder, EmbedderLoadError, packaged_model_path


def mean_pooled(texts: list[str], max_length: int = 256) -> np.ndarray:
    """all-MiniLM-L6-v2's recipe written directly: masked mean of token states, L2-normalised."""
    tok = AutoTokenizer.from_pretrained(packaged_model_path())
    model = AutoModel.from_pretrained(packaged_model_path()).eval()
    batch = tok(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    with torch.no_grad():
        states = model(**batch).last_hidden_state  # (n, tokens, dim)
    mask = batch["attention_mask"].unsqueeze(-1).float()  # (n, tokens, 1)
    pooled = (states * mask).sum(1) / mask.sum(1)  # (n, dim)
    return torch.nn.functional.normalize(pooled, dim=-1).numpy()


TEXTS = ["Reverse the word: lamp", "What is 3 plus 4? Please answer quickly, with a number only.", "hi",
         "Translate to German: the teacher works in the city every day. " * 3,
         "Anna was reading a book in the park. " * 60 + "Question: what was Anna doing?"]  # past 256 tokens


# Least cosine of a backend's sentence vector to the oracle's. int8 quantizes every MatMul
# (services/retrieval/onnx_encoder.py): a few sentences fall to about 0.986, and how far depends on
# the CPU's int8 kernels (AVX2 or VNNI), so it is held to 0.98; a broken quantization lands far lower.
# bfloat16 weights and activations (float32 pooling) kept 0.99993 on these texts.
MIN_COSINE = {"torch": 0.9999, "onnx": 0.9999, "onnx-int8": 0.98, "bf16": 0.999}


@pytest.fixture(scope="module")
def reference(embedder_of):
    return embedder_of("torch")


@pytest.fixture(scope="module")
def embedder_of():
    made = {}
    return lambda backend, **kw: made.setdefault((backend, *sorted(kw.items())), Embedder(backend=backend, **kw))


def test_torch_backend_matches_mean_pooling_with_the_instruction_prefixed(reference):
    out = reference.encode(TEXTS)
    assert out.shape == (len(TEXTS), reference.dim) and out.dtype == np.float32 and reference.dim == 384
    np.testing.assert_allclose(out, mean_pooled([DEFAULT_INSTRUCTION + t for t in TEXTS]), atol=1e-5)


@pytest.mark.parametrize("backend", ["onnx", "onnx-int8", "bf16"])
def test_fast_backends_agree_with_the_oracle_sentence_by_sentence(embedder_of, backend):
    out = embedder_of(backend).encode(TEXTS)
    assert out.shape == (len(TEXTS), 384) and out.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    cosine = (out * mean_pooled([DEFAULT_INSTRUCTION + t for t in TEXTS])).sum(1)  # rows are unit length
    assert cosine.min() > MIN_COSINE[backend], cosine


@pytest.mark.parametrize("backend", BACKENDS)
def test_max_seq_length_truncates_like_the_oracle(embedder_of, backend):
    out = embedder_of(backend, max_seq_length=32).encode(TEXTS)
    cosine = (out * mean_pooled([DEFAULT_INSTRUCTION + t for t in TEXTS], max_length=32)).sum(1)
    assert cosine.min() > MIN_COSINE[backend], cosine
    assert embedder_of(backend, max_seq_length=4096).max_seq_length == 256  # the model's own limit


def test_the_onnx_export_is_cached_and_reused(embedder_of, tmp_path, monkeypatch):
    from services.retrieval import onnx_encoder

    embedder_of("onnx-int8")  # exported before, under the data home
    monkeypatch.setattr(onnx_encoder, "export_onnx", lambda *a: pytest.fail("exported a second time"))
    monkeypatch.setattr(onnx_encoder, "quantize_int8", lambda *a: pytest.fail("quantized a second time"))
    assert Embedder(backend="onnx-int8").encode(["hello"]).shape == (1, 384)


def test_instruction_is_configurable_and_may_be_empty(reference):
    bare = Embedder(instruction="", backend="torch")
    np.testing.assert_allclose(bare.encode(["hello"]), mean_pooled(["hello"]), atol=1e-5)
    assert not np.allclose(bare.encode(["hello"]), reference.encode(["hello"]), atol=1e-3)


@pytest.mark.parametrize("backend,atol", [("torch", 1e-5), ("onnx", 1e-5), ("bf16", 2e-3)])
def test_batching_does_not_change_the_vectors(embedder_of, backend, atol):
    # bf16 pads each group to a multiple of 16 tokens: masked, the padding must not move a vector
    texts = [f"sentence number {i} about {w}" for i, w in enumerate(["cats", "rivers", "taxes", "music", "rain"])]
    small = Embedder(batch_size=2, backend=backend)
    one_by_one = np.concatenate([small.encode([t]) for t in texts])
    np.testing.assert_allclose(small.encode(texts), embedder_of(backend).encode(texts), atol=atol)
    np.testing.assert_allclose(one_by_one, embedder_of(backend).encode(texts), atol=atol)


def test_empty_input_and_bad_arguments(embedder, tmp_path):
    assert embedder.encode([]).shape == (0, 384)
    with pytest.raises(TypeError, match="list of texts"):
        embedder.encode("one string")
    with pytest.raises(EmbedderLoadError, match="no config.json"):
        Embedder(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="batch_size"):
        Embedder(batch_size=0)
    with pytest.raises(EmbedderLoadError, match="backend must be one of"):
        Embedder(backend="tensorrt")
    with pytest.raises(EmbedderLoadError, match="threads"):
        Embedder(threads=0)


@pytest.mark.parametrize("backend", ["onnx", "bf16"])
def test_fast_backends_refuse_a_model_that_is_not_mean_pooled(tmp_path, backend):
    import shutil

    folder = tmp_path / "cls"
    shutil.copytree(packaged_model_path(), folder)
    config = folder / "1_Pooling" / "config.json"
    config.write_text(config.read_text().replace('"pooling_mode_mean_tokens": true', '"pooling_mode_mean_tokens": false')
                      .replace('"pooling_mode_cls_token": false', '"pooling_mode_cls_token": true'))
    with pytest.raises(EmbedderLoadError, match="mean Pooling"):
        Embedder(str(folder), backend=backend)


@pytest.mark.parametrize("pooling,accepted", [
    ({"embedding_dimension": 384, "pooling_mode": "mean", "include_prompt": True}, True),  # sentence-transformers 6
    ({"embedding_dimension": 384, "pooling_mode": "cls"}, False),
    ({"pooling_mode_mean_tokens": True, "pooling_mode_max_tokens": True}, False),  # mean and max concatenated
])
def test_pooling_configs_of_both_sentence_transformers_formats(tmp_path, pooling, accepted):
    import json
    import shutil

    from services.retrieval.onnx_encoder import OnnxExportError, check_mean_pooled

    folder = tmp_path / "model"
    shutil.copytree(packaged_model_path(), folder, ignore=shutil.ignore_patterns("*.safetensors"))
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
    if accepted:
        check_mean_pooled(str(folder))
    else:
        with pytest.raises(OnnxExportError, match="mean Pooling"):
            check_mean_pooled(str(folder))


def head_tail_pooled(texts: list[str], limit: int) -> np.ndarray:
    """The oracle on explicitly cut token ids: the first limit//2 and the last limit - limit//2 tokens."""
    tok = AutoTokenizer.from_pretrained(packaged_model_path())
    model = AutoModel.from_pretrained(packaged_model_path()).eval()
    rows = []
    for text in texts:
        ids = tok(text)["input_ids"]
        if len(ids) > limit:
            ids = ids[:limit // 2] + ids[-(limit - limit // 2):]
        with torch.no_grad():
            states = model(input_ids=torch.tensor([ids])).last_hidden_state[0]  # (tokens, dim)
        rows.append(torch.nn.functional.normalize(states.mean(0), dim=-1).numpy())
    return np.stack(rows)


@pytest.mark.parametrize("backend", BACKENDS)
def test_head_tail_cut_keeps_both_ends_like_the_oracle(embedder_of, backend):
    out = embedder_of(backend, max_seq_length=32, cut="head_tail").encode(TEXTS)
    cosine = (out * head_tail_pooled([DEFAULT_INSTRUCTION + t for t in TEXTS], 32)).sum(1)
    assert cosine.min() > MIN_COSINE[backend], cosine
    head = embedder_of(backend, max_seq_length=32).encode(TEXTS)
    assert (head[-1] * out[-1]).sum() < 0.99  # the long text's closing question changes its vector


def test_a_tuned_folder_brings_its_cut_and_length(tmp_path):
    import json
    import shutil

    from services.retrieval import TRAINING_INFO_FILE

    folder = tmp_path / "tuned"
    shutil.copytree(packaged_model_path(), folder)
    (folder / TRAINING_INFO_FILE).write_text(json.dumps({"cut": "head_tail", "max_seq_length": 64}))
    embedder = Embedder(str(folder), backend="torch")
    assert (embedder.cut, embedder.max_seq_length) == ("head_tail", 64)
    assert Embedder(str(folder), backend="torch", cut="head").cut == "head"
    with pytest.raises(EmbedderLoadError, match="cut must be one of"):
        Embedder(str(folder), backend="torch", cut="middle")


def test_length_groups_bound_the_padding_and_cover_every_row():
    from services.retrieval.batch_encoder import length_groups

    rng = np.random.default_rng(0)
    lengths = [int(n) for n in rng.integers(3, 257, size=200)]
    groups = length_groups(lengths, slack=0.2)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    for group in groups:
        longest = max(lengths[i] for i in group)
        padding = sum(longest - lengths[i] for i in group)
        assert padding <= 0.2 * longest * len(group)
    # as few groups as the bound allows: the next group's longest would not have fitted the one before
    for before, after in zip(groups, groups[1:]):
        assert lengths[after[0]] < 0.8 * lengths[before[0]]
    assert length_groups([5, 5, 5]) == [[0, 1, 2]] and length_groups([]) == []
