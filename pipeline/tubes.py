"""Segments -> tubes: the hot path between decoding and the vision encoder.

A tube is one temporal patch: 2 consecutive frames, cut into 14x14 patches; its pixel rows follow the model's layout
exactly (docs/model.md §2): rows (t, block_row, block_col, row_in_block, col_in_block), values (c, tp, py, px).
Patchify is one reshape + transpose + copy of the uint8 frames; normalization then writes float32 once.
Segments themselves come from the segment rule in pipeline/video/segments.py.
"""
from __future__ import annotations

import numpy as np

from pipeline.records import Segment, Tubes
from qwen2vl.geometry import FACTOR, MERGE_SIZE, PATCH_SIZE, TEMPORAL_PATCH_SIZE, smart_resize


# ---------------------------------------------------------------- segments -> tubes

def patchify_uint8(frames: np.ndarray, patch_size: int = PATCH_SIZE, temporal_patch_size: int = TEMPORAL_PATCH_SIZE,
                   merge_size: int = MERGE_SIZE) -> tuple[np.ndarray, tuple[int, int, int]]:
    """uint8 frames [T, H, W, 3] -> (rows uint8 [gt*gh*gw, 3*tp*p*p], grid (gt, gh, gw)) in the model's row order."""
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
                 segment_id=segment.segment_id, source_size=segment.source_size)


# ---------------------------------------------------------------- the long-video tier

def long_grid(grid_thw, long_pixels: int) -> tuple[int, int, int]:
    """The grid of a segment's long-tier tubes: its frames (at the index resolution) resized to at most long_pixels
    per frame, aspect ratio kept (smart_resize). Never larger than the segment's own grid, and a pure function of it,
    so a planner knows every long-tier size from listings alone."""
    t, h, w = (int(x) for x in grid_thw)
    if not long_pixels:
        return t, h, w
    height, width = smart_resize(h * PATCH_SIZE, w * PATCH_SIZE, min_pixels=4 * FACTOR * FACTOR,
                                 max_pixels=int(long_pixels))
    if height * width >= h * w * PATCH_SIZE * PATCH_SIZE:
        return t, h, w
    return t, height // PATCH_SIZE, width // PATCH_SIZE


def resize_rows(rows, grid_thw, to_grid):
    """uint8 pixel rows (torch, [t*h*w, 1176]) of one segment -> the rows of the same frames resized to `to_grid`.

    Undoes the patch layout (docs/model.md §2) back to frames, resizes them with antialiased bicubic filtering (the
    reference video utilities' filter), rounds back to uint8 and patchifies again. Runs on the rows' device.
    """
    import torch
    import torch.nn.functional as F

    t, h, w = (int(x) for x in grid_thw)
    _, h2, w2 = (int(x) for x in to_grid)
    m, p, tp = MERGE_SIZE, PATCH_SIZE, TEMPORAL_PATCH_SIZE
    # rows axes: (t, block_row, block_col, row_in_block, col_in_block, c, tp, py, px)
    x = rows.reshape(t, h // m, w // m, m, m, 3, tp, p, p)
    frames = x.permute(0, 6, 5, 1, 3, 7, 2, 4, 8).reshape(t * tp, 3, h * p, w * p)     # (T, 3, H, W)
    small = F.interpolate(frames.float(), size=(h2 * p, w2 * p), mode="bicubic", antialias=True, align_corners=False)
    small = small.round_().clamp_(0, 255).to(torch.uint8)                                  # (T, 3, H2, W2)
    y = small.reshape(t, tp, 3, h2 // m, m, p, w2 // m, m, p)
    # -> (t, block_row, block_col, row_in_block, col_in_block, c, tp, py, px)
    return y.permute(0, 3, 6, 4, 7, 2, 1, 5, 8).reshape(t * h2 * w2, 3 * tp * p * p).contiguous()
