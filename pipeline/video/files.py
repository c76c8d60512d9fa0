"""2 fps sampling from video files: sample times, and a time window decoded to resized RGB frames.

Sampling is by presentation time (pts * time_base, relative to the stream's first frame), so variable frame rate,
B-frames, streams whose first pts is not 0 and audio tracks need no special cases. Sample k sits at media time k / fps
(0, 0.5, 1.0, ... at 2 fps) and takes the frame shown at that instant: the last frame whose time is <= the sample time.
Only sampled frames are converted, straight from the decoder's YUV to RGB at the target size (one swscale call each);
every other frame is only decoded.

Two backends: "pyav" (the default, measured faster for 2 fps, see bench/decode.py) and "decord" (random access:
get_batch at the sampled indices). With more than one decoder thread PyAV decodes GOP-parallel
(pipeline/video/parallel.py). Paths may be local files or pyarrow.fs URIs ("s3://...", "file:///..."); URIs always
use PyAV.
"""
from __future__ import annotations

import math
import os
from collections import deque
from contextlib import contextmanager
from fractions import Fraction
from typing import Any, Iterator

import av
import numpy as np

from pipeline.video.media import (INTERPOLATION, INTERPOLATIONS, DecodeError, RGBConverter, cpu_count, display_turns,
                                  info_from_stream, is_uri, open_container, probe, target_size_for, video_stream)
from pipeline.video.parallel import iter_parallel, keyframe_cuts
from qwen2vl.geometry import VIDEO_MAX_PIXELS, VIDEO_MIN_PIXELS

BACKENDS = ("pyav", "decord")
DEFAULT_BACKEND = "pyav"
_EPS = 1e-6                        # seconds; absorbs float error in pts * time_base
_DECORD_CHUNK = 32                 # sample times fetched per decord get_batch call
_AUTO_DECODERS_MAX = 4             # threads=0: one decoder per CPU, at most this many (Ray runs tasks side by side)


def sample_times(duration: float, fps: float = 2.0, start: float = 0.0, end: float | None = None) -> list[float]:
    """Sample times k / fps inside [start, min(end, duration)).

    The grid is anchored at media time 0, so adjacent windows tile without overlap or gaps.
    """
    if not fps > 0:
        raise ValueError(f"fps must be > 0, got {fps}")
    if duration < 0 or math.isnan(duration):
        raise ValueError(f"duration must be >= 0 seconds, got {duration}")
    if start < 0:
        raise ValueError(f"start must be >= 0 seconds, got {start}")
    if end is not None and end < start:
        raise ValueError(f"end ({end}) must be >= start ({start})")
    stop = duration if end is None else min(end, duration)
    k = math.ceil(start * fps - _EPS)
    times = []
    while k / fps < stop - _EPS:
        times.append(k / fps)
        k += 1
    return times



# ---------------------------------------------------------------- decoding

def decode_window(path: Any, start: float = 0.0, end: float | None = None, **options: Any) -> list[tuple[float, np.ndarray]]:
    """Decode [start, end) of a video at `fps`: a list of (media time, uint8 RGB frame [H', W', 3]).

    The options are iter_window's (fps, max_pixels, min_pixels, backend, interpolation, threads, skip_nonref).
    """
    return list(iter_window(path, start, end, **options))


