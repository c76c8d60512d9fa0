"""2 fps sampling from video files: probe, sample times, decode a time window to resized RGB frames.

Sampling is by presentation time (pts * time_base, relative to the stream's first frame), so variable
frame rate, B-frames, streams whose first pts is not 0 and audio tracks need no special cases. Sample k
sits at media time k / fps (0, 0.5, 1.0, ... at 2 fps) and takes the frame shown at that instant: the last
frame whose time is <= the sample time. Only sampled frames are converted, straight from the decoder's
YUV to RGB at the target size (one swscale call each); every other frame is only decoded.

Two backends: "pyav" (sequential decode with codec threading; the default, measured faster for 2 fps on
these machines, see bench/decode.py) and "decord" (random access: get_batch at the sampled indices).
Paths may be local files or pyarrow.fs URIs ("s3://...", "file:///..."); URIs always use PyAV.
"""
from __future__ import annotations

import math
import os
from collections import deque
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

    H', W' = smart_resize(H, W) under [min_pixels, max_pixels]. threads=0 lets FFmpeg pick.
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
    container, file_obj = _open(path_s)
    try:
        stream = _video_stream(container, path_s)
        info = _info_from_stream(path_s, container, stream)
        out_h, out_w = _target_size_for(path_s, info, min_pixels, max_pixels)
        stream.thread_type = "AUTO"           # frame + slice threads: ~1.5x faster than the default here
        stream.codec_context.thread_count = threads
        sampler = _HoldSampler(path_s, stream, info, start, end, fps, out_h, out_w, interpolation, skip_nonref)
        yield from sampler.run(container)
    finally:
        container.close()
        if file_obj is not None:
            file_obj.close()


class _HoldSampler:
    """Walks decoded frames in presentation order; each sample time takes the frame on screen at that time."""

    def __init__(self, path, stream, info, start, end, fps, out_h, out_w, interpolation, skip_nonref):
        self.path, self.stream, self.info = path, stream, info
        self.skip_nonref = skip_nonref
        self.start, self.end, self.fps = start, end, fps
        self.out_h, self.out_w = out_h, out_w
        self.interp = interpolation
        self.reformatter = VideoReformatter()
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

    def _rgb(self, frame) -> np.ndarray:
        # One reformatter for the whole walk: it keeps its swscale context (frame.to_ndarray(width=...) builds
        # a new one per frame, which costs more than the bicubic scaling itself at 360p).
        out = self.reformatter.reformat(frame, width=self.out_w, height=self.out_h, format="rgb24",
                                        interpolation=self.interp)
        return out.to_ndarray()   # (H', W', 3) uint8

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
        held_rgb = None
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
                        if held_rgb is None:
                            held_rgb = self._rgb(held[1])
                        yield k / self.fps, held_rgb
                        k += 1
                elif k / self.fps < t_frame - _EPS:
                    # Sample times before the first frame (stream starts late): show the first frame.
                    first_rgb = self._rgb(frame)
                    while k / self.fps < t_frame - _EPS and (end is None or k / self.fps < end - _EPS):
                        yield k / self.fps, first_rgb
                        k += 1
                if end is not None and k / self.fps >= end - _EPS:
                    return
                held, held_rgb, last_t = (t_frame, frame), None, t_frame
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
            if held_rgb is None:
                held_rgb = self._rgb(frame)
            yield k / self.fps, held_rgb
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
        for t, j in zip(times[lo:lo + _DECORD_CHUNK], inverse):
            yield t, batch[j]
