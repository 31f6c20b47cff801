"""Gain tables against an independent computation: PEFT holding each mixture as one "cat" adapter
and each fusion as one adapter of averaged A and B, each sample run alone (no padding, no
batching), log-likelihood from cross-entropy and accuracy from the argmax of full logits."""
from __future__ import annotations

import pytest
import torch
from peft_adapters import add_cat_adapter, add_fused_adapter

from services.composition import Composition, CompositionMode
from services.evaluation.generation import chat_prompt_ids
from services.lora.compatibility import CardTokens, candidates, measure_gains, retained, signature


def card_tokens(tokenizer, card, n: int = 4) -> CardTokens:
    samples = card.sample[:n]
    return CardTokens([chat_prompt_ids(tokenizer, s.inputs) for s in samples],
                      [tokenizer(s.targets, add_special_tokens=False).input_ids for s in samples])


def peft_measure(model, card: CardTokens) -> tuple[float, float]:
    """(accuracy, mean log-probability) of the targets, one unpadded sample at a time."""
    acc, lp = [], []
    for prompt, target in zip(card.prompts, card.targets):
        ids = torch.tensor([prompt + target])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, len(prompt) - 1:-1]  # (len(target), vocab)
        acc.append((logits.argmax(dim=-1) == torch.tensor(target)).float().mean().item())
        lp.append(-torch.nn.functional.cross_entropy(logits.float(), torch.tensor(target)).item())
    return sum(acc) / len(acc), sum(lp) / len(lp)


@pytest.fixture(scope="module")
def setup(tiny_zoo):
    from transformers import AutoTokenizer

    from services.lora.engine import CompositionEngine

    tokenizer = AutoTokenizer.from_pretrained(tiny_zoo.base)
    engine = CompositionEngine.from_pretrained(tiny_zoo.base, device="cpu", dtype="float32")
    for name, folder in tiny_zoo.adapters.items():
        engine.load_adapter(name, folder)
    cards = {c.model_name: card_tokens(tokenizer, c) for c in tiny_zoo.cards}
    return tiny_zoo, engine, cards


def test_candidates_are_own_compositions_and_leave_own_out_ones():
    groups = candidates("a", ["b", "c"])
    assert [signature(c) for c in groups["own"]] == [
        "base", "selection:a", "mixture:a+b", "fusion:a+b", "mixture:a+b+c", "fusion:a+b+c"]
    assert [signature(c) for c in groups["loo"]] == ["selection:b", "mixture:b+c", "fusion:b+c"]
    assert all(c.weights == (pytest.approx(1 / len(c.adapters)),) * len(c.adapters) for c in groups["own"][1:])
    assert candidates("a", []) == {"own": [Composition(), Composition.single("a")], "loo": []}


def test_gain_table_equals_peft(setup):
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    zoo, engine, cards = setup
    a, *neighbours = sorted(zoo.adapters)  # add, review_sentiment, uppercase
    table = measure_gains(engine, a, neighbours, cards[a])

    model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(zoo.base), zoo.adapters[a], adapter_name=a)
    for name in neighbours:
        model.load_adapter(zoo.adapters[name], adapter_name=name)
    model.eval()
    comps = [c for group in candidates(a, neighbours).values() for c in group]
    assert set(table.measures) == {signature(c) for c in comps}
    for i, comp in enumerate(comps):
        if comp.is_base:
            with model.disable_adapter():
                expected = peft_measure(model, cards[a])
        else:
            name = comp.adapters[0]
            if len(comp.adapters) > 1:
                name = f"oracle{i}"
                add = add_cat_adapter if comp.mode is CompositionMode.mixture else add_fused_adapter
                add(model, name, list(comp.adapters), list(comp.weights))
            model.set_adapter(name)
            expected = peft_measure(model, cards[a])
        measured = table.get(comp)
        assert (measured.accuracy, measured.logprob) == pytest.approx(expected, abs=1e-3), signature(comp)
    own, base = table.get(Composition.single(a)), table.get(Composition())
    assert own.logprob > base.logprob + 0.1  # a real gain for the shares to measure


def test_an_adapter_mixed_with_itself_keeps_its_gain(setup):
    """Guards the measure: the mixture of a with a copy of a is a again (retained 1)."""
    zoo, engine, cards = setup
    name = sorted(zoo.adapters)[0]
    engine.load_adapter(f"{name}-copy", zoo.adapters[name])
    table = measure_gains(engine, name, [f"{name}-copy"], cards[name])
    mix = table.get(Composition.of(CompositionMode.mixture, [name, f"{name}-copy"]))
    assert (mix.accuracy, mix.logprob) == pytest.approx(
        (table.get(Composition.single(name)).accuracy, table.get(Composition.single(name)).logprob), abs=1e-4)


def test_targets_are_cut_and_a_card_without_targets_is_refused(setup):
    zoo, engine, cards = setup
    name = sorted(zoo.adapters)[0]
    long = CardTokens(cards[name].prompts, [t * 8 for t in cards[name].targets])
    cut = CardTokens(cards[name].prompts, [(t * 8)[:3] for t in cards[name].targets])
    of_long = measure_gains(engine, name, [], long, max_target_tokens=3).measures
    of_cut = measure_gains(engine, name, [], cut, max_target_tokens=3).measures
    assert of_long.keys() == of_cut.keys()
    for key in of_long:
        assert of_long[key].to_list() == pytest.approx(of_cut[key].to_list(), abs=1e-4)
    with pytest.raises(ValueError, match="no card sample has a target"):
        measure_gains(engine, name, [], CardTokens(cards[name].prompts, [[] for _ in cards[name].prompts]))


def test_retained_share():
    assert retained(base=0.2, own=1.0, mixed=0.6) == pytest.approx(0.5)
    assert retained(base=0.2, own=1.0, mixed=0.0) == pytest.approx(-0.25)  # worse than the base model
    assert retained(base=0.5, own=0.4, mixed=0.0) == 1.0  # no gain to lose
