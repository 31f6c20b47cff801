"""Compatibility scores against an independent computation: PEFT holding the equal-weight mixture
as one "cat" adapter, each sample run alone (no padding, no batching), log-likelihood from
cross-entropy."""
from __future__ import annotations

import pytest
import torch

from services.composition import Composition
from services.evaluation.generation import chat_prompt_ids
from services.lora.compatibility import CardTokens, pair_score, retained, target_logprobs


def card_tokens(tokenizer, card, n: int = 4) -> CardTokens:
    samples = card.sample[:n]
    return CardTokens([chat_prompt_ids(tokenizer, s.inputs) for s in samples],
                      [tokenizer(s.targets, add_special_tokens=False).input_ids for s in samples])


def peft_mean_logprob(model, card: CardTokens) -> float:
    """Mean over samples of the mean per-token target log-probability, one unpadded sample at a time."""
    values = []
    for prompt, target in zip(card.prompts, card.targets):
        ids = torch.tensor([prompt + target])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, len(prompt) - 1:-1]  # (len(target), vocab)
        values.append(-torch.nn.functional.cross_entropy(logits.float(), torch.tensor(target)).item())
    return sum(values) / len(values)


@pytest.fixture(scope="module")
def setup(tiny_zoo):
    from transformers import AutoTokenizer

    from services.lora.engine import CompositionEngine

    tokenizer = AutoTokenizer.from_pretrained(tiny_zoo.base)
    engine = CompositionEngine.from_pretrained(tiny_zoo.base, device="cpu")
    for name, folder in tiny_zoo.adapters.items():
        engine.load_adapter(name, folder)
    cards = {c.model_name: card_tokens(tokenizer, c) for c in tiny_zoo.cards}
    return tiny_zoo, engine, cards


def test_pair_score_equals_peft(setup):
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer
    from transformers import LlamaForCausalLM

    zoo, engine, cards = setup
    a, b = sorted(zoo.adapters)[:2]
    ours = pair_score(engine, a, cards[a], b, cards[b])

    model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(zoo.base), zoo.adapters[a], adapter_name=a)
    model.load_adapter(zoo.adapters[b], adapter_name=b)
    model.add_weighted_adapter([a, b], [0.5, 0.5], "mix", combination_type="cat")
    for module in model.modules():  # the scalings are inside the cat adapter's A already
        if isinstance(module, LoraLayer) and "mix" in module.scaling:
            module.scaling["mix"] = 1.0
    model.eval()

    def mean_logprob(adapter: str | None, card: CardTokens) -> float:
        if adapter is None:
            with model.disable_adapter():
                return peft_mean_logprob(model, card)
        model.set_adapter(adapter)
        return peft_mean_logprob(model, card)

    assert mean_logprob(a, cards[a]) > mean_logprob(None, cards[a]) + 0.1  # a real gain for the share to measure
    expected_ab = retained(mean_logprob(None, cards[a]), mean_logprob(a, cards[a]), mean_logprob("mix", cards[a]))
    expected_ba = retained(mean_logprob(None, cards[b]), mean_logprob(b, cards[b]), mean_logprob("mix", cards[b]))
    assert ours.retained_ab == pytest.approx(expected_ab, abs=1e-3)
    assert ours.retained_ba == pytest.approx(expected_ba, abs=1e-3)
    assert ours.score == min(ours.retained_ab, ours.retained_ba)


def test_an_adapter_mixed_with_itself_keeps_its_gain(setup):
    """Guards the measure: the mixture of a with a copy of a is a again (retained 1)."""
    zoo, engine, cards = setup
    name = sorted(zoo.adapters)[0]
    engine.load_adapter(f"{name}-copy", zoo.adapters[name])
    score = pair_score(engine, name, cards[name], f"{name}-copy", cards[name])
    assert score.retained_ab == pytest.approx(1.0, abs=1e-3) and score.retained_ba == pytest.approx(1.0, abs=1e-3)


def test_batched_logprobs_equal_one_at_a_time(setup):
    zoo, engine, cards = setup
    name = sorted(zoo.adapters)[0]
    card = cards[name]
    batched = target_logprobs(engine, card.prompts, card.targets, [Composition.single(name)] * len(card.prompts))
    alone = [target_logprobs(engine, [p], [t], [Composition.single(name)]).item()
             for p, t in zip(card.prompts, card.targets)]
    assert batched.tolist() == pytest.approx(alone, abs=1e-4)


def test_retained_share():
    assert retained(base=-5.0, own=-1.0, mixed=-3.0) == pytest.approx(0.5)
    assert retained(base=-5.0, own=-1.0, mixed=-6.0) == pytest.approx(-0.25)  # worse than the base model
    assert retained(base=-1.0, own=-2.0, mixed=-9.0) == 1.0  # no gain to lose
