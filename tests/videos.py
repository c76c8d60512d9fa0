"""Real test videos, encoded with PyAV.

Every frame moves (a gradient that shifts, a box that travels) so consecutive frames differ, and carries its own
frame index as a band of 12 black/white bars at the top (binary, most significant bit first). `read_frame_index`
recovers the index from a decoded RGB frame, which lets tests check exactly which frames a sampler picked.
"""
from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

INDEX_BITS = 12                 # frames 0..4095 carry their index
CODE_MIN_WIDTH = 2 * INDEX_BITS  # bars of at least 2 px
CODE_MIN_HEIGHT = 12
PATTERNS = ("moving", "noise", "solid")
SOLID_COLOURS = ((200, 30, 30), (30, 180, 40), (40, 60, 210), (230, 220, 40))   # "solid": colour number `seed`
VFR_PERIOD_CYCLE = (0.5, 1.0, 1.5, 1.0)   # frame durations in nominal periods: the mean rate stays `fps`
AUDIO_RATE = 16_000
YUV420_CODECS = ("libx264", "libx265", "h264", "mpeg4", "libvpx", "libvpx-vp9", "mjpeg")


@dataclass(frozen=True)
class VideoSpec:
    """What was written: the tests compare decoded files against this."""
    path: Path
    width: int
    height: int
    fps: float                    # nominal rate (the mean rate for vfr)
    frames: int
    pts_s: tuple[float, ...]      # presentation time of every frame, seconds
    vfr: bool = False
    audio: bool = False
    codec: str = "libx264"
    gop: int | None = None

    @property
    def duration_s(self) -> float:
        """End of the last frame: its pts plus one nominal period (or its own vfr duration)."""
        last = VFR_PERIOD_CYCLE[(self.frames - 1) % len(VFR_PERIOD_CYCLE)] if self.vfr else 1.0
        return self.pts_s[-1] + last / self.fps

    @property
    def has_index_code(self) -> bool:
        return self.width >= CODE_MIN_WIDTH and self.height >= CODE_MIN_HEIGHT


