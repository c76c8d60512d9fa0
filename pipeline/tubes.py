"""Frames -> segments -> tubes: the hot path between decoding and the vision encoder.

A segment is `segment_seconds` of 2 fps frames (16 by default, an even count so frames pair into tubes).
A tube is one temporal patch: 2 consecutive frames, cut into 14x14 patches; its pixel rows follow
QWEN2VL_SPEC 1.2 exactly: rows (t, block_row, block_col, row_in_block, col_in_block), values (c, tp, py, px).
Patchify is one reshape + transpose + copy of the uint8 frames; normalization then writes float32 once.
"""
from __future__ import annotations

import math
from typing import Iterable, Iterator

import numpy as np

from pipeline.records import Segment, Tubes, segment_id_for

PATCH_SIZE = 14
TEMPORAL_PATCH_SIZE = 2
MERGE_SIZE = 2
_EPS = 1e-6


# ---------------------------------------------------------------- frames -> segments

def iter_segments(
    source_id: str,
    frames_with_ts: Iterable[tuple[float, np.ndarray]],
    segment_seconds: float = 8.0,
    fps: float = 2.0,
) -> Iterator[Segment]:
    """Group (ts, frame uint8 [H, W, 3]) in time order into segments on a fixed grid of `segment_seconds`.

    Segment k holds the frames with k*segment_seconds <= ts < (k+1)*segment_seconds, so ids are the same
    however the footage was split into windows. A frame-size change also starts a new segment. A segment
    with an odd frame count (the source ended early) repeats its last frame and is marked padded.
    """
    if not segment_seconds > 0:
        raise ValueError(f"segment_seconds must be > 0, got {segment_seconds}")
    if not fps > 0:
        raise ValueError(f"fps must be > 0, got {fps}")
    per_segment = segment_seconds * fps
    if abs(per_segment - round(per_segment)) > 1e-6 or round(per_segment) % TEMPORAL_PATCH_SIZE:
        raise ValueError(f"segment_seconds * fps must be an even whole number of frames, got "
                         f"{segment_seconds} * {fps} = {per_segment}")
    key, ts_buf, frame_buf = None, [], []
    last_ts = -math.inf
    for item in frames_with_ts:
        ts, frame = _check_item(item)
        if ts < last_ts:
            raise ValueError(f"frame timestamps must not decrease: {ts} after {last_ts}")
        last_ts = ts
        k = (math.floor(ts / segment_seconds + _EPS), frame.shape)
        if key is not None and k != key:
            yield _make_segment(source_id, ts_buf, frame_buf, fps)
            ts_buf, frame_buf = [], []
        key = k
        ts_buf.append(ts)
        frame_buf.append(frame)
    if frame_buf:
        yield _make_segment(source_id, ts_buf, frame_buf, fps)


def segment_frames(
    source_id: str,
    frames_with_ts: Iterable[tuple[float, np.ndarray]],
    segment_seconds: float = 8.0,
    fps: float = 2.0,
) -> list[Segment]:
    """List form of iter_segments."""
    return list(iter_segments(source_id, frames_with_ts, segment_seconds, fps))


def _check_item(item) -> tuple[float, np.ndarray]:
    try:
        ts, frame = item
    except (TypeError, ValueError):
        raise ValueError(f"expected (timestamp, frame) pairs, got {type(item).__name__}") from None
    if not isinstance(frame, np.ndarray) or frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3:
        raise ValueError(f"frame must be a uint8 array [H, W, 3], got {type(frame).__name__} "
                         f"{getattr(frame, 'dtype', None)} {getattr(frame, 'shape', None)}")
    ts = float(ts)
    if not math.isfinite(ts):
        raise ValueError(f"frame timestamp must be finite, got {ts}")
    return ts, frame


