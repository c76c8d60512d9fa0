"""Footage selection, video blocks, time labels and temporal M-RoPE positions over a real index
(docs/architecture.md, "Temporal positions"; docs/model.md §8).

The index holds real clips (PyAV-encoded, decoded at 2 fps) whose tokens come from the tiny model's vision tower.
The helpers at the top are shared with test_decoder.py and test_search.py.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import qwen2vl
from deploy.footage import (block_label, build_prompt, format_span, full_positions, group_blocks, list_window,
                            temporal_ids)
from pipeline.checkpoints import model_id
from pipeline.video.files import decode_window
from pipeline.index import SegmentIndex
from pipeline.records import IndexedSegment
from pipeline.tubes import tubes_from_segment
from pipeline.video.segments import segment_frames
from tests.reference import answering_checkpoint, build_reference_model  # noqa: F401 - test_decoder imports it here
from tests.videos import encode_video

MIN_PIXELS, MAX_PIXELS = 28 * 28 * 4, 28 * 28 * 20
SEGMENT_S = 2.0
TUBE_S = 1.0                       # temporal_patch_size 2 / 2 fps
VIDEO_PAD = 151656


# ---- shared helpers ------------------------------------------------------------------------------------------------

def clip_frames(folder: Path, name: str, width: int = 160, height: int = 90, seconds: float = 6.0,
                pattern: str = "moving", seed: int = 0) -> list:
    """(media time, frame) pairs of a real encoded clip decoded at 2 fps."""
    spec = encode_video(folder / f"{name}.mp4", width, height, 30, seconds=seconds, pattern=pattern, seed=seed)
    return decode_window(str(spec.path), 0.0, None, fps=2.0, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)


@torch.no_grad()
def index_frames(index: SegmentIndex, model, mid: str, source: str, frames: list, offset: float = 0.0) -> list:
    """Index `frames` as `source` with times shifted by offset; tokens from the model's vision tower (fp16)."""
    records = []
    for seg in segment_frames(source, [(ts + offset, f) for ts, f in frames], segment_seconds=SEGMENT_S, fps=2.0):
        tubes = tubes_from_segment(seg)
        tokens = model.visual(torch.as_tensor(tubes.pixel_rows), torch.tensor([tubes.grid_thw])).half()
        records.append(IndexedSegment(segment_id=seg.segment_id, source_id=source, t0=seg.t0, t1=seg.t1,
                                      grid_thw=tubes.grid_thw, tube_ts=tubes.tube_ts, tokens=tokens, model_id=mid))
    index.add(records)
    return records


# ---- fixtures --------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("footage")
    ckpt = qwen2vl.write_tiny_checkpoint(root / "tiny")
    return {"ckpt": ckpt, "mid": model_id(ckpt), "model": qwen2vl.load_pretrained(ckpt),
            "processor": qwen2vl.Processor.from_pretrained(ckpt),
            "frames": clip_frames(root, "wide"), "square": clip_frames(root, "square", 96, 96, seconds=2.0)}


@pytest.fixture
def index(tmp_path):
    return SegmentIndex(tmp_path / "index")


def _plan(world, index, sources, question="What happens?", max_gap=60.0, start=None, end=None):
    rows = list_window(index, sources, start, end, world["mid"])
    blocks = group_blocks(rows, TUBE_S, max_gap)
    return build_prompt(world["processor"], blocks, question, world["model"].config)