def frame_pixels(i: int, width: int, height: int, pattern: str = "moving", seed: int = 0) -> np.ndarray:
    """RGB frame number i, (height, width, 3) uint8."""
    if pattern == "moving":
        xs = np.arange(width, dtype=np.int32)[None, :]
        ys = np.arange(height, dtype=np.int32)[:, None]
        img = np.empty((height, width, 3), np.uint8)
        img[..., 0] = (xs * 255 // max(1, width - 1) + 7 * i) % 256
        img[..., 1] = (ys * 255 // max(1, height - 1) + 3 * i) % 256
        img[..., 2] = (96 + 5 * i) % 256
        box = max(2, min(width, height) // 4)
        step = max(1, width // 16)
        x0 = (i * step) % max(1, width - box)
        y0 = (i * max(1, height // 16)) % max(1, height - box)
        img[y0:y0 + box, x0:x0 + box] = 255
    elif pattern == "noise":
        img = np.random.default_rng(seed * 100_003 + i).integers(0, 256, (height, width, 3), dtype=np.uint8)
    elif pattern == "solid":                  # one still colour: a scene whose every frame looks the same
        img = np.empty((height, width, 3), np.uint8)
        img[:] = SOLID_COLOURS[seed % len(SOLID_COLOURS)]
        return img
    else:
        raise ValueError(f"unknown pattern {pattern!r}, expected one of {PATTERNS}")
    if width >= CODE_MIN_WIDTH and height >= CODE_MIN_HEIGHT:
        _draw_index(img, i)
    return img


def _code_band(width: int, height: int) -> tuple[int, int]:
    return max(6, height // 5), width // INDEX_BITS          # (band height, bar width)


def _draw_index(img: np.ndarray, i: int) -> None:
    height, width = img.shape[:2]
    band_h, bar_w = _code_band(width, height)
    img[:band_h] = 0
    for b in range(INDEX_BITS):
        if (i >> (INDEX_BITS - 1 - b)) & 1:
            img[:band_h, b * bar_w:(b + 1) * bar_w] = 255


def read_frame_index(rgb: np.ndarray) -> int:
    """The frame index drawn by `frame_pixels`, read back from a decoded (H, W, 3) frame of the same size."""
    height, width = rgb.shape[:2]
    if width < CODE_MIN_WIDTH or height < CODE_MIN_HEIGHT:
        raise ValueError(f"frame {width}x{height} is too small to carry an index code "
                         f"(needs >= {CODE_MIN_WIDTH}x{CODE_MIN_HEIGHT})")
    band_h, bar_w = _code_band(width, height)
    gray = rgb[:band_h].astype(np.float32).mean(axis=2)
    value = 0
    for b in range(INDEX_BITS):
        # the middle of each bar, away from edges that chroma subsampling and compression blur
        lo, hi = b * bar_w + bar_w // 4, (b + 1) * bar_w - bar_w // 4
        cell = gray[band_h // 4: band_h - band_h // 4, lo:max(hi, lo + 1)]
        value = (value << 1) | int(cell.mean() > 128)
    return value


def _frame_times(n: int, fps: float, vfr: bool) -> list[float]:
    if not vfr:
        return [i / fps for i in range(n)]
    times, t = [], 0.0
    for i in range(n):
        times.append(t)
        t += VFR_PERIOD_CYCLE[i % len(VFR_PERIOD_CYCLE)] / fps
    return times


def encode_video(path: str | Path, width: int, height: int, fps: float, seconds: float | None = None,
                 frames: int | None = None, codec: str = "libx264", audio: bool = False, vfr: bool = False,
                 gop: int | None = None, pattern: str = "moving", preset: str = "veryfast", seed: int = 0,
                 codec_options: dict[str, str] | None = None, rotation: int = 0) -> VideoSpec:
    """Encode a clip of `frames` frames (or round(seconds * fps)) and return what was written.

    vfr: frame durations cycle through VFR_PERIOD_CYCLE nominal periods (pts in ms). gop: keyframe every gop frames
    exactly (libx264's default is 250, too sparse for seek tests). audio: a mono AAC sine tone of the same length.
    rotation: a display matrix turning the stored frames that many degrees counter-clockwise for display, as phones
    write for portrait video (stored sideways; players and ffmpeg turn them upright).
    """
    path = Path(path)
    if (seconds is None) == (frames is None):
        raise ValueError("give exactly one of seconds= or frames=")
    n = int(frames) if frames is not None else int(round(float(seconds) * fps))
    if n < 1:
        raise ValueError(f"a video needs at least one frame, got {n} (seconds={seconds}, frames={frames}, fps={fps})")
    if width < 2 or height < 2 or fps <= 0:
        raise ValueError(f"bad video size/rate {width}x{height} @ {fps} fps")
    if codec in YUV420_CODECS and (width % 2 or height % 2):
        raise ValueError(f"{codec} with yuv420p needs even width and height, got {width}x{height}")
    if path.suffix == "":
        path = path.with_suffix(".mp4")
    path.parent.mkdir(parents=True, exist_ok=True)

    rate = Fraction(fps).limit_denominator(1001)
    times = _frame_times(n, fps, vfr)
    time_base = Fraction(1, 1000) if vfr else 1 / rate
    options = {"preset": preset} if codec == "libx264" else {}
    if gop is not None:
        options.update({"g": str(gop), "keyint_min": str(gop), "sc_threshold": "0"})
    options.update(codec_options or {})

    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=rate, options=options)
        stream.width, stream.height = width, height
        stream.pix_fmt = "yuvj420p" if codec == "mjpeg" else "yuv420p"
        stream.codec_context.time_base = time_base
        if rotation:
            stream.set_display_rotation(rotation)
        astream = None
        if audio:
            astream = container.add_stream("aac", rate=AUDIO_RATE, layout="mono")
        audio_done = 0                                      # samples written so far
        end_s = times[-1] + (VFR_PERIOD_CYCLE[(n - 1) % 4] if vfr else 1.0) / fps
        for i, t in enumerate(times):
            frame = av.VideoFrame.from_ndarray(frame_pixels(i, width, height, pattern, seed), format="rgb24")
            frame.pts = round(t * 1000) if vfr else i
            frame.time_base = time_base
            container.mux(stream.encode(frame))
            if astream is not None:                         # interleave: audio up to the next video frame
                upto = times[i + 1] if i + 1 < n else end_s
                audio_done = _mux_audio(container, astream, audio_done, int(upto * AUDIO_RATE))
        container.mux(stream.encode(None))
        if astream is not None:
            container.mux(astream.encode(None))
    return VideoSpec(path=path, width=width, height=height, fps=float(fps), frames=n, pts_s=tuple(times),
                     vfr=vfr, audio=audio, codec=codec, gop=gop)


def _mux_audio(container, astream, done: int, until: int) -> int:
    while done < until:
        k = min(1024, until - done)
        t = (np.arange(done, done + k) / AUDIO_RATE).astype(np.float32)
        samples = (0.2 * np.sin(2 * np.pi * 440.0 * t)).astype(np.float32)[None, :]   # (channels, samples)
        frame = av.AudioFrame.from_ndarray(samples, format="fltp", layout="mono")
        frame.sample_rate = AUDIO_RATE
        frame.pts = done
        frame.time_base = Fraction(1, AUDIO_RATE)
        container.mux(astream.encode(frame))
        done += k
    return done


@dataclass(frozen=True)
class ProbedVideo:
    """What PyAV reads back from a file (used by the fixture tests, and handy elsewhere)."""
    width: int
    height: int
    frames: int
    avg_fps: float
    pts_s: tuple[float, ...]
    has_audio: bool
    first_rgb: np.ndarray
    last_rgb: np.ndarray


def probe_video(path: str | Path) -> ProbedVideo:
    """Decode every video frame of `path` and report sizes, count, rate and timestamps."""
    with av.open(str(path)) as container:
        vs = container.streams.video[0]
        vs.thread_type = "AUTO"
        avg = float(vs.average_rate) if vs.average_rate else 0.0    # read before close: PyAV returns garbage afterwards
        has_audio = len(container.streams.audio) > 0
        pts, first, last, size = [], None, None, None
        for frame in container.decode(vs):
            pts.append(float(frame.pts * frame.time_base))
            rgb = frame.to_ndarray(format="rgb24")
            first = rgb if first is None else first
            last = rgb
            size = (frame.width, frame.height)
    if size is None:
        raise ValueError(f"{path}: no video frames decoded")
    return ProbedVideo(width=size[0], height=size[1], frames=len(pts), avg_fps=avg, pts_s=tuple(pts),
                       has_audio=has_audio, first_rgb=first, last_rgb=last)
