"""The peer benchmark: its workload (Zipf popularity, Poisson arrivals, adapter variants) and bad input."""
import itertools
from collections import Counter
from fractions import Fraction

import pytest
from safetensors.torch import load_file
from transformers import AutoConfig

from cluster.bench.peer_workload import (
    Adapter,
    make_variants,
    open_loop_requests,
    poisson_arrivals,
    popularity_order,
    siblings,
    zipf_probabilities,
)
from services.lora.adapter_files import read_adapter


def test_zipf_probabilities_follow_one_over_rank():
    # s = 1 over 4 ranks: 1, 1/2, 1/3, 1/4 over the harmonic number 25/12
    assert zipf_probabilities(4, 1.0) == pytest.approx([float(Fraction(12, 25) / k) for k in (1, 2, 3, 4)])
    assert zipf_probabilities(5, 0.0) == pytest.approx([0.2] * 5)
    p = zipf_probabilities(10, 2.0)
    assert sum(p) == pytest.approx(1.0) and p[0] / p[2] == pytest.approx(9.0)
    with pytest.raises(ValueError):
        zipf_probabilities(0, 1.0)
    with pytest.raises(ValueError):
        zipf_probabilities(3, -1.0)


def test_poisson_arrivals_are_reproducible_by_seed():
    times = poisson_arrivals(5.0, 400.0, seed=3)
    assert times == poisson_arrivals(5.0, 400.0, seed=3)
    assert times != poisson_arrivals(5.0, 400.0, seed=4)
    assert times == sorted(times) and 0 < times[0] and times[-1] < 400.0
    # 2000 expected arrivals; the count of a Poisson process has standard deviation sqrt(2000) ~ 45
    assert abs(len(times) - 2000) < 200
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert sum(gaps) / len(gaps) == pytest.approx(0.2, rel=0.1)
    with pytest.raises(ValueError):
        poisson_arrivals(0.0, 10.0, seed=0)


def _adapters(n: int) -> list[Adapter]:
    return [Adapter(f"a{i}", None, f"t{i % 3}", f"d{i % 3}") for i in range(n)]


def test_requests_choose_adapters_by_zipf_popularity():
    adapters = _adapters(10)
    queries = {"t0": [0, 3], "t1": [1, 4], "t2": [2, 5]}
    requests = open_loop_requests(adapters, queries, rate=50.0, seconds=400.0, zipf=1.0, seed=1)
    assert requests == open_loop_requests(adapters, queries, rate=50.0, seconds=400.0, zipf=1.0, seed=1)
    counts = Counter(r.adapter for r in requests)
    ranked = popularity_order([a.name for a in adapters], seed=1)
    expected = zipf_probabilities(10, 1.0)
    for name, p in zip(ranked, expected):  # 20000 draws: each share within 1.5 points of its probability
        assert counts[name] / len(requests) == pytest.approx(p, abs=0.015)
    by_name = {a.name: a for a in adapters}
    assert all(r.query in queries[by_name[r.adapter].task] for r in requests)  # a query of the adapter's task


def test_siblings_are_the_other_adapters_of_the_domain_first():
    originals = [Adapter("x1", None, "x1", "x"), Adapter("y1", None, "y1", "y"), Adapter("x2", None, "x2", "x"),
                 Adapter("x3", None, "x3", "x"), Adapter("y2", None, "y2", "y")]
    assert siblings(originals[0], originals) == ["x2", "x3"]
    assert siblings(originals[1], originals) == ["y2", "x1"]  # a domain short of partners: zoo order
    variant = Adapter("x1-v1", None, "x1", "x")
    assert siblings(variant, originals) == ["x2", "x3"]  # never its own source
    with pytest.raises(ValueError):
        siblings(originals[0], originals[:1])


def test_variants_are_valid_peft_folders_that_differ_from_their_source(tiny_zoo, tmp_path):
    domains = {c.model_name: c.domain for c in tiny_zoo.cards}
    originals = [Adapter(name, path, name, domains[name]) for name, path in tiny_zoo.adapters.items()]
    adapters = make_variants(originals, 7, tmp_path, seed=0)
    assert [a.name for a in adapters[:3]] == [a.name for a in originals]
    variants = adapters[3:]
    assert [v.name for v in variants] == [f"{o.name}-v1" for o in originals] + [f"{originals[0].name}-v2"]
    config = AutoConfig.from_pretrained(tiny_zoo.base)
    for variant in variants:
        source = next(o for o in originals if o.name == variant.task)
        ours, theirs = (read_adapter(a.path, base_config=config) for a in (variant, source))
        assert ours.rank == theirs.rank and ours.scaling == theirs.scaling
        for layer in theirs.a:
            assert ours.a[layer].equal(theirs.a[layer])
            factor = ours.b[layer].norm() / theirs.b[layer].norm()
            assert 0.5 <= factor <= 1.5 and not ours.b[layer].equal(theirs.b[layer])
    # the two variants of one source are scaled apart
    first, second = (load_file(v.path / "adapter_model.safetensors") for v in (variants[0], variants[3]))
    assert any(not first[k].equal(second[k]) for k in first if "lora_B" in k)
    # cached: a second call rewrites nothing; another seed remakes them
    stamp = (variants[0].path / "adapter_model.safetensors").stat().st_mtime_ns
    assert make_variants(originals, 7, tmp_path, seed=0) == adapters
    assert (variants[0].path / "adapter_model.safetensors").stat().st_mtime_ns == stamp
    before = load_file(variants[0].path / "adapter_model.safetensors")
    make_variants(originals, 7, tmp_path, seed=1)
    after = load_file(variants[0].path / "adapter_model.safetensors")
    assert any(not before[k].equal(after[k]) for k in before if "lora_B" in k)


def test_the_benchmark_refuses_bad_input_in_one_sentence(tiny_zoo, tmp_path, capsys):
    from cluster.bench.peer import main

    assert main(["--zoo", str(tmp_path / "nowhere"), "--out", str(tmp_path)]) == 2
    assert "build it with `loraretriever demo build`" in capsys.readouterr().err
    assert main(["--seconds", "0", "--out", str(tmp_path)]) == 2
    assert "--seconds must be positive" in capsys.readouterr().err
    assert main(["--zoo", str(tiny_zoo.root), "--offline-only", "--vllm-python", str(tmp_path / "python"),
                 "--out", str(tmp_path)]) == 2
    assert "not a python that can import vllm" in capsys.readouterr().err
    assert not (tmp_path / "peer.json").exists()