def iter_window(
    path: Any,
    start: float = 0.0,
    end: float | None = None,
    fps: float = 2.0,
    max_pixels: int = VIDEO_MAX_PIXELS,
    min_pixels: int = VIDEO_MIN_PIXELS,
    backend: str = DEFAULT_BACKEND,
    interpolation: str = INTERPOLATION,
    threads: int = 0,
    skip_nonref: bool = True,
) -> Iterator[tuple[float, np.ndarray]]:
    """(media time, uint8 RGB frame [H', W', 3]) at `fps` over [start, end), yielded while the file is decoded.

    H', W' = smart_resize(H, W) under [min_pixels, max_pixels]; a frame with a display rotation comes out upright
    (H' and W' swap for a quarter turn, see `upright`). threads: decoder threads (0: one per CPU, up to 4);
    PyAV uses them as that many single-threaded decoders over parts of the window cut at keyframes, or as
    codec threads of one decoder when the window holds no keyframe to cut at.
    A frame shown at several sample times (source slower than `fps`) appears once per time, same array.
    skip_nonref (PyAV): let the decoder drop non-reference frames that no sample time shows (1.2-1.4x faster
    on x264 files in bench/decode.py; the frames returned are the same).
    """
    if not fps > 0:
        raise ValueError(f"fps must be > 0, got {fps}")
    if start < 0:
        raise ValueError(f"start must be >= 0 seconds, got {start}")
    if end is not None and end < start:
        raise ValueError(f"end ({end}) must be >= start ({start})")
    if not 0 < min_pixels <= max_pixels:
        raise ValueError(f"need 0 < min_pixels <= max_pixels, got min_pixels={min_pixels}, max_pixels={max_pixels}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, got {interpolation!r}")
    if backend == "decord" and not is_uri(os.fspath(path)):
        return _iter_decord(path, start, end, fps, max_pixels, min_pixels, threads)
    return _iter_pyav(path, start, end, fps, max_pixels, min_pixels, interpolation, threads, skip_nonref)


def _iter_pyav(path, start, end, fps, max_pixels, min_pixels, interpolation, threads, skip_nonref):
    path_s = os.fspath(path)
    if threads == 1:   # the caller wants one thread: decode and convert right here
        with _opened_span(path_s, start, end, fps, max_pixels, min_pixels, 1, skip_nonref) as (samples, size):
            to_rgb = RGBConverter(path_s, size, interpolation)
            for t, frame in samples:
                yield t, to_rgb(frame)
        return
    decoders = threads or min(cpu_count(), _AUTO_DECODERS_MAX)
    cuts = keyframe_cuts(path_s, start, end, fps, decoders) if decoders > 1 else []
    spans = list(zip([start, *cuts], [*cuts, end]))
    # Several parts: one single-threaded decoder each. One part (no keyframe to cut at): its decoder gets all
    # the threads, and this thread still converts frames while it decodes.
    codec_threads = 1 if cuts else threads
    yield from iter_parallel(path_s, spans, min(decoders, len(spans)), interpolation, lambda a, b: _opened_span(
        path_s, a, b, fps, max_pixels, min_pixels, codec_threads, skip_nonref))


@contextmanager
def _opened_span(path_s, start, end, fps, max_pixels, min_pixels, threads, skip_nonref):
    """One decoder over [start, end): yields (samples, (H', W')), samples being (time, decoded frame) pairs."""
    container, file_obj = open_container(path_s)
    try:
        stream = video_stream(container, path_s)
        info = info_from_stream(path_s, container, stream)
        size = target_size_for(path_s, info, min_pixels, max_pixels)
        stream.thread_type = "AUTO"           # frame + slice threads: ~1.5x faster than the default here
        stream.codec_context.thread_count = threads
        samples = _HoldSampler(path_s, stream, info, start, end, fps, skip_nonref).run(container)
        try:
            yield samples, size
        finally:
            samples.close()   # restores the decoder's settings before the container goes
    finally:
        container.close()
        if file_obj is not None:
            file_obj.close()


