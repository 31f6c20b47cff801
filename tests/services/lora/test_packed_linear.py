"""oneDNN-packed linears against nn.Linear (the oracle), alone and inside a whole model."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from services.lora.packed_linear import PackedLinear, can_pack, pack_linears

pytestmark = pytest.mark.skipif(not can_pack(torch.device("cpu"), torch.float32), reason="no oneDNN on this CPU")


@pytest.mark.parametrize("shape", [(1, 1, 48), (64, 1, 48), (7, 13, 48), (512, 48), (3, 48)])
@pytest.mark.parametrize("bias", [False, True])
def test_float32_matches_linear_for_any_batch_shape(shape, bias):
    torch.manual_seed(0)
    linear = nn.Linear(48, 80, bias=bias)
    x = torch.randn(*shape)
    with torch.inference_mode():
        out, ref = PackedLinear(linear, batch_hint=64)(x), linear(x)
    assert out.shape == ref.shape and out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not can_pack(torch.device("cpu"), torch.bfloat16), reason="no bfloat16 oneDNN on this CPU")
def test_bfloat16_is_bitwise_equal_to_linear():
    torch.manual_seed(0)
    linear = nn.Linear(96, 40).to(torch.bfloat16)
    x = torch.randn(9, 5, 96, dtype=torch.bfloat16)
    with torch.inference_mode():
        assert torch.equal(PackedLinear(linear, batch_hint=64)(x), linear(x))


def test_a_packed_model_gives_the_logits_of_the_plain_one():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=120, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    plain = LlamaForCausalLM(config).eval()
    packed = LlamaForCausalLM(config).eval()
    packed.load_state_dict(plain.state_dict())
    assert pack_linears(packed, batch_hint=8) == 2 * 7 + 1  # seven linears a layer and the LM head
    assert not any(isinstance(m, nn.Linear) for m in packed.modules())
    ids = torch.randint(0, 120, (3, 11))
    with torch.inference_mode():
        torch.testing.assert_close(packed(ids).logits, plain(ids).logits, rtol=1e-4, atol=1e-5)
    assert packed.get_output_embeddings().out_features == 120


def test_only_cpu_float32_and_bfloat16_pack():
    assert not can_pack(torch.device("cpu"), torch.float16)
    assert not can_pack(torch.device("cuda"), torch.float32)
