"""GOP-parallel decoding: a window cut at keyframes into parts, each decoded by its own single-threaded decoder, all
at once, frames yielded in order.

FFmpeg's frame threading gains almost nothing once non-reference frames are skipped, while independent decoders
scale with cores. A part starts where a seek to its keyframe lands, as a window start does, so the frames are exactly
those of one sequential walk (tests/test_decode_parallel.py).
"""
from __future__ import annotations

import math
import queue
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from fractions import Fraction
from typing import Iterator

import av
import numpy as np

from pipeline.video.media import DecodeError, RGBConverter, info_from_stream, open_container, video_stream

_EPS = 1e-6                        # seconds; absorbs float error in pts * time_base
_PART_SAMPLES = 32                 # aim for parts of at most this many sample times (memory bound)
_RAW_BACKLOG_BYTES = 48 << 20     # unread decoded frames a part holds before converting its own


def keyframe_cuts(path_s: str, start: float, end: float | None, fps: float, decoders: int) -> list[float]:
    """Media times of keyframes that cut [start, end) into parts of about equal length, in order.

    At least `decoders` parts, more when parts would exceed _PART_SAMPLES sample times. Each cut is the
    presentation time of a keyframe, so a part starts where a seek lands and shares no frame with the part
    before; every part holds at least one sample time. [] when there is nothing to cut (one GOP, a short
    window, a container that cannot seek): the caller then uses one decoder.
    """
    try:
        container, file_obj = open_container(path_s)
    except DecodeError:
        return []   # the sequential path raises the same error with its full context
    try:
        stream = video_stream(container, path_s)
        info = info_from_stream(path_s, container, stream)
        if stream.start_time is None:
            return []
        stop = info.duration if end is None else min(end, info.duration)
        first, last = _sample_index(start, fps), _sample_index(stop, fps)   # sample times first .. last-1
        n_parts = min(max(decoders, math.ceil((last - first) / _PART_SAMPLES)), last - first)
        if n_parts < 2:
            return []
        finder = _KeyframeFinder(container, stream)
        cuts: list[float] = []
        for j in range(1, n_parts):
            cut = finder.nearest(start + (stop - start) * j / n_parts, lo=cuts[-1] if cuts else start, hi=stop)
            # Keep a cut only if it leaves at least one sample time on each side.
            if cut is not None and _sample_index(cuts[-1] if cuts else start, fps) < _sample_index(cut, fps) < last:
                cuts.append(cut)
        return cuts
    except (DecodeError, av.FFmpegError, OSError):
        return []
    finally:
        container.close()
        if file_obj is not None:
            file_obj.close()


def _sample_index(t: float, fps: float) -> int:
    """Index of the first sample time >= t."""
    return math.ceil(t * fps - _EPS)


class _KeyframeFinder:
    """Keyframe presentation times found by seeking (the container's index) and reading one packet."""

    def __init__(self, container, stream):
        self.container, self.stream = container, stream
        self.tb, self.start_pts = stream.time_base, stream.start_time

    def at_or_before(self, t: float) -> float | None:
        """The keyframe a backward seek to media time t lands on (None: not a keyframe with a timestamp)."""
        self.container.seek(self.start_pts + int(Fraction(t) / self.tb), stream=self.stream, backward=True,
                            any_frame=False)
        for packet in self.container.demux(self.stream):
            if packet.pts is None or not packet.is_keyframe:
                return None
            return float((packet.pts - self.start_pts) * self.tb)
        return None

    def nearest(self, target: float, lo: float, hi: float) -> float | None:
        """The keyframe in (lo, hi) nearest to target, looking forward in doubling steps for one after it."""
        before = self.at_or_before(target)
        candidates = [before] if before is not None and lo < before < hi else []
        step = 0.5
        while target + step < hi:
            after = self.at_or_before(target + step)
            if after is not None and after > target + _EPS:
                if after < hi:
                    candidates.append(after)
                break
            step *= 2
        return min(candidates, key=lambda c: abs(c - target)) if candidates else None


class _PartEnd:
    """Queue marker: the part's decoder has stopped (finished, failed or told to stop)."""


def iter_parallel(path_s, spans, decoders, interpolation, open_span) -> Iterator[tuple[float, np.ndarray]]:
    """(time, RGB frame) of every span in order, the spans decoded by `decoders` threads at once.

    PyAV releases the GIL while it decodes and scales, so the threads run in parallel. Frames are converted
    where there is time: the caller's thread converts the frames of every part it reaches (overlapping the
    decoders), and a decoder whose part waits behind _RAW_BACKLOG_BYTES of unread decoded frames converts its
    own (memory stays bounded, at the cost of converting on the decoder's core). At most decoders + 1 parts
    are in flight.
    """
    stop = threading.Event()

    def decode(span, out):
        try:
            with open_span(*span) as (samples, size):
                to_rgb = RGBConverter(path_s, size, interpolation)
                last_frame = item = None
                raw_allowed = 0
                for t, frame in samples:
                    if stop.is_set():
                        return
                    if frame is not last_frame:   # one decision per frame, so a repeated frame is one array
                        raw_allowed = raw_allowed or max(2, _RAW_BACKLOG_BYTES // _decoded_bytes(frame))
                        last_frame, item = frame, to_rgb(frame) if out.qsize() >= raw_allowed else (frame, size)
                    out.put((t, item))
        finally:
            out.put(_PartEnd)

    pool = ThreadPoolExecutor(decoders, thread_name_prefix="decode-part")
    pending: deque = deque()
    todo = iter(spans)
    to_rgb = None
    try:
        while True:
            while len(pending) < decoders + 1 and (span := next(todo, None)) is not None:
                out = queue.SimpleQueue()
                pending.append((out, pool.submit(decode, span, out)))
            if not pending:
                return
            out, future = pending.popleft()
            while (got := out.get()) is not _PartEnd:
                t, item = got
                if not isinstance(item, np.ndarray):
                    frame, size = item
                    to_rgb = to_rgb or RGBConverter(path_s, size, interpolation)
                    item = to_rgb(frame)
                yield t, item
            future.result()   # re-raises the part's DecodeError
    finally:
        stop.set()           # the consumer stopped early or a part failed: running parts end at their next frame
        pool.shutdown(wait=True, cancel_futures=True)


def _decoded_bytes(frame) -> int:
    """Bytes of a decoded frame's planes (what a frame waiting unconverted holds)."""
    return sum(plane.buffer_size for plane in frame.planes)
