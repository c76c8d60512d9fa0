"""The segment rule, shared by archives and live feeds: sampled frames -> segments on a fixed time grid.

Segment k of a source holds the frames with k*segment_seconds <= t < (k+1)*segment_seconds, so a segment's id
(source and start time) is the same however the footage was split into read windows or connections. A frame-size
change (of the resized or of the source frame) starts a new segment. A segment is emitted as soon as it is full, without waiting for the next frame (live
latency); a partial one (window change, end of file, disconnect) repeats its last frame to an even count, stamped
at t1, and is marked padded: the model takes frames in pairs (docs/model.md §2). The last real frame stays on
screen until the next sample time, so t1 = last frame time + 1/fps.
"""
from __future__ import annotations

import collections
import math
import threading
from typing import Iterable, Iterator

import numpy as np

from pipeline.records import Segment
from qwen2vl.geometry import TEMPORAL_PATCH_SIZE

_EPS = 1e-6                         # seconds; absorbs float error in pts * time_base and grid arithmetic


def frames_per_segment(fps: float, segment_seconds: float) -> int:
    """fps * segment_seconds as a whole, even, non-zero number of frames; ValueError naming both otherwise."""
    if not fps > 0 or not segment_seconds > 0:
        raise ValueError(f"fps and segment_seconds must be > 0, got {fps} and {segment_seconds}")
    frames = fps * segment_seconds
    n = round(frames)
    if abs(frames - n) > 1e-6 or n < TEMPORAL_PATCH_SIZE or n % TEMPORAL_PATCH_SIZE:
        raise ValueError(f"fps * segment_seconds must be an even whole number of frames (two frames per tube), "
                         f"got {fps} * {segment_seconds} = {frames:g}")
    return n


class SegmentBuilder:
    """Feeds frames in time order, one at a time; add() and flush() return the segments they complete."""

    def __init__(self, source_id: str, fps: float, segment_seconds: float):
        self.frames_per_segment = frames_per_segment(fps, segment_seconds)
        self.source_id, self.fps, self.segment_seconds = source_id, fps, segment_seconds
        self._key: tuple | None = None
        self._ts: list[float] = []
        self._frames: list[np.ndarray] = []
        self._last_t = -math.inf

    def add(self, t: float, frame: np.ndarray, source_size: tuple[int, int] | None = None) -> list[Segment]:
        """Add one frame (uint8 [H, W, 3]) shown from time t; return the segments this completes (0, 1 or 2).
        source_size: (width, height) of the frame as the source delivered it, upright, before resizing."""
        t = _check_frame(t, frame)
        source_size = None if source_size is None else tuple(int(v) for v in source_size)
        if t < self._last_t:
            raise ValueError(f"frame timestamps must not decrease: {t} after {self._last_t}")
        self._last_t = t
        done = []
        key = (math.floor(t / self.segment_seconds + _EPS), frame.shape, source_size)
        if self._key is not None and key != self._key:
            done.extend(self.flush())
        self._key = key
        self._ts.append(t)
        self._frames.append(frame)
        if len(self._frames) >= self.frames_per_segment:
            done.extend(self.flush())
        return done

    @property
    def pending(self) -> int:
        """Frames of the segment being filled."""
        return len(self._frames)

    def flush(self) -> list[Segment]:
        """The partial segment (padded to an even count), if any."""
        if not self._frames:
            return []
        ts, frames, source_size = self._ts, self._frames, self._key[2]
        self._key, self._ts, self._frames = None, [], []
        t1 = ts[-1] + 1.0 / self.fps
        padded = len(frames) % TEMPORAL_PATCH_SIZE != 0
        if padded:
            frames, ts = frames + [frames[-1]], ts + [t1]
        return [Segment(source_id=self.source_id, segment_id="", t0=ts[0], t1=t1, frame_ts=ts,
                        frames=np.stack(frames), padded=padded, source_size=source_size)]


def iter_segments(source_id: str, frames_with_ts: Iterable[tuple[float, np.ndarray]], segment_seconds: float = 8.0,
                  fps: float = 2.0, source_size: tuple[int, int] | None = None) -> Iterator[Segment]:
    """(t, frame uint8 [H, W, 3]) pairs in time order -> segments, by the rule above; source_size is that of every
    frame (a file's)."""
    builder = SegmentBuilder(source_id, fps, segment_seconds)
    for item in frames_with_ts:
        try:
            t, frame = item
        except (TypeError, ValueError):
            raise ValueError(f"expected (timestamp, frame) pairs, got {type(item).__name__}") from None
        yield from builder.add(t, frame, source_size)
    yield from builder.flush()


def segment_frames(source_id: str, frames_with_ts: Iterable[tuple[float, np.ndarray]], segment_seconds: float = 8.0,
                   fps: float = 2.0, source_size: tuple[int, int] | None = None) -> list[Segment]:
    """List form of iter_segments."""
    return list(iter_segments(source_id, frames_with_ts, segment_seconds, fps, source_size))


def _check_frame(t, frame) -> float:
    if not isinstance(frame, np.ndarray) or frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3:
        raise ValueError(f"frame must be a uint8 array [H, W, 3], got {type(frame).__name__} "
                         f"{getattr(frame, 'dtype', None)} {getattr(frame, 'shape', None)}")
    t = float(t)
    if not math.isfinite(t):
        raise ValueError(f"frame timestamp must be finite, got {t}")
    return t


class SegmentQueue:
    """Bounded FIFO of segments; put() drops the OLDEST segment when full and counts it."""

    def __init__(self, maxsize: int):
        if not isinstance(maxsize, int) or maxsize < 1:
            raise ValueError(f"queue size must be an int >= 1, got {maxsize!r}")
        self.maxsize = maxsize
        self.drops = 0
        self._items: collections.deque[Segment] = collections.deque()
        self._cond = threading.Condition()

    def put(self, segment: Segment) -> Segment | None:
        """Append; return the segment dropped to make room, if any."""
        with self._cond:
            dropped = None
            if len(self._items) >= self.maxsize:
                dropped = self._items.popleft()
                self.drops += 1
            self._items.append(segment)
            self._cond.notify_all()
            return dropped

    def get_many(self, max_n: int = 8, timeout_s: float = 1.0) -> list[Segment]:
        """Up to max_n segments, oldest first; waits up to timeout_s for the first one ([] on timeout)."""
        if not isinstance(max_n, int) or max_n < 1:
            raise ValueError(f"max_n must be an int >= 1, got {max_n!r}")
        if timeout_s < 0:
            raise ValueError(f"timeout_s must be >= 0, got {timeout_s}")
        with self._cond:
            self._cond.wait_for(lambda: len(self._items) > 0, timeout=timeout_s)
            n = min(max_n, len(self._items))
            return [self._items.popleft() for _ in range(n)]

    def __len__(self) -> int:
        with self._cond:
            return len(self._items)