def _make_segment(source_id: str, ts: list[float], frames: list[np.ndarray], fps: float) -> Segment:
    t1 = ts[-1] + 1.0 / fps                    # the last real frame is on screen until the next sample time
    padded = len(frames) % TEMPORAL_PATCH_SIZE != 0
    if padded:                                 # reference rule: repeat the last frame to an even count
        frames = frames + [frames[-1]]
        ts = ts + [t1]
    return Segment(source_id=source_id, segment_id=segment_id_for(source_id, ts[0]), t0=ts[0], t1=t1, frame_ts=ts,
                   frames=np.stack(frames), padded=padded)


# ---------------------------------------------------------------- segments -> tubes

def patchify_uint8(frames: np.ndarray, patch_size: int = PATCH_SIZE, temporal_patch_size: int = TEMPORAL_PATCH_SIZE,
                   merge_size: int = MERGE_SIZE) -> tuple[np.ndarray, tuple[int, int, int]]:
    """uint8 frames [T, H, W, 3] -> (rows uint8 [gt*gh*gw, 3*tp*p*p], grid (gt, gh, gw)) in QWEN2VL_SPEC 1.2 order."""
    if not isinstance(frames, np.ndarray) or frames.ndim != 4 or frames.shape[3] != 3:
        raise ValueError(f"frames must be an array [T, H, W, 3], got {getattr(frames, 'shape', type(frames))}")
    n_frames, height, width, channels = frames.shape
    block = patch_size * merge_size
    if n_frames == 0 or n_frames % temporal_patch_size:
        raise ValueError(f"frame count must be a positive multiple of {temporal_patch_size}, got {n_frames}")
    if height % block or width % block:
        raise ValueError(f"frame size must be a multiple of {block} (use smart_resize), got {height}x{width}")
    gt, gh, gw = n_frames // temporal_patch_size, height // patch_size, width // patch_size
    # axes: 0 t, 1 tp, 2 block_row, 3 row_in_block, 4 py, 5 block_col, 6 col_in_block, 7 px, 8 c
    x = frames.reshape(gt, temporal_patch_size, gh // merge_size, merge_size, patch_size,
                       gw // merge_size, merge_size, patch_size, channels)
    # -> (t, block_row, block_col, row_in_block, col_in_block, c, tp, py, px): one copy, uint8 so it is cheap
    rows = np.ascontiguousarray(x.transpose(0, 2, 5, 3, 6, 8, 1, 4, 7))
    return rows.reshape(gt * gh * gw, channels * temporal_patch_size * patch_size * patch_size), (gt, gh, gw)


def normalize_rows(rows: np.ndarray) -> np.ndarray:
    """uint8 pixel rows [N, 3*k] (channel-major inside a row) -> float32 (x/255 - mean) / std per channel.

    Bit-identical to qwen2vl.processor.normalize: float32 x/255 rounds like the reference's float64 rescale,
    then the same float32 subtract and divide, done in place on one output buffer.
    """
    from qwen2vl.processor import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    n, dim = rows.shape
    per_channel = dim // 3
    mean = np.asarray(OPENAI_CLIP_MEAN, np.float32)[:, None]   # (3, 1)
    std = np.asarray(OPENAI_CLIP_STD, np.float32)[:, None]     # (3, 1)
    out = np.empty((n, 3, per_channel), np.float32)
    np.divide(rows.reshape(n, 3, per_channel), np.float32(255), out=out)   # uint8 -> float32 in the same pass
    out -= mean
    out /= std
    return out.reshape(n, dim)


def tubes_from_segment(segment: Segment, as_uint8: bool = False) -> Tubes:
    """Pixel rows of one segment. as_uint8=True leaves normalization to the encoder (4x less data to move)."""
    if not isinstance(segment, Segment):
        raise ValueError(f"expected a pipeline.records.Segment, got {type(segment).__name__}")
    rows, grid = patchify_uint8(segment.frames)
    pixel_rows = rows if as_uint8 else normalize_rows(rows)
    return Tubes(source_id=segment.source_id, t0=segment.t0, t1=segment.t1, pixel_rows=pixel_rows,
                 grid_thw=grid, tube_ts=segment.frame_ts[::TEMPORAL_PATCH_SIZE], padded=segment.padded,
                 segment_id=segment.segment_id)
