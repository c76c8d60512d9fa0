"""2 fps sampling from video files: probe, sample times, decode a time window to resized RGB frames.

Sampling is by presentation time (pts * time_base, relative to the stream's first frame), so variable
frame rate, B-frames, streams whose first pts is not 0 and audio tracks need no special cases. Sample k
sits at media time k / fps (0, 0.5, 1.0, ... at 2 fps) and takes the frame shown at that instant: the last
frame whose time is <= the sample time. Only sampled frames are converted, straight from the decoder's
YUV to RGB at the target size (one swscale call each); every other frame is only decoded.

Two backends: "pyav" (the default, measured faster for 2 fps on these machines, see bench/decode.py) and
"decord" (random access: get_batch at the sampled indices). With more than one decoder thread, PyAV cuts a
window at keyframes into parts decoded at once by single-threaded decoders (GOP-parallel: FFmpeg's frame
threading gains almost nothing once non-reference frames are skipped, independent decoders scale), yielded in
order. A part starts where a seek to its keyframe lands, as a window start already does, so the frames are
exactly those of one sequential walk (tests/test_decode_parallel.py).
Paths may be local files or pyarrow.fs URIs ("s3://...", "file:///..."); URIs always use PyAV.
"""
from __future__ import annotations

import math
import os
import queue
import threading
from collections import deque
from contextlib import contextmanager
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Iterator

import av
import numpy as np
from av.video.reformatter import VideoReformatter

from qwen2vl.processor import VIDEO_MAX_PIXELS, VIDEO_MIN_PIXELS, smart_resize

BACKENDS = ("pyav", "decord")
DEFAULT_BACKEND = "pyav"
INTERPOLATIONS = ("BICUBIC", "BILINEAR", "FAST_BILINEAR", "AREA", "LANCZOS", "POINT")
_EPS = 1e-6                        # seconds; absorbs float error in pts * time_base
_DECORD_CHUNK = 32                 # sample times fetched per decord get_batch call
_PART_SAMPLES = 32                 # GOP-parallel: aim for parts of at most this many sample times (memory bound)
_RAW_BACKLOG_BYTES = 48 << 20     # GOP-parallel: unread decoded frames a part holds before converting its own
_AUTO_DECODERS_MAX = 4             # threads=0: one decoder per CPU, at most this many (Ray runs tasks side by side)


class DecodeError(ValueError):
    """A video that cannot be decoded: says which file and why."""

    def __init__(self, path: Any, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"cannot decode {self.path}: {reason}")


@dataclass(frozen=True)
class VideoInfo:
    path: str
    duration: float       # seconds from the first frame's start to the last frame's end
    fps: float            # average frame rate (0.0 if the container does not say)
    frame_count: int      # declared by the container, else estimated from duration * fps
    width: int
    height: int
    codec: str
    start_time: float     # stream time of the first frame; media times are relative to it
    has_audio: bool


# ---------------------------------------------------------------- opening

def _is_uri(path: str) -> bool:
    return "://" in path


def _open(path: Any) -> tuple[av.container.InputContainer, Any]:
    """Open a container; returns (container, file object to close or None). Raises DecodeError."""
    if not isinstance(path, (str, os.PathLike)):
        raise DecodeError(path, f"expected a path or URI string, got {type(path).__name__}")
    path = os.fspath(path)
    file_obj = None
    try:
        if _is_uri(path):
            import pyarrow.fs as pafs  # only needed for URIs

            try:
                fs, inner = pafs.FileSystem.from_uri(path)
                entry = fs.get_file_info(inner)
            except Exception as e:  # pyarrow raises several types (ArrowInvalid, OSError, ...)
                raise DecodeError(path, f"cannot open URI: {e}") from e
            if entry.type == pafs.FileType.NotFound:
                raise DecodeError(path, "no such file")
            if entry.type != pafs.FileType.File:
                raise DecodeError(path, "not a regular file")
            if entry.size == 0:
                raise DecodeError(path, "file is empty (0 bytes)")
            file_obj = fs.open_input_file(inner)
            return av.open(file_obj, "r"), file_obj
        if not os.path.exists(path):
            raise DecodeError(path, "no such file")
        if not os.path.isfile(path):
            raise DecodeError(path, "not a regular file")
        if os.path.getsize(path) == 0:
            raise DecodeError(path, "file is empty (0 bytes)")
        return av.open(path, "r"), None
    except DecodeError:
        raise
    except Exception as e:   # FFmpeg errors, OSError, pyarrow's own errors while opening
        if file_obj is not None:
            file_obj.close()
        raise DecodeError(path, f"not a readable video container: truncated, corrupt or not a video ({e})") from e


