"""Opening and probing video: containers from local paths or pyarrow.fs URIs, stream metadata, the frame size the
model takes (smart_resize), display rotation, and the one YUV -> RGB conversion every reader uses.

Everything here raises DecodeError (which file, and why) for input that cannot be used.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import av
import numpy as np
from av.video.reformatter import VideoReformatter

from pipeline.video.protocols import NO_PROTOCOLS, local_open_options

from qwen2vl.geometry import FACTOR, smart_resize

INTERPOLATIONS = ("BICUBIC", "BILINEAR", "FAST_BILINEAR", "AREA", "LANCZOS", "POINT")
INTERPOLATION = "BICUBIC"          # the reference processor resizes with bicubic (docs/model.md §2)


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

def is_uri(path: str) -> bool:
    return "://" in path


def open_container(path: Any) -> tuple[av.container.InputContainer, Any]:
    """Open a container; returns (container, file object to close or None). Raises DecodeError."""
    if not isinstance(path, (str, os.PathLike)):
        raise DecodeError(path, f"expected a path or URI string, got {type(path).__name__}")
    path = os.fspath(path)
    file_obj = None
    try:
        if is_uri(path):
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
            # read through the file object; nothing it names (a playlist's entries) may be opened
            return av.open(file_obj, "r", options={**local_open_options(), "protocol_whitelist": NO_PROTOCOLS}), \
                file_obj
        if not os.path.exists(path):
            raise DecodeError(path, "no such file")
        if not os.path.isfile(path):
            raise DecodeError(path, "not a regular file")
        if os.path.getsize(path) == 0:
            raise DecodeError(path, "file is empty (0 bytes)")
        # the absolute path, so FFmpeg never reads a prefix of it as a protocol, and the file protocol only
        return av.open(os.path.abspath(path), "r", options=local_open_options()), None
    except DecodeError:
        raise
    except Exception as e:   # FFmpeg errors, OSError, pyarrow's own errors while opening
        if file_obj is not None:
            file_obj.close()
        raise DecodeError(path, f"not a readable video container: truncated, corrupt or not a video ({e})") from e


def video_stream(container, path: str):
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


def info_from_stream(path: str, container, stream) -> VideoInfo:
    # Read everything here, while the container is open (PyAV returns garbage after close).
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
    container, file_obj = open_container(path)
    try:
        stream = video_stream(container, os.fspath(path))
        return info_from_stream(os.fspath(path), container, stream)
    finally:
        container.close()
        if file_obj is not None:
            file_obj.close()


# ---------------------------------------------------------------- sizes and turns

def target_size(height: int, width: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """(H', W') for a source frame size: smart_resize to multiples of 28 within the pixel bounds."""
    return smart_resize(height, width, factor=FACTOR, min_pixels=min_pixels, max_pixels=max_pixels)


def target_size_for(path: str, info: VideoInfo, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    try:
        return target_size(info.height, info.width, min_pixels, max_pixels)
    except ValueError as e:   # frames under 28 px or a silly aspect ratio: the model cannot take them
        raise DecodeError(path, f"frame size {info.width}x{info.height} cannot be resized for the model ({e})") from e


def upright(frame, rgb: np.ndarray) -> np.ndarray:
    """The converted frame `rgb` [H, W, 3] turned as the stream's display matrix says (phones store portrait video
    sideways and mark it so; players and ffmpeg show it upright). Rotation is applied after resizing: smart_resize
    treats height and width alike, so the result has the size of the upright frame resized. Quarter turns match
    ffmpeg's autorotate exactly; any other angle (rare outside editing tools) is rounded to the nearest quarter turn
    where ffmpeg would rotate by the exact angle, and a mirror in the matrix is ignored."""
    turns = quarter_turns(frame)
    return rgb if turns == 0 else np.ascontiguousarray(np.rot90(rgb, k=turns))


def quarter_turns(frame) -> int:
    """Counter-clockwise quarter turns for display (0-3) from a decoded frame's display matrix."""
    try:
        degrees = frame.rotation                          # PyAV: counter-clockwise degrees, 0 without a matrix
    except (AttributeError, ValueError):
        return 0
    return int(round(float(degrees) / 90.0)) % 4 if degrees else 0


class RGBConverter:
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


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:   # not on Linux
        return os.cpu_count() or 1


def display_turns(path_s: str) -> int:
    """Quarter turns of a file's display matrix, read from its first decoded frame with PyAV."""
    container, file_obj = open_container(path_s)
    try:
        for frame in container.decode(video=0):
            return quarter_turns(frame)
        return 0
    except av.FFmpegError:
        return 0
    finally:
        container.close()
        if file_obj is not None:
            file_obj.close()
