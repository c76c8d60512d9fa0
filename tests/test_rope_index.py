"""get_rope_index against transformers 4.57.6 (exact equality), plus explicit temporal ids (docs/model.md §7, §8)."""
import pytest
import torch

from qwen2vl import get_rope_index
from tests.reference import build_prompt, build_reference_model, left_pad


@pytest.fixture(scope="module")
def reference_rope_index():
    return build_reference_model().model.get_rope_index


def _assert_same(ours, theirs):
    assert ours[0].shape == theirs[0].shape
    assert torch.equal(ours[0].long(), theirs[0].long())
    assert torch.equal(ours[1].long().view(-1, 1), theirs[1].long().view(-1, 1))


def test_text_only_with_and_without_padding(reference_rope_index):
    ids, mask = left_pad([torch.arange(3, 10), torch.arange(20, 24)])
    _assert_same(get_rope_index(ids), reference_rope_index(ids))
    _assert_same(get_rope_index(ids, attention_mask=mask), reference_rope_index(ids, attention_mask=mask))


@pytest.mark.parametrize("parts", [
    [("text", 3), ("image", (1, 4, 6)), ("text", 5)],
    [("text", 2), ("video", (3, 4, 4)), ("text", 4)],
    [("video", (8, 2, 2)), ("text", 3)],                       # temporal extent beyond the spatial one
    [("text", 2), ("image", (1, 2, 4)), ("text", 1), ("video", (2, 4, 2)), ("image", (1, 6, 2)), ("text", 3)],
])
def test_multimodal_matches_reference(reference_rope_index, parts):
    p = build_prompt(parts)
    args = (p["input_ids"], p.get("image_grid_thw"), p.get("video_grid_thw"))
    ours = get_rope_index(*args)
    _assert_same(ours, reference_rope_index(*args))
    assert int(ours[1]) <= 0                                   # a vision block never uses more ids than tokens


def test_batch_with_left_padding(reference_rope_index):
    a = build_prompt([("text", 2), ("video", (2, 4, 4)), ("text", 3), ("image", (1, 2, 2))], seed=1)
    b = build_prompt([("image", (1, 4, 2)), ("text", 6)], seed=2)
    ids, mask = left_pad([a["input_ids"][0], b["input_ids"][0]])
    image_grid = torch.cat([a["image_grid_thw"], b["image_grid_thw"]])
    ours = get_rope_index(ids, image_grid, a["video_grid_thw"], mask)
    _assert_same(ours, reference_rope_index(ids, image_grid, a["video_grid_thw"], mask))
    assert torch.all(ours[0][:, 1, mask[1] == 0] == 1)         # padded slots hold 1, like the reference


def test_default_temporal_ids_equal_reference(reference_rope_index):
    p = build_prompt([("text", 2), ("video", (4, 4, 2)), ("text", 2), ("video", (2, 2, 2))])
    grid = p["video_grid_thw"]
    explicit = [torch.arange(4), torch.arange(2)]
    ours = get_rope_index(p["input_ids"], None, grid, video_temporal_ids=explicit)
    _assert_same(ours, reference_rope_index(p["input_ids"], None, grid))


def test_temporal_ids_keep_gaps():
    # text(2) + video grid (3, 4, 4) -> merged 3x2x2 = 12 tokens at temporal offsets 0, 2, 7 + text(2)
    p = build_prompt([("text", 2), ("video", (3, 4, 4)), ("text", 2)])
    pos, delta = get_rope_index(p["input_ids"], None, p["video_grid_thw"],
                                video_temporal_ids=[torch.tensor([0, 2, 7])])
    base = 3                                                   # 2 text tokens + <|vision_start|>
    vision = pos[:, 0, base:base + 12]
    assert vision[0].tolist() == [base + t for t in (0, 0, 0, 0, 2, 2, 2, 2, 7, 7, 7, 7)]
    assert vision[1].tolist() == [base + h for h in (0, 0, 1, 1) * 3]
    assert vision[2].tolist() == [base + w for w in (0, 1) * 6]
    after = pos[:, 0, base + 12]                               # <|vision_end|>: max over all axes + 1
    assert after.tolist() == [base + 8] * 3
    assert int(delta) == int(pos.max()) + 1 - p["input_ids"].shape[1]


def test_bad_inputs_raise():
    p = build_prompt([("text", 2), ("video", (2, 4, 4)), ("text", 2)])
    with pytest.raises(ValueError, match="one per video"):
        get_rope_index(p["input_ids"], None, p["video_grid_thw"], video_temporal_ids=[])
    with pytest.raises(ValueError, match="length grid_t"):
        get_rope_index(p["input_ids"], None, p["video_grid_thw"], video_temporal_ids=[torch.arange(3)])
    with pytest.raises(ValueError, match="more videos than rows"):
        get_rope_index(p["input_ids"], torch.tensor([[1, 2, 2]]), None)
    wrong_grid = torch.tensor([[2, 4, 8]])                     # promises 16 pads, the prompt has 8
    with pytest.raises(ValueError, match="placeholder counts"):
        get_rope_index(p["input_ids"], None, wrong_grid)