def _video_stream(container, path: str):
    if not container.streams.video:
        kinds = sorted({s.type for s in container.streams}) or ["none"]
        raise DecodeError(path, f"no video stream (streams found: {', '.join(kinds)})")
    stream = container.streams.video[0]
    ctx = stream.codec_context
    if ctx is None or ctx.codec is None or stream.codec_context.name in (None, "", "none"):
        raise DecodeError(path, "unsupported codec: FFmpeg has no decoder for this video stream")
    if not stream.width or not stream.height:
        raise DecodeError(path, f"video stream has no frame size ({stream.width}x{stream.height})")
    return stream


def _info_from_stream(path: str, container, stream) -> VideoInfo:
    # Read everything here, while the container is open (PyAV returns garbage after close; FIELD_NOTES).
    tb = stream.time_base
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    fps = float(rate) if rate else 0.0
    start_pts = stream.start_time if stream.start_time is not None else 0
    if stream.duration and tb:
        duration = float(stream.duration * tb)
    elif container.duration:
        # container.duration is in AV_TIME_BASE (microseconds) and measured from its own start.
        duration = container.duration / 1e6
    elif stream.frames and fps:
        duration = stream.frames / fps
    else:
        duration = 0.0
    frame_count = int(stream.frames) if stream.frames else int(round(duration * fps))
    return VideoInfo(
        path=path,
        duration=duration,
        fps=fps,
        frame_count=frame_count,
        width=int(stream.width),
        height=int(stream.height),
        codec=stream.codec_context.name,
        start_time=float(start_pts * tb) if tb else 0.0,
        has_audio=bool(container.streams.audio),
    )


def probe(path: Any) -> VideoInfo:
    """Stream metadata of the first video stream, read without decoding."""
    container, file_obj = _open(path)
    try:
        stream = _video_stream(container, os.fspath(path))
        return _info_from_stream(os.fspath(path), container, stream)
    finally:
        container.close()
        if file_obj is not None:
            file_obj.close()


# ---------------------------------------------------------------- sampling plan

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


