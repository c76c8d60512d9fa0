"""pipeline.video.segments and pipeline.tubes: frames -> segments on a time grid -> pixel rows identical to qwen2vl.processor."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.video.files import decode_window
from pipeline.records import Segment, Tubes
from pipeline.tubes import normalize_rows, patchify_uint8, tubes_from_segment
from pipeline.video.segments import iter_segments, segment_frames
from qwen2vl import processor


def frames_at(times, height=56, width=84, seed=0):
    rng = np.random.default_rng(seed)
    return [(t, rng.integers(0, 256, (height, width, 3), dtype=np.uint8)) for t in times]


def reference_rows(frames_thwc: np.ndarray) -> tuple[np.ndarray, tuple]:
    rows, grid = processor.patchify(processor.normalize(frames_thwc))
    return rows.numpy(), grid


# ---------------------------------------------------------------- segments

def test_segments_follow_the_time_grid():
    items = frames_at([k / 2 for k in range(20)])                   # 0.0 .. 9.5 s at 2 fps
    segments = segment_frames("cam", items, segment_seconds=4.0, fps=2.0)
    assert [s.segment_id for s in segments] == ["cam:0", "cam:4000", "cam:8000"]
    assert [s.frames.shape[0] for s in segments] == [8, 8, 4]
    assert [(s.t0, s.t1) for s in segments] == [(0.0, 4.0), (4.0, 8.0), (8.0, 10.0)]
    assert not any(s.padded for s in segments)
    assert segments[1].frame_ts == [4.0, 4.5, 5.0, 5.5, 6.0, 6.5, 7.0, 7.5]
    assert np.array_equal(segments[1].frames[0], items[8][1])
    assert all(isinstance(s, Segment) and s.frames.dtype == np.uint8 for s in segments)


def test_odd_tail_is_padded_with_the_last_frame():
    items = frames_at([k / 2 for k in range(19)])
    last = segment_frames("cam", items, segment_seconds=4.0)[-1]
    assert last.padded and last.frames.shape[0] == 4
    assert np.array_equal(last.frames[3], last.frames[2]) and np.array_equal(last.frames[2], items[-1][1])
    assert last.frame_ts == [8.0, 8.5, 9.0, 9.5] and last.t1 == 9.5


def test_window_starting_mid_segment_and_size_change():
    # A window that starts at 3 s fills the rest of segment [0, 4) first; a new frame size starts a new segment.
    items = frames_at([3.0, 3.5, 4.0, 4.5]) + frames_at([5.0, 5.5], height=28, width=28)
    segments = list(iter_segments("cam", items, segment_seconds=4.0))
    assert [s.segment_id for s in segments] == ["cam:3000", "cam:4000", "cam:5000"]
    assert [s.frames.shape for s in segments] == [(2, 56, 84, 3), (2, 56, 84, 3), (2, 28, 28, 3)]


def test_segment_input_errors():
    with pytest.raises(ValueError, match="decrease"):
        segment_frames("cam", frames_at([1.0, 0.5]))
    with pytest.raises(ValueError, match="uint8"):
        segment_frames("cam", [(0.0, np.zeros((28, 28, 3), np.float32))])
    with pytest.raises(ValueError, match="even whole number"):
        segment_frames("cam", frames_at([0.0]), segment_seconds=7.5, fps=2.0)
    with pytest.raises(ValueError, match="pairs"):
        segment_frames("cam", [np.zeros((28, 28, 3), np.uint8)])
    with pytest.raises(ValueError):
        segment_frames("", frames_at([0.0]))                         # records reject an empty source id
    assert segment_frames("cam", []) == []


# ---------------------------------------------------------------- tubes

def test_tubes_match_the_reference_processor_exactly():
    items = frames_at([k / 2 for k in range(6)], height=56, width=112, seed=3)   # 6 frames, grid (3, 4, 8)
    (segment,) = segment_frames("cam", items, segment_seconds=4.0)
    tubes = tubes_from_segment(segment)
    ref_rows, ref_grid = reference_rows(segment.frames)
    assert isinstance(tubes, Tubes)
    assert tubes.grid_thw == tuple(ref_grid) == (3, 4, 8)
    assert tubes.pixel_rows.dtype == np.float32 and tubes.pixel_rows.shape == (3 * 4 * 8, 1176)
    assert np.array_equal(tubes.pixel_rows, ref_rows)              # same row order, same float32 bits
    assert tubes.tube_ts == [0.0, 1.0, 2.0]
    assert (tubes.segment_id, tubes.t0, tubes.t1, tubes.padded) == ("cam:0", 0.0, 3.0, False)

    raw = tubes_from_segment(segment, as_uint8=True)
    ref_raw, _ = processor.patchify(torch.from_numpy(segment.frames).permute(0, 3, 1, 2))
    assert raw.pixel_rows.dtype == np.uint8
    assert np.array_equal(raw.pixel_rows, ref_raw.numpy())


def test_normalize_rows_is_bit_exact_for_every_pixel_value():
    values = np.arange(256, dtype=np.uint8)
    rows = np.repeat(values, 3 * 392).reshape(256, 1176)         # row v holds value v in every channel
    ours = normalize_rows(rows)
    frames = np.broadcast_to(values[:, None, None, None], (256, 1, 1, 3))
    ref = processor.normalize(frames).numpy()[:, :, 0, 0]          # (256, 3)
    assert np.array_equal(ours.reshape(256, 3, 392), np.broadcast_to(ref[:, :, None], (256, 3, 392)))


def test_patchify_rejects_sizes_that_are_not_whole_merge_blocks():
    with pytest.raises(ValueError, match="multiple of 28"):
        patchify_uint8(np.zeros((2, 42, 56, 3), np.uint8))
    with pytest.raises(ValueError, match="multiple of 2"):
        patchify_uint8(np.zeros((3, 28, 28, 3), np.uint8))
    with pytest.raises(ValueError, match="Segment"):
        tubes_from_segment({"frames": np.zeros((2, 28, 28, 3), np.uint8)})


def test_decoded_clip_to_tubes(sample_videos):
    spec = sample_videos["odd_length_30fps"]                      # 37 frames: samples at 0, 0.5, 1.0 s
    (segment,) = segment_frames("clip", decode_window(spec.path))
    assert segment.padded and segment.frame_ts == [0.0, 0.5, 1.0, 1.5]
    tubes = tubes_from_segment(segment)
    t, h, w = tubes.grid_thw
    assert (t, h * 14, w * 14) == (2, *segment.frames.shape[1:3])
    assert tubes.tube_ts == [0.0, 1.0]
    assert np.array_equal(tubes.pixel_rows, reference_rows(segment.frames)[0])