def _video_temporal(plan, world):
    """Temporal ids of the video tokens relative to the first one, one per tube (block by block)."""
    positions, _ = full_positions(plan, world["model"].config)
    ids = torch.tensor(plan.input_ids)
    t_axis = positions[0, 0][ids == VIDEO_PAD]
    per_tube = []
    for block in plan.blocks:
        t, h, w = block.grid_thw
        per_block = t_axis[:t * h * w // 4].view(t, -1)
        assert (per_block == per_block[:, :1]).all()                 # one temporal id per tube
        per_tube.append((per_block[:, 0] - per_block[0, 0]).tolist())
        t_axis = t_axis[t * h * w // 4:]
    return per_tube


# ---- tests -----------------------------------------------------------------------------------------------------------

def test_temporal_ids_rule():
    assert temporal_ids([0.0, 1.0, 2.0, 3.0], 1.0, 60.0) == [0, 1, 2, 3]
    assert temporal_ids([10.0, 11.0, 20.0, 21.0], 1.0, 60.0) == [0, 1, 10, 11]          # a gap keeps its spacing
    assert temporal_ids([10.0, 11.0, 20.0, 21.0], 1.0, 3.0) == [0, 1, 5, 6]              # 8 s gap capped to 3 s
    assert temporal_ids([0.0, 1.0, 1.2], 1.0, 60.0) == [0, 1, 2]                         # never repeats an id
    assert temporal_ids([0.0, 2.0, 4.0], 2.0, 60.0) == [0, 1, 2]                         # 1 fps: 2 s per tube
    with pytest.raises(ValueError, match="must not decrease"):
        temporal_ids([1.0, 0.0], 1.0, 60.0)


def test_contiguous_clip_positions_equal_reference(world, index):
    index_frames(index, world["model"], world["mid"], "cam1", world["frames"])
    plan = _plan(world, index, ["cam1"])
    assert len(plan.blocks) == 1 and plan.blocks[0].grid_thw == (6, 6, 12)                # 3 segments, one block
    assert plan.blocks[0].temporal_ids == list(range(6))
    ids = torch.tensor([plan.input_ids])
    ours = full_positions(plan, world["model"].config)
    plain = qwen2vl.get_rope_index(ids, None, plan.video_grid_thw)
    reference = build_reference_model().model.get_rope_index(ids, None, plan.video_grid_thw)
    assert torch.equal(ours[0], plain[0]) and torch.equal(ours[1], plain[1])
    assert torch.equal(ours[0].long(), reference[0].long())
    assert torch.equal(ours[1].long().view(-1), reference[1].long().view(-1))
    # the cached prefix's positions are exactly the first part of the whole prompt's
    n = len(plan.prefix_ids)
    assert torch.equal(plan.prefix_positions, ours[0][:, :, :n])
    assert plan.input_ids[n - 1] == world["processor"].tokenizer.vision_end_id


def test_gapped_window_keeps_spacing_and_caps_long_gaps(world, index):
    model, mid = world["model"], world["mid"]
    index_frames(index, model, mid, "cam1", world["frames"], offset=0.0)      # tubes at 0..5 s
    index_frames(index, model, mid, "cam1", world["frames"], offset=30.0)     # tubes at 30..35 s: 24 s gap
    index_frames(index, model, mid, "cam1", world["frames"], offset=200.0)    # tubes at 200..205 s: 159 s gap
    plan = _plan(world, index, ["cam1"], max_gap=60.0)
    assert len(plan.blocks) == 1
    expected = list(range(6)) + list(range(30, 36)) + [36 + 60 + k for k in range(6)]   # 159 s shortened to 60
    assert plan.blocks[0].temporal_ids == expected
    assert _video_temporal(plan, world) == [expected]                        # what the model actually gets
    wide = _plan(world, index, ["cam1"], max_gap=1000.0)
    assert _video_temporal(wide, world) == [list(range(6)) + list(range(30, 36)) + list(range(200, 206))]
    assert block_label(plan.blocks[0]) == "[source cam1, 0:00:00-0:00:06, 0:00:30-0:00:36, 0:03:20-0:03:26]"
    # the window [29, 37) keeps only the middle run: a contiguous clip again
    middle = _plan(world, index, ["cam1"], start=29.0, end=37.0)
    assert middle.blocks[0].temporal_ids == list(range(6))
    assert [r["t0"] for r in middle.segments] == [30.0, 32.0, 34.0]


def test_blocks_per_source_run_and_resolution_in_time_order(world, index):
    model, mid = world["model"], world["mid"]
    index_frames(index, model, mid, "lobby", world["frames"], offset=1_700_000_000.0)
    index_frames(index, model, mid, "gate", world["frames"], offset=2.0)
    index_frames(index, model, mid, "gate", world["square"], offset=8.0)      # another resolution: a new block
    index_frames(index, model, mid, "gate", world["frames"], offset=10.0)     # back: a third block
    plan = _plan(world, index, ["lobby", "gate"])
    summary = [(b.source_id, b.grid_thw, b.segments[0]["t0"]) for b in plan.blocks]
    assert summary == [("gate", (6, 6, 12), 2.0), ("gate", (2, 6, 6), 8.0), ("gate", (6, 6, 12), 10.0),
                       ("lobby", (6, 6, 12), 1_700_000_000.0)]
    assert [block_label(b) for b in plan.blocks] == [
        "[source gate, 0:00:02-0:00:08]", "[source gate, 0:00:08-0:00:10]", "[source gate, 0:00:10-0:00:16]",
        "[source lobby, 2023-11-14 22:13:20-22:13:26 UTC]"]
    text = world["processor"].tokenizer.decode(plan.input_ids)
    assert text.index("[source gate, 0:00:02-0:00:08]<|vision_start|><|video_pad|>") > 0
    assert text.endswith("<|vision_end|>\nWhat happens?<|im_end|>\n<|im_start|>assistant\n")
    # the video tokens of each block are that block's own segments, in time order
    assert plan.segment_ids == ["gate:2000", "gate:4000", "gate:6000", "gate:8000", "gate:10000", "gate:12000",
                                "gate:14000", "lobby:1700000000000", "lobby:1700000002000", "lobby:1700000004000"]
    assert int((torch.tensor(plan.input_ids) == VIDEO_PAD).sum()) == plan.visual_tokens == 36 * 9 + 18


def test_prefix_and_suffix_ids_equal_the_whole_prompt(world, index):
    index_frames(index, world["model"], world["mid"], "cam1", world["frames"])
    plan = _plan(world, index, ["cam1"], question="Is there a white box, and where?")
    text = world["processor"].apply_chat_template(
        [{"role": "user", "content": [{"type": "text", "text": "[source cam1, 0:00:00-0:00:06]"}, {"type": "video"},
                                      {"type": "text", "text": "\nIs there a white box, and where?"}]}])
    whole = world["processor"].encode_with_grids(text, video_grid_thw=[(6, 6, 12)], return_tensors=None)
    assert plan.input_ids == whole["input_ids"][0]


def test_format_span():
    assert format_span(8.0, 72.0) == "0:00:08-0:01:12"
    assert format_span(3725.5, 3733.5) == "1:02:05-1:02:14"
    assert format_span(1_764_158_408.0, 1_764_158_472.0) == "2025-11-26 12:00:08-12:01:12 UTC"
    assert format_span(1_764_201_598.0, 1_764_201_606.0) == "2025-11-26 23:59:58-2025-11-27 00:00:06 UTC"


def test_window_errors(world, index):
    index_frames(index, world["model"], world["mid"], "cam1", world["frames"])
    with pytest.raises(LookupError, match="unknown source 'nope'"):
        list_window(index, ["cam1", "nope"], None, None, world["mid"])
    with pytest.raises(LookupError, match="no footage"):
        list_window(index, ["cam1"], 100.0, 200.0, world["mid"])
    with pytest.raises(LookupError, match="other models"):
        list_window(index, ["cam1"], None, None, "another@000000000000")
    for sources, start, end, match in (([], None, None, "non-empty list"), (["cam1"], 5.0, 5.0, "after start"),
                                       (["cam1"], float("nan"), None, "finite"), ([""], None, None, "non-empty str")):
        with pytest.raises(ValueError, match=match):
            list_window(index, sources, start, end, world["mid"])
    rows = list_window(index, "cam1", 1.0, 3.0, world["mid"])
    assert [r["segment_id"] for r in rows] == ["cam1:0", "cam1:2000"]
    blocks = group_blocks(rows, TUBE_S, 60.0)
    for bad in ("", "  ", "look <|video_pad|> here", None):
        with pytest.raises(ValueError, match="question"):
            build_prompt(world["processor"], blocks, bad, world["model"].config)


def test_prefix_memo_gives_the_same_plan(world, index):
    from deploy.footage import PrefixMemo
    index_frames(index, world["model"], world["mid"], "cam1", world["frames"])
    blocks = group_blocks(list_window(index, ["cam1"], None, None, world["mid"]), TUBE_S, 60.0)
    memo = PrefixMemo(max_entries=1)
    fresh = build_prompt(world["processor"], blocks, "First?", world["model"].config)
    first = build_prompt(world["processor"], blocks, "First?", world["model"].config, memo)
    again = build_prompt(world["processor"], blocks, "Second question?", world["model"].config, memo)
    assert first.prefix_ids == fresh.prefix_ids == again.prefix_ids
    assert torch.equal(again.prefix_positions, fresh.prefix_positions)
    assert again.suffix_ids != first.suffix_ids and len(memo._entries) == 1
    gapped = group_blocks(list_window(index, ["cam1"], None, None, world["mid"]), TUBE_S, 60.0)
    gapped[0].temporal_ids = [0, 1, 2, 3, 10, 11]                  # other positions: never the memo's entry
    other = build_prompt(world["processor"], gapped, "First?", world["model"].config, memo)
    assert other.prefix_ids == fresh.prefix_ids and not torch.equal(other.prefix_positions, fresh.prefix_positions)
