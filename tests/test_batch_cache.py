"""The slot KV cache of continuous batching: a decode step over rows of different lengths and rope deltas equals each
row's own batch-1 forward; rows join through their own prefill, leave by swapping, and the buffers grow."""
from __future__ import annotations

import pytest
import torch

import qwen2vl
from qwen2vl.batch_cache import SlotCache, decode_step

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return qwen2vl.load_pretrained(qwen2vl.write_tiny_checkpoint(tmp_path_factory.mktemp("slots") / "tiny"))


def _prompt(model, n: int, shift: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Text ids (1, n) and positions (3, 1, n) starting at `shift` (a nonzero rope delta, as video prompts have)."""
    ids = torch.randint(0, 1000, (1, n), generator=torch.Generator().manual_seed(seed))
    return ids, (torch.arange(n) + shift).view(1, 1, n).expand(3, 1, n)


@torch.no_grad()
def _alone(model, ids, positions):
    """Batch-1 prefill of a prompt in a cache of its own: (cache, last hidden (1, D))."""
    out = model(ids, position_ids=positions, use_cache=True, logits_to_keep=1, compute_logits=False)
    return out.past_key_values, out.hidden[:, -1]


@torch.no_grad()
def test_a_batched_step_equals_each_rows_own_forward(model):
    prompts = [_prompt(model, n, shift, seed) for n, shift, seed in ((5, 0, 1), (60, 40, 2), (9, -3, 3), (2, 7, 4))]
    slots = SlotCache.for_model(model, max_rows=4)
    alone = []
    for ids, positions in prompts:
        row, view = slots.add_row(ids.shape[1] + 1)
        model(ids, position_ids=positions, past_key_values=view, use_cache=True, logits_to_keep=1,
              compute_logits=False)
        slots.adopt(row, view)
        alone.append(_alone(model, ids, positions)[0])
    assert slots.lengths == [5, 60, 9, 2] and slots.rope_deltas == [0, 40, -3, 7]
    assert slots.capacity == 64                                  # each prefill wrote straight into its own row

    tokens = torch.tensor([11, 22, 33, 44])
    for step in range(8):                                        # past the first capacity: the buffers double
        if step == 3:                                            # the first row leaves; the last moves into its place
            assert slots.remove_row(0) == 3
            alone = [alone[3], alone[1], alone[2]]
            tokens = tokens[[3, 1, 2]]
        hidden = decode_step(model, slots, tokens)
        logits = model.lm_head(hidden)
        for b, cache in enumerate(alone):
            own = model(tokens[b].view(1, 1), past_key_values=cache, use_cache=True).logits[:, -1]
            torch.testing.assert_close(logits[b:b + 1], own, atol=1e-5, rtol=1e-5)
            assert int(logits[b].argmax()) == int(own.argmax())
        tokens = logits.argmax(-1)
    assert slots.capacity == 128 and slots.lengths == [10, 68, 17]
    # past each row's length the buffers hold zeros, never uninitialised memory: a masked NaN key would still
    # poison the attention products of its row
    for i in range(slots.num_layers):
        for row, n in enumerate(slots.lengths):
            assert not slots._keys[i][row, :, n:].any() and not slots._values[i][row, :, n:].any()


@torch.no_grad()
def test_a_row_that_outgrows_its_buffers_is_copied_in_and_errors_commit_nothing(model):
    slots = SlotCache.for_model(model, max_rows=2)
    ids, positions = _prompt(model, 80, 5, 9)
    row, view = slots.add_row(10)                                # too small a guess: the prefill moves elsewhere
    model(ids, position_ids=positions, past_key_values=view, use_cache=True, compute_logits=False)
    slots.adopt(row, view)
    alone, _ = _alone(model, ids, positions)
    for i in range(slots.num_layers):
        torch.testing.assert_close(slots._keys[i][0, :, :80], alone.layer(i)[0][0])
    with pytest.raises(ValueError, match="one token per active row"):
        decode_step(model, slots, torch.tensor([1, 2]))
    assert slots.lengths == [80]
    with pytest.raises(RuntimeError, match="rows are taken"):
        slots.add_row(4), slots.add_row(4)


@torch.no_grad()
def test_a_model_split_over_devices_decodes_its_rows_like_the_whole_model(model, tmp_path):
    """Each layer's slot buffers live on that layer's device and each step's write positions are carried there
    (qwen2vl/placement.py); three stages all on the CPU run that code path and must equal the whole model."""
    from qwen2vl.placement import plan_devices

    folder = qwen2vl.write_tiny_checkpoint(tmp_path / "tiny")          # the same seed as the module's model
    config = qwen2vl.load_pretrained(folder).config
    split = qwen2vl.load_pretrained(folder, device_map=plan_devices(config, ["cpu"] * 2, dtype=torch.float32))
    assert len(split.model.split_points) == 2
    steps = []
    for m in (model, split):
        slots = SlotCache.for_model(m, max_rows=2)
        assert slots.layer_devices == [layer.self_attn.k_proj.weight.device for layer in m.model.layers]
        for n, shift, seed in ((7, 3, 1), (30, 12, 2)):
            ids, positions = _prompt(m, n, shift, seed)
            row, view = slots.add_row(n + 1)
            m(ids, position_ids=positions, past_key_values=view, use_cache=True, logits_to_keep=1,
              compute_logits=False)
            slots.adopt(row, view)
        tokens, hidden = torch.tensor([5, 6]), []
        for _ in range(4):
            hidden.append(decode_step(m, slots, tokens))
            tokens = m.lm_head(hidden[-1]).argmax(-1)
        steps.append(torch.stack(hidden))
    assert torch.equal(steps[0], steps[1])