def target_size(height: int, width: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """(H', W') for a source frame size: qwen2vl.processor.smart_resize with factor 28."""
    return smart_resize(height, width, factor=28, min_pixels=min_pixels, max_pixels=max_pixels)


def _target_size_for(path: str, info: VideoInfo, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    try:
        return target_size(info.height, info.width, min_pixels, max_pixels)
    except ValueError as e:   # frames under 28 px or a silly aspect ratio: the model cannot take them
        raise DecodeError(path, f"frame size {info.width}x{info.height} cannot be resized for the model ({e})") from e


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
    interpolation: str = "BICUBIC",
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
    if backend == "decord" and not _is_uri(os.fspath(path)):
        return _iter_decord(path, start, end, fps, max_pixels, min_pixels, threads)
    return _iter_pyav(path, start, end, fps, max_pixels, min_pixels, interpolation, threads, skip_nonref)


def _iter_pyav(path, start, end, fps, max_pixels, min_pixels, interpolation, threads, skip_nonref):
    path_s = os.fspath(path)
    if threads == 1:   # the caller wants one thread: decode and convert right here
        with _opened_span(path_s, start, end, fps, max_pixels, min_pixels, 1, skip_nonref) as (samples, size):
            to_rgb = _RGBConverter(path_s, size, interpolation)
            for t, frame in samples:
                yield t, to_rgb(frame)
        return
    decoders = threads or min(_cpu_count(), _AUTO_DECODERS_MAX)
    cuts = _keyframe_cuts(path_s, start, end, fps, decoders) if decoders > 1 else []
    spans = list(zip([start, *cuts], [*cuts, end]))
    # Several parts: one single-threaded decoder each. One part (no keyframe to cut at): its decoder gets all
    # the threads, and this thread still converts frames while it decodes.
    codec_threads = 1 if cuts else threads
    yield from _iter_parallel(path_s, spans, min(decoders, len(spans)), interpolation, lambda a, b: _opened_span(
        path_s, a, b, fps, max_pixels, min_pixels, codec_threads, skip_nonref))


@contextmanager
def _opened_span(path_s, start, end, fps, max_pixels, min_pixels, threads, skip_nonref):
    """One decoder over [start, end): yields (samples, (H', W')), samples being (time, decoded frame) pairs."""
    container, file_obj = _open(path_s)
    try:
        stream = _video_stream(container, path_s)
        info = _info_from_stream(path_s, container, stream)
        size = _target_size_for(path_s, info, min_pixels, max_pixels)
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


def upright(frame, rgb: np.ndarray) -> np.ndarray:
    """The converted frame `rgb` [H, W, 3] turned as the stream's display matrix says (phones store portrait video
    sideways and mark it so; players and ffmpeg show it upright). Rotation is applied after resizing: smart_resize
    treats height and width alike, so the result has the size of the upright frame resized. Quarter turns match
    ffmpeg's autorotate exactly; any other angle (rare outside editing tools) is rounded to the nearest quarter turn
    where ffmpeg would rotate by the exact angle, and a mirror in the matrix is ignored."""
    turns = _quarter_turns(frame)
    return rgb if turns == 0 else np.ascontiguousarray(np.rot90(rgb, k=turns))


def _quarter_turns(frame) -> int:
    """Counter-clockwise quarter turns for display (0-3) from a decoded frame's display matrix."""
    try:
        degrees = frame.rotation                          # PyAV: counter-clockwise degrees, 0 without a matrix
    except (AttributeError, ValueError):
        return 0
    return int(round(float(degrees) / 90.0)) % 4 if degrees else 0


class _RGBConverter:
    """Decoded frame -> uint8 RGB [H', W', 3], straight from the decoder's YUV (one swscale call).

    One reformatter per converter keeps its swscale context (frame.to_ndarray(width=...) builds a new one per
    frame, which costs more than the bicubic scaling itself at 360p). A frame shown at several sample times is
    converted once: the same array comes back for it.
    """

    def __init__(self, path: str, size: tuple[int, int], interpolation: str):
        self.path, (self.height, self.width), self.interpolation = path, size, interpolation
        self.reformatter = VideoReformatter()
        self.last_frame = self.last_rgb = None

    def __call__(self, frame) -> np.ndarray:
        if frame is not self.last_frame:
            try:
                out = self.reformatter.reformat(frame, width=self.width, height=self.height, format="rgb24",
                                                interpolation=self.interpolation)
            except av.FFmpegError as e:
                raise DecodeError(self.path, f"cannot convert a decoded frame to RGB ({e})") from e
            self.last_frame, self.last_rgb = frame, upright(frame, out.to_ndarray())
        return self.last_rgb


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:   # not on Linux
        return os.cpu_count() or 1


# ---------------------------------------------------------------- GOP-parallel decoding

def _keyframe_cuts(path_s: str, start: float, end: float | None, fps: float, decoders: int) -> list[float]:
    """Media times of keyframes that cut [start, end) into parts of about equal length, in order.

    At least `decoders` parts, more when parts would exceed _PART_SAMPLES sample times. Each cut is the
    presentation time of a keyframe, so a part starts where a seek lands and shares no frame with the part
    before; every part holds at least one sample time. [] when there is nothing to cut (one GOP, a short
    window, a container that cannot seek): the caller then uses one decoder.
    """
    try:
        container, file_obj = _open(path_s)
    except DecodeError:
        return []   # the sequential path raises the same error with its full context
    try:
        stream = _video_stream(container, path_s)
        info = _info_from_stream(path_s, container, stream)
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


def _iter_parallel(path_s, spans, decoders, interpolation, open_span) -> Iterator[tuple[float, np.ndarray]]:
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
                to_rgb = _RGBConverter(path_s, size, interpolation)
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
                    to_rgb = to_rgb or _RGBConverter(path_s, size, interpolation)
                    item = to_rgb(frame)
                yield t, item
            future.result()   # re-raises the part's DecodeError
    finally:
        stop.set()           # the consumer stopped early or a part failed: running parts end at their next frame
        pool.shutdown(wait=True, cancel_futures=True)


def _decoded_bytes(frame) -> int:
    """Bytes of a decoded frame's planes (what a frame waiting unconverted holds)."""
    return sum(plane.buffer_size for plane in frame.planes)


class _HoldSampler:
    """Walks decoded frames in presentation order; each sample time takes the frame on screen at that time.

    run() yields (sample time, decoded frame): converting to RGB is the caller's (see _RGBConverter).
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
    out_h, out_w = _target_size_for(path_s, info, min_pixels, max_pixels)
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
    turns = _display_turns(path_s)                       # decord ignores the display matrix
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


def _display_turns(path_s: str) -> int:
    """Quarter turns of a file's display matrix, read from its first decoded frame with PyAV."""
    container, file_obj = _open(path_s)
    try:
        for frame in container.decode(video=0):
            return _quarter_turns(frame)
        return 0
    except av.FFmpegError:
        return 0
    finally:
        container.close()
        if file_obj is not None:
            file_obj.close()
