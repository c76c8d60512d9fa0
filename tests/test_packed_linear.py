"""PackedLinear gives F.linear's fp32 results (to summation order) for every input shape a model feeds it, and
pack_linears_ swaps a model's linears without changing its outputs or touching shared weights."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qwen2vl
from qwen2vl.packed_linear import PackedLinear, pack_linears_, packing_available

pytestmark = pytest.mark.skipif(not packing_available(), reason="this torch build has no oneDNN fp32 linear")


@pytest.mark.parametrize("bias", [True, False])
def test_matches_f_linear_for_every_row_count_and_layout(bias):
    gen = torch.Generator().manual_seed(0)
    linear = nn.Linear(96, 40, bias=bias)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(40, 96, generator=gen))
        if bias:
            linear.bias.copy_(torch.randn(40, generator=gen))
    weight, b = linear.weight.detach().clone(), None if linear.bias is None else linear.bias.detach().clone()
    packed = PackedLinear(linear)
    inputs = [torch.randn(1, 96, generator=gen), torch.randn(7, 96, generator=gen),
              torch.randn(2, 5, 96, generator=gen), torch.randn(1200, 96, generator=gen),
              torch.randn(96, 9, generator=gen).t(),                                        # non-contiguous rows
              torch.randn(3, 96, 4, generator=gen).transpose(1, 2)]                          # (3, 4, 96) strided
    with torch.inference_mode():
        for x in inputs:
            out = packed(x)
            assert out.shape == (*x.shape[:-1], 40) and out.dtype == torch.float32
            torch.testing.assert_close(out, F.linear(x, weight, b))                         # fp32 defaults
    with pytest.raises(ValueError, match="96"):
        packed(torch.randn(2, 95))


def test_refuses_weights_it_cannot_pack():
    with pytest.raises(ValueError, match="fp32 CPU"):
        PackedLinear(nn.Linear(8, 8).half())


def test_packed_text_decoder_gives_the_same_logits():
    cfg = qwen2vl.tiny_config()
    torch.manual_seed(0)
    plain = qwen2vl.Qwen2VL(cfg).eval()
    for p in plain.parameters():                       # non-trivial biases and norms, as in a trained model
        p.data.normal_(0, 0.05)
    packed = qwen2vl.Qwen2VL(cfg).eval()
    packed.load_state_dict(plain.state_dict())
    assert pack_linears_(packed.model.layers) == 7 * cfg.text.num_hidden_layers
    assert not any(isinstance(m, nn.Linear) for m in packed.model.layers.modules())
    assert not any(isinstance(m, nn.Parameter) and m.dim() == 2 for m in packed.model.layers.parameters())
    ids = torch.randint(0, 1000, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        expected = plain(input_ids=ids).logits
        got = packed(input_ids=ids).logits
    torch.testing.assert_close(got, expected)
    assert torch.equal(got.argmax(-1), expected.argmax(-1))


def test_shared_weights_are_left_alone():
    tied = nn.ModuleDict({"embed": nn.Embedding(50, 16), "head": nn.Linear(16, 50, bias=False),
                          "other": nn.Linear(16, 16)})
    tied["head"].weight = tied["embed"].weight                      # a tied output layer
    assert pack_linears_(tied) == 1
    assert isinstance(tied["head"], nn.Linear) and isinstance(tied["other"], PackedLinear)
