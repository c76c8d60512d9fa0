"""Typed records passed between ingest stages (docs/architecture.md, "Records between stages"), with plain-dict
forms for Ray Data rows.

Segment -> Tubes -> IndexedSegment. Every record carries `segment_id = f"{source_id}:{t0_ms}"` with
t0_ms = round(t0 * 1000): deterministic, so re-indexing the same footage hits the same ids (idempotent).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from qwen2vl.geometry import MERGE_SIZE, PATCH_DIM, PATCHES_PER_TOKEN, TEMPORAL_PATCH_SIZE


def segment_id_for(source_id: str, t0: float) -> str:
    """The deterministic id of the segment of `source_id` that starts at `t0` seconds."""
    _check_source_id(source_id)
    _check_time("t0", t0)
    return f"{source_id}:{round(float(t0) * 1000)}"


def source_of(segment_id: str) -> str:
    """The source id inside a segment id (source ids may themselves contain ':')."""
    if not isinstance(segment_id, str) or ":" not in segment_id:
        raise ValueError(f"segment_id must look like '<source_id>:<t0_ms>', got {segment_id!r}")
    source_id, t0_ms = segment_id.rsplit(":", 1)
    if not source_id or not t0_ms.lstrip("-").isdigit():
        raise ValueError(f"segment_id must look like '<source_id>:<t0_ms>', got {segment_id!r}")
    return source_id


def _check_source_id(source_id: Any) -> None:
    if not isinstance(source_id, str) or not source_id:
        raise ValueError(f"source_id must be a non-empty str, got {source_id!r}")


def _check_time(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{name} must be a number of seconds, got {value!r}")
    if not math.isfinite(float(value)):
        raise ValueError(f"{name} must be finite, got {value!r}")


def _check_span(source_id: str, segment_id: str | None, t0: float, t1: float) -> str:
    """Validate ids and times shared by all records; return the (possibly derived) segment id."""
    _check_source_id(source_id)
    _check_time("t0", t0)
    _check_time("t1", t1)
    if float(t1) < float(t0):
        raise ValueError(f"t1 ({t1}) must be >= t0 ({t0})")
    expected = segment_id_for(source_id, t0)
    if segment_id is None or segment_id == "":
        return expected
    if segment_id != expected:
        raise ValueError(f"segment_id {segment_id!r} does not match source_id and t0: expected {expected!r} "
                         f"(use pipeline.records.segment_id_for)")
    return segment_id


def _check_grid(grid_thw: Any) -> tuple[int, int, int]:
    try:
        grid = tuple(int(x) for x in grid_thw)
    except (TypeError, ValueError):
        raise ValueError(f"grid_thw must be three ints (t, h, w), got {grid_thw!r}") from None
    if len(grid) != 3 or min(grid) <= 0:
        raise ValueError(f"grid_thw must be three positive ints (t, h, w), got {grid_thw!r}")
    if grid[1] % MERGE_SIZE or grid[2] % MERGE_SIZE:
        raise ValueError(f"grid_thw h and w must be even (2x2 merge), got {grid}")
    return grid


def check_source_size(size: Any) -> tuple[int, int] | None:
    """(width, height) of the source frame, upright, in pixels; None (or a stored [0, 0]) when not known."""
    if size is None:
        return None
    try:
        w, h = (int(v) for v in size)
    except (TypeError, ValueError):
        raise ValueError(f"source_size must be (width, height) in pixels or None, got {size!r}") from None
    if w == 0 and h == 0:
        return None
    if w <= 0 or h <= 0:
        raise ValueError(f"source_size must be two positive ints (width, height), got {size!r}")
    return w, h


def _size_column(size: tuple[int, int] | None) -> np.ndarray:
    """source_size as a Ray Data column value: [0, 0] stands for None (a block needs one type per column)."""
    return np.asarray(size or (0, 0), np.int64)


def _check_tube_ts(tube_ts: Any, t: int) -> list[float]:
    ts = [float(x) for x in tube_ts]
    if len(ts) != t:
        raise ValueError(f"tube_ts must have one start time per temporal patch ({t}), got {len(ts)}")
    return ts


@dataclass
class Segment:
    """Decoded frames of one source over [t0, t1): frames uint8 [T, H, W, 3] with T even."""
    source_id: str
    segment_id: str                    # segment_id_for(source_id, t0); "" derives it
    t0: float
    t1: float
    frame_ts: list[float]
    frames: np.ndarray                 # (T, H, W, 3) uint8
    padded: bool = False               # last frame repeated to reach an even count (source ended early)
    source_size: tuple[int, int] | None = None   # (width, height) of the source frames, upright, before resizing

    def __post_init__(self):
        self.segment_id = _check_span(self.source_id, self.segment_id, self.t0, self.t1)
        self.source_size = check_source_size(self.source_size)
        f = self.frames
        if not isinstance(f, np.ndarray) or f.dtype != np.uint8 or f.ndim != 4 or f.shape[-1] != 3:
            raise ValueError(f"frames must be a uint8 numpy array [T, H, W, 3], got "
                             f"{type(f).__name__} {getattr(f, 'dtype', None)} {getattr(f, 'shape', None)}")
        if f.shape[0] == 0 or f.shape[0] % TEMPORAL_PATCH_SIZE:
            raise ValueError(f"frames must hold an even, non-zero number of frames (pairs make tubes), "
                             f"got {f.shape[0]}")
        self.frame_ts = [float(x) for x in self.frame_ts]
        if len(self.frame_ts) != f.shape[0]:
            raise ValueError(f"frame_ts has {len(self.frame_ts)} entries for {f.shape[0]} frames")


@dataclass
class Tubes:
    """Patch rows of one segment: pixel_rows [N, 1176] with N = t*h*w (row order: docs/model.md §2)."""
    segment_id: str                    # segment_id_for(source_id, t0); "" derives it
    source_id: str
    t0: float
    t1: float
    pixel_rows: Any                    # (N, 1176) float (numpy or torch); uint8 before normalization is allowed
    grid_thw: tuple[int, int, int]     # patch units
    tube_ts: list[float]               # start time of each temporal patch
    padded: bool = False
    source_size: tuple[int, int] | None = None   # (width, height) of the source frames (Segment.source_size)

    def __post_init__(self):
        self.segment_id = _check_span(self.source_id, self.segment_id, self.t0, self.t1)
        self.source_size = check_source_size(self.source_size)
        self.grid_thw = _check_grid(self.grid_thw)
        t, h, w = self.grid_thw
        self.tube_ts = _check_tube_ts(self.tube_ts, t)
        shape = tuple(getattr(self.pixel_rows, "shape", ()))
        if shape != (t * h * w, PATCH_DIM):
            raise ValueError(f"pixel_rows must be [t*h*w, {PATCH_DIM}] = [{t * h * w}, {PATCH_DIM}] "
                             f"for grid_thw {self.grid_thw}, got {shape}")

    def to_row(self) -> dict:
        return {"segment_id": self.segment_id, "source_id": self.source_id, "t0": float(self.t0),
                "t1": float(self.t1), "pixel_rows": np.asarray(self.pixel_rows),
                "grid_thw": np.asarray(self.grid_thw, np.int64), "tube_ts": np.asarray(self.tube_ts, np.float64),
                "padded": bool(self.padded), "source_size": _size_column(self.source_size)}

    @classmethod
    def from_row(cls, row: dict) -> "Tubes":
        return cls(source_id=str(row["source_id"]), t0=float(row["t0"]), t1=float(row["t1"]),
                   pixel_rows=np.asarray(row["pixel_rows"]), grid_thw=tuple(row["grid_thw"]),
                   tube_ts=list(row["tube_ts"]), padded=bool(row.get("padded", False)),
                   segment_id=str(row.get("segment_id") or ""), source_size=row.get("source_size"))


@dataclass
class IndexedSegment:
    """Merged visual tokens of one segment: tokens fp16 [t*h*w/4, D], tagged with the model that made them."""
    segment_id: str                    # segment_id_for(source_id, t0); "" derives it
    source_id: str
    t0: float
    t1: float
    grid_thw: tuple[int, int, int]
    tube_ts: list[float]
    tokens: np.ndarray                 # (t*h*w/4, D) float16; a torch fp16 tensor is converted
    model_id: str                      # checkpoint name + hash
    source_size: tuple[int, int] | None = None   # (width, height) of the source frames; None: not recorded

    def __post_init__(self):
        self.segment_id = _check_span(self.source_id, self.segment_id, self.t0, self.t1)
        self.source_size = check_source_size(self.source_size)
        self.grid_thw = _check_grid(self.grid_thw)
        t, h, w = self.grid_thw
        self.tube_ts = _check_tube_ts(self.tube_ts, t)
        if not isinstance(self.model_id, str) or not self.model_id:
            raise ValueError(f"model_id must be a non-empty str, got {self.model_id!r}")
        tok = self.tokens
        if not isinstance(tok, np.ndarray) and hasattr(tok, "detach"):  # torch tensor: keep pipeline numpy-first
            if str(tok.dtype) != "torch.float16":
                raise ValueError(f"tokens must be float16, got {tok.dtype}")
            tok = tok.detach().cpu().numpy()
        if not isinstance(tok, np.ndarray) or tok.dtype != np.float16 or tok.ndim != 2:
            raise ValueError(f"tokens must be a float16 array [n, D], got {type(tok).__name__} "
                             f"{getattr(tok, 'dtype', None)} {getattr(tok, 'shape', None)}")
        n_expected = t * h * w // PATCHES_PER_TOKEN
        if tok.shape[0] != n_expected or tok.shape[1] == 0:
            raise ValueError(f"tokens must be [t*h*w/4, D] = [{n_expected}, D>0] for grid_thw {self.grid_thw}, "
                             f"got {tuple(tok.shape)}")
        self.tokens = tok

    @property
    def n_tokens(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def token_dim(self) -> int:
        return int(self.tokens.shape[1])

    def to_row(self) -> dict:
        """Flat row: tokens as little-endian fp16 bytes plus their shape."""
        return {"segment_id": self.segment_id, "source_id": self.source_id, "t0": float(self.t0),
                "t1": float(self.t1), "grid_thw": list(self.grid_thw), "tube_ts": list(self.tube_ts),
                "model_id": self.model_id, "n_tokens": self.n_tokens, "token_dim": self.token_dim,
                "source_size": None if self.source_size is None else list(self.source_size),
                "tokens": np.ascontiguousarray(self.tokens, dtype="<f2").tobytes()}

    @classmethod
    def from_row(cls, row: dict) -> "IndexedSegment":
        raw = row["tokens"]
        if isinstance(raw, (bytes, bytearray, memoryview)):
            n, d = int(row["n_tokens"]), int(row["token_dim"])
            if len(raw) != n * d * 2:
                raise ValueError(f"tokens hold {len(raw)} bytes, expected n_tokens*token_dim*2 = {n * d * 2}")
            tokens = np.frombuffer(raw, dtype="<f2").astype(np.float16, copy=False).reshape(n, d)
        else:
            tokens = np.asarray(raw)
        return cls(source_id=str(row["source_id"]), t0=float(row["t0"]), t1=float(row["t1"]),
                   grid_thw=tuple(row["grid_thw"]), tube_ts=list(row["tube_ts"]), tokens=tokens,
                   model_id=str(row["model_id"]), segment_id=str(row.get("segment_id") or ""),
                   source_size=row.get("source_size"))
