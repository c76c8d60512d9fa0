"""OneDNNLinear gives F.linear's fp32 results (to summation order) for every input shape a model feeds it, falls
back to F.linear where oneDNN's op does not apply, and use_onednn_linears_ changes no model output."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qwen2vl
from qwen2vl.onednn_linear import OneDNNLinear, onednn_available, use_onednn_linears_

pytestmark = pytest.mark.skipif(not onednn_available(), reason="this torch build has no oneDNN fp32 linear")


def _linear(bias: bool, gen: torch.Generator) -> nn.Linear:
    linear = nn.Linear(96, 40, bias=bias)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(40, 96, generator=gen))
        if bias:
            linear.bias.copy_(torch.randn(40, generator=gen))
    return linear


@pytest.mark.parametrize("bias", [True, False])
def test_matches_f_linear_for_every_row_count_and_layout(bias):
    gen = torch.Generator().manual_seed(0)
    linear = _linear(bias, gen)
    weight, b = linear.weight.detach().clone(), None if linear.bias is None else linear.bias.detach().clone()
    assert use_onednn_linears_(linear) == 1 and isinstance(linear, OneDNNLinear)
    inputs = [torch.randn(1, 96, generator=gen), torch.randn(7, 96, generator=gen),
              torch.randn(2, 5, 96, generator=gen), torch.randn(1200, 96, generator=gen),
              torch.randn(96, 9, generator=gen).t(),                                        # non-contiguous rows
              torch.randn(3, 96, 4, generator=gen).transpose(1, 2)]                          # (3, 4, 96) strided
    op = torch.ops.mkldnn._linear_pointwise
    with torch.inference_mode():
        for x in inputs:
            out = linear(x)
            assert out.shape == (*x.shape[:-1], 40) and out.dtype == torch.float32
            torch.testing.assert_close(out, F.linear(x, weight, b))                         # fp32 defaults
            assert torch.equal(out, op(x.contiguous(), weight, b, "none", [], ""))          # oneDNN made it
    with pytest.raises(RuntimeError):
        linear(torch.randn(2, 95))


def test_training_and_other_dtypes_take_f_linear():
    gen = torch.Generator().manual_seed(1)
    linear = _linear(True, gen)
    use_onednn_linears_(linear)
    x = torch.randn(4, 96, generator=gen, requires_grad=True)
    linear(x).square().sum().backward()                            # gradients as from nn.Linear
    ref = _linear(True, torch.Generator().manual_seed(1))
    x_ref = x.detach().clone().requires_grad_()
    ref(x_ref).square().sum().backward()
    assert torch.equal(x.grad, x_ref.grad) and torch.equal(linear.weight.grad, ref.weight.grad)
    half = linear.to(torch.bfloat16)
    with torch.inference_mode():
        out = half(torch.ones(2, 96, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16 and torch.equal(out, F.linear(torch.ones(2, 96, dtype=torch.bfloat16),
                                                                      half.weight, half.bias))


def test_a_bias_the_kernel_cannot_read_takes_f_linear():
    """oneDNN reads the bias as dense fp32: a strided view (or another dtype) must not reach it."""
    gen = torch.Generator().manual_seed(2)
    linear = _linear(False, gen)
    use_onednn_linears_(linear)
    linear.bias = nn.Parameter(torch.randn(80, generator=gen)[::2], requires_grad=False)        # stride 2
    x = torch.randn(5, 96, generator=gen)
    with torch.inference_mode():
        torch.testing.assert_close(linear(x), F.linear(x, linear.weight, linear.bias))


def test_text_decoder_gives_the_same_logits_and_keeps_its_state():
    cfg = qwen2vl.tiny_config()
    torch.manual_seed(0)
    plain = qwen2vl.Qwen2VL(cfg).eval()
    for p in plain.parameters():                       # non-trivial biases and norms, as in a trained model
        p.data.normal_(0, 0.05)
    fast = qwen2vl.Qwen2VL(cfg).eval()
    fast.load_state_dict(plain.state_dict())
    n_params = sum(p.numel() for p in fast.parameters())
    assert use_onednn_linears_(fast.model.layers) == 7 * cfg.text.num_hidden_layers
    assert sum(p.numel() for p in fast.parameters()) == n_params                    # no copy of any weight
    assert fast.state_dict().keys() == plain.state_dict().keys()
    ids = torch.randint(0, 1000, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        expected = plain(input_ids=ids).logits
        got = fast(input_ids=ids).logits
    torch.testing.assert_close(got, expected)
    assert torch.equal(got.argmax(-1), expected.argmax(-1))


def test_shared_weights_stay_shared():
    tied = nn.ModuleDict({"embed": nn.Embedding(50, 16), "head": nn.Linear(16, 50, bias=False),
                          "other": nn.Linear(16, 16)})
    tied["head"].weight = tied["embed"].weight                      # a tied output layer
    assert use_onednn_linears_(tied) == 2
    assert tied["head"].weight is tied["embed"].weight and isinstance(tied["head"], OneDNNLinear)
    with torch.inference_mode():
        x = torch.randn(3, 16)
        torch.testing.assert_close(tied["head"](x), x @ tied["embed"].weight.T)
