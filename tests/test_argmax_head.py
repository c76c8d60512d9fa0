"""The screened greedy head picks exactly the token of the full fp32 output layer, including near-ties that fp16
cannot tell apart, and falls back when its inputs do not fit fp16."""
import pytest
import torch
import torch.nn.functional as F

import qwen2vl
from qwen2vl.argmax_head import ArgmaxHead
from tests.reference import build_prompt, build_reference_model, save_reference


def _weights(vocab=20000, dim=96, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(vocab, dim, generator=gen) * 0.02


def test_equals_full_argmax_over_many_states():
    weight = _weights()
    head = ArgmaxHead(weight)
    gen = torch.Generator().manual_seed(1)
    for scale in (0.1, 1.0, 30.0, 3000.0):
        hidden = torch.randn(64, weight.shape[1], generator=gen) * scale                   # (B, D)
        expected = F.linear(hidden, weight).argmax(dim=-1)
        assert torch.equal(head(hidden), expected)
    assert head.fallbacks == 0
    assert head.candidates_seen / (4 * 64) < 20          # the screen keeps a handful of rows, not the vocabulary


def test_near_ties_below_fp16_resolution_are_decided_in_fp32():
    weight = _weights(vocab=5000, dim=64, seed=2)
    hidden = torch.randn(1, 64, generator=torch.Generator().manual_seed(3))
    best = int(F.linear(hidden, weight).argmax())
    weight[best] = weight[best].half().float()                 # exactly representable, so small nudges round back
    # Rows that round to the same fp16 weights as the winner, nudged up or down by far less than fp16 resolution.
    nudge = hidden[0] / hidden[0].norm() ** 2 * 1e-5          # moves the logit by exactly +1e-5
    weight[100] = weight[best] + nudge
    weight[200] = weight[best] - nudge
    assert torch.equal(weight[100].half(), weight[best].half())
    head = ArgmaxHead(weight)
    assert int(head(hidden)) == 100 == int(F.linear(hidden, weight).argmax())
    weight[100] = weight[best] - nudge                         # now the original winner is best again
    head = ArgmaxHead(weight)
    assert int(head(hidden)) == best == int(F.linear(hidden, weight).argmax())
    # An exact tie goes to the lowest id, as torch.argmax.
    weight[7] = weight[best]
    head = ArgmaxHead(weight)
    assert int(head(hidden)) == min(7, best) == int(F.linear(hidden, weight).argmax())


def test_falls_back_outside_fp16_range_and_rejects_bad_shapes():
    weight = _weights(vocab=3000, dim=32, seed=4)
    head = ArgmaxHead(weight)
    hidden = torch.randn(2, 32, generator=torch.Generator().manual_seed(5)) * 1e6        # overflows fp16
    assert torch.equal(head(hidden), F.linear(hidden, weight).argmax(dim=-1))
    assert head.fallbacks == 1
    big = torch.zeros(1, 32)
    big[0, 0] = 60000.0                                            # fits fp16, but its logits do not
    heavy = weight.clone()
    heavy[11, 0] = 2.0
    assert int(ArgmaxHead(heavy)(big)) == 11
    with pytest.raises(ValueError, match=r"hidden must be \(batch, 32\)"):
        head(torch.zeros(2, 31))
    with pytest.raises(ValueError, match="fp32"):
        ArgmaxHead(weight.half())
    with pytest.raises(ValueError, match="fp16 range"):
        ArgmaxHead(torch.full((4, 4), 1e5))


def test_flat_logits_use_the_full_output_layer():
    weight = torch.zeros(3000, 16)
    weight[5:2000] = 1e-6                                          # 1,995 rows within fp16 error of each other
    weight[1234, 0] = 1.1e-6
    head = ArgmaxHead(weight, max_candidates=100)
    hidden = torch.ones(1, 16)
    assert int(head(hidden)) == 1234 == int(F.linear(hidden, weight).argmax())
    assert head.fallbacks == 1


@torch.no_grad()
def test_model_rebuilds_the_head_when_weights_change(tmp_path):
    save_reference(build_reference_model(seed=21), tmp_path)
    model = qwen2vl.load_pretrained(tmp_path)
    first = model.argmax_head()
    assert first is not None and model.argmax_head() is first
    inputs = build_prompt([("text", 6)], seed=9)
    before = model.generate(**inputs, max_new_tokens=4)
    model.lm_head.weight.mul_(-1.0)                               # in place: the fp16 copy is stale now
    assert model.argmax_head() is not first
    after = model.generate(**inputs, max_new_tokens=4)
    full = model(**inputs).logits[:, -1].argmax(-1)
    assert int(after[0, 0]) == int(full[0])
    assert not torch.equal(before, after)
    assert qwen2vl.load_pretrained(tmp_path, dtype=torch.bfloat16).argmax_head() is None