class _HoldSampler:
    """Walks decoded frames in presentation order; each sample time takes the frame on screen at that time.

    run() yields (sample time, decoded frame): converting to RGB is the caller's (see RGBConverter).
    """

    def __init__(self, path, stream, info, start, end, fps, skip_nonref):
        self.path, self.stream, self.info = path, stream, info
        self.skip_nonref = skip_nonref
        self.start, self.end, self.fps = start, end, fps
        self.tb = stream.time_base
        self.start_pts = stream.start_time  # None: taken from the first decoded frame
        self.default_frame_s = 1.0 / info.fps if info.fps else 1.0 / 30
        # Only the stream's own duration is compared with the data (a container's may count a longer audio track).
        self.declared_s = float(stream.duration * stream.time_base) if stream.duration else None

    def _time(self, frame) -> float | None:
        pts = frame.pts if frame.pts is not None else frame.dts
        if pts is None:
            return None
        if self.start_pts is None:
            self.start_pts = pts
        return float((pts - self.start_pts) * self.tb)

    def _seek(self, container, t: float) -> None:
        start_pts = self.start_pts or 0
        container.seek(start_pts + int(Fraction(t) / self.tb), stream=self.stream, backward=True, any_frame=False)

    def run(self, container) -> Iterator[tuple[float, np.ndarray]]:
        k = math.ceil(self.start * self.fps - _EPS)       # index of the next sample time
        seeked = self.start > 0 and self.start_pts is not None
        if seeked:
            self._seek(container, self.start)
        while True:
            try:
                yield from self._walk(container, k, check_overshoot=seeked)
                return
            except _Overshoot:
                # The seek landed after the window start (imprecise index): decode from the beginning.
                self._seek(container, 0.0)
                seeked = False

    def _frames(self, container) -> Iterator[Any]:
        """Decoded frames in presentation order, leaving out frames that no sample time can show.

        A frame at time p is never shown when another frame q has p < q <= (the first sample time >= p).
        Packets wait in a short queue (the B-frame reorder depth) until that is known: q turns up, or a
        packet whose dts is past the sample time proves it cannot. Such packets go to the decoder with
        skip_frame=NONREF, so it drops them if no other frame refers to them (B-frames in H.264/HEVC,
        ~40% of all frames with x264 defaults); reference frames are decoded as usual.
        """
        ctx = self.stream.codec_context
        if not self.skip_nonref or self.stream.start_time is None:
            yield from container.decode(self.stream)
            return
        pending: deque = deque()   # [packet, pts seconds, next sample time, skippable (None = not known yet)]
        mode = "DEFAULT"
        try:
            for packet in container.demux(self.stream):
                if packet.size == 0 or packet.pts is None:   # flush packet, or no timestamp: stop guessing
                    for entry in pending:
                        entry[3] = bool(entry[3])
                    if packet.size:
                        pending.append([packet, None, None, False])
                else:
                    t = float((packet.pts - self.start_pts) * self.tb)
                    dts_t = float((packet.dts - self.start_pts) * self.tb) if packet.dts is not None else None
                    for entry in pending:
                        if entry[3] is None:
                            if entry[1] < t <= entry[2] + _EPS:
                                entry[3] = True
                            elif dts_t is not None and dts_t > entry[2] + _EPS:
                                entry[3] = False
                    pending.append([packet, t, math.ceil(t * self.fps - _EPS) / self.fps, None])
                while pending and pending[0][3] is not None:
                    entry = pending.popleft()
                    want = "NONREF" if entry[3] else "DEFAULT"
                    if want != mode:
                        ctx.skip_frame = mode = want
                    yield from self.stream.decode(entry[0])
            if mode != "DEFAULT":
                ctx.skip_frame = mode = "DEFAULT"
            for entry in pending:
                yield from self.stream.decode(entry[0])
            yield from self.stream.decode(None)   # drain frames still inside the decoder
        finally:
            if mode != "DEFAULT":      # left early (window end, error): restore the decoder's normal mode
                ctx.skip_frame = "DEFAULT"

    def _walk(self, container, k: int, check_overshoot: bool):
        end = self.end
        held = None            # (time, frame) currently on screen
        t_frame = None
        last_t = -math.inf
        try:
            for frame in self._frames(container):
                t_frame = self._time(frame)
                if t_frame is None:   # no timestamps at all: count frames at the declared rate
                    t_frame = last_t + self.default_frame_s if last_t > -math.inf else 0.0
                if t_frame < last_t:  # out-of-order pts (broken mux): keep presentation order monotonic
                    continue
                if held is None and check_overshoot and t_frame > k / self.fps + _EPS:
                    raise _Overshoot
                if held is not None:
                    while k / self.fps < t_frame - _EPS and (end is None or k / self.fps < end - _EPS):
                        yield k / self.fps, held[1]
                        k += 1
                elif k / self.fps < t_frame - _EPS:
                    # Sample times before the first frame (stream starts late): show the first frame.
                    while k / self.fps < t_frame - _EPS and (end is None or k / self.fps < end - _EPS):
                        yield k / self.fps, frame
                        k += 1
                if end is not None and k / self.fps >= end - _EPS:
                    return
                held, last_t = (t_frame, frame), t_frame
        except av.FFmpegError as e:
            at = f" near {t_frame:.3f} s" if t_frame is not None else ""
            raise DecodeError(self.path, f"corrupt or truncated video data{at} ({e})") from e
        if held is None:
            if 0 < self.info.duration <= self.start + _EPS:
                return   # the window starts after the end of the video: nothing to sample
            raise DecodeError(self.path, "no decodable video frames")
        # End of stream: the last frame stays on screen for its own duration.
        frame = held[1]
        frame_s = float(frame.duration * self.tb) if frame.duration else self.default_frame_s
        data_end = held[0] + frame_s
        self._check_truncated(data_end)
        while k / self.fps < data_end - _EPS and (end is None or k / self.fps < end - _EPS):
            yield k / self.fps, frame
            k += 1

    def _check_truncated(self, data_end: float) -> None:
        # A container that declares much more video than the file holds was cut short.
        declared = self.declared_s
        slack = max(1.0, 4 * self.default_frame_s)
        if declared is not None and declared > data_end + slack and (self.end is None or self.end > data_end + slack):
            raise DecodeError(
                self.path, f"truncated: video data ends at {data_end:.2f} s but the container declares {declared:.2f} s"
            )


