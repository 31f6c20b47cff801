"""The composition type's rules (one place for every mode) and the adapter key."""
from __future__ import annotations

import pytest

from services.composition import MODE_RULES, AdapterKey, Composition, CompositionError, CompositionMode


def test_every_mode_has_a_rule():
    assert set(MODE_RULES) == set(CompositionMode)


def test_selection_keeps_the_top_adapter_at_weight_one():
    row = Composition.of("selection", ["a", "b", "c"], [0.2, 0.3, 0.5])
    assert (row.mode, row.adapters, row.weights, row.fuses) == (CompositionMode.selection, ("a",), (1.0,), False)


def test_mixture_and_fusion_keep_given_weights_or_default_to_uniform():
    assert Composition.of("mixture", ["a", "b"], [0.7, 0.9]).weights == (0.7, 0.9)  # not renormalized
    fused = Composition.of("fusion", ["a", "b", "c"])
    assert fused.weights == pytest.approx((1 / 3,) * 3) and fused.fuses


@pytest.mark.parametrize("mode", list(CompositionMode))
def test_no_adapter_or_mode_none_is_the_base_model(mode):
    assert Composition.of(mode, []) == Composition()
    assert Composition.of(CompositionMode.none, ["a"], [1.0]).is_base


def test_refusals_name_the_problem():
    with pytest.raises(CompositionError, match="2 adapters but 1 weights"):
        Composition.of("mixture", ["a", "b"], [1.0])
    with pytest.raises(CompositionError, match="twice"):
        Composition.of("fusion", ["a", "a"], [0.5, 0.5])
    with pytest.raises(CompositionError, match="finite"):
        Composition.of("mixture", ["a", "b"], [0.5, float("nan")])
    with pytest.raises(ValueError):
        Composition.of("blend", ["a"])


def test_adapter_key_round_trips():
    key = AdapterKey("shout", "v3")
    assert str(key) == "shout@v3" and AdapterKey.parse("shout@v3") == key
    with pytest.raises(ValueError, match="name@version"):
        AdapterKey.parse("shout")