class _Overshoot(Exception):
    pass


def _iter_decord(path, start, end, fps, max_pixels, min_pixels, threads):
    import decord

    path_s = os.fspath(path)
    info = probe(path_s)   # also raises DecodeError for every bad-input case before decord sees the file
    out_h, out_w = target_size_for(path_s, info, min_pixels, max_pixels)
    try:
        reader = decord.VideoReader(path_s, width=out_w, height=out_h, num_threads=threads)
        n = len(reader)
        if n == 0:
            raise DecodeError(path_s, "no decodable video frames")
        spans = reader.get_frame_timestamp(np.arange(n))   # (n, 2) start/end seconds of each frame
    except DecodeError:
        raise
    except Exception as e:   # decord raises DECORDError / RuntimeError with FFmpeg's message
        raise DecodeError(path_s, f"decord could not read the video ({e})") from e
    starts = spans[:, 0].astype(np.float64) - float(spans[0, 0])   # media time relative to the first frame
    times = sample_times(float(spans[-1, 1] - spans[0, 0]), fps, start, end)
    if not times:
        return
    turns = display_turns(path_s)                       # decord ignores the display matrix
    # The frame on screen at time t: the last one starting at or before t.
    idx = np.searchsorted(starts, np.asarray(times) + _EPS, side="right") - 1
    idx = np.clip(idx, 0, n - 1)
    # Fetch in chunks of sample times so a long window never holds all its frames at once.
    for lo in range(0, len(times), _DECORD_CHUNK):
        chunk = idx[lo:lo + _DECORD_CHUNK]
        unique, inverse = np.unique(chunk, return_inverse=True)
        try:
            batch = reader.get_batch(unique.tolist()).asnumpy()   # (u, H', W', 3) uint8
        except Exception as e:
            raise DecodeError(path_s, f"decord failed while decoding ({e})") from e
        if turns:
            batch = np.ascontiguousarray(np.rot90(batch, k=turns, axes=(1, 2)))
        for t, j in zip(times[lo:lo + _DECORD_CHUNK], inverse):
            yield t, batch[j]
