"""pipeline.video.files on real PyAV-encoded files: 2 fps by timestamp, windows, sizes, backends, bad input."""
from __future__ import annotations

import subprocess
import time
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from pipeline.tubes import tubes_from_segment
from pipeline.video.files import decode_window, sample_times
from pipeline.video.media import DecodeError, VideoInfo, probe
from pipeline.video.segments import segment_frames
from qwen2vl.processor import VIDEO_MAX_PIXELS, VIDEO_MIN_PIXELS, smart_resize
from videos import encode_video, frame_pixels, read_frame_index

BAD_INPUT_SECONDS = 2.0   # every bad input must fail at least this fast (never hang)


def frame_index(rgb: np.ndarray, spec) -> int:
    """Index code of a decoded, resized frame: scale back to the source size first, where the code was drawn."""
    back = np.asarray(Image.fromarray(rgb).resize((spec.width, spec.height), Image.BILINEAR))
    return read_frame_index(back)


def expected_index(spec, t: float) -> int:
    """The frame on screen at media time t: the last one whose pts is <= t."""
    return int(np.searchsorted(np.asarray(spec.pts_s), t + 1e-6, side="right") - 1)


# ---------------------------------------------------------------- probe and sampling plan

def test_probe_reads_stream_metadata(sample_videos):
    spec = sample_videos["landscape_30fps"]
    info = probe(spec.path)
    assert isinstance(info, VideoInfo)
    assert (info.width, info.height, info.codec) == (160, 90, "h264")
    assert info.fps == pytest.approx(30.0)
    assert info.frame_count == 90
    assert info.duration == pytest.approx(3.0, abs=1e-3)
    assert info.has_audio is False
    assert probe(sample_videos["with_audio_25fps"].path).has_audio is True


def test_sample_times_grid_window_and_errors():
    assert sample_times(3.0) == [0.0, 0.5, 1.0, 1.5, 2.0, 2.5]
    assert sample_times(3.01) == [0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0]
    assert sample_times(1 / 30) == [0.0]                       # a 1-frame clip still gets its frame
    assert sample_times(10.0, start=1.2, end=3.1) == [1.5, 2.0, 2.5, 3.0]
    assert sample_times(10.0, start=2.0, end=3.0) == [2.0, 2.5]  # [start, end)
    assert sample_times(2.0, start=1.0, end=9.0) == [1.0, 1.5]   # clipped to the duration
    assert sample_times(2.0, fps=1.0) == [0.0, 1.0]
    for bad in (dict(duration=-1.0), dict(duration=2.0, fps=0.0), dict(duration=2.0, start=-1.0),
                dict(duration=2.0, start=1.0, end=0.5)):
        with pytest.raises(ValueError):
            sample_times(**bad)


# ---------------------------------------------------------------- which frames, at which times

@pytest.mark.parametrize("name,backend", [
    ("landscape_30fps", "pyav"), ("landscape_30fps", "decord"),
    ("portrait_25fps", "pyav"), ("portrait_25fps", "decord"),
    ("ntsc_29.97fps", "pyav"),
    ("odd_length_30fps", "pyav"),
    ("vfr_20fps", "pyav"), ("vfr_20fps", "decord"),
    ("with_audio_25fps", "pyav"),
])
def test_2fps_timestamps_pick_the_frame_on_screen(sample_videos, name, backend):
    spec = sample_videos[name]
    frames = decode_window(spec.path, backend=backend)
    times = [t for t, _ in frames]
    assert times == sample_times(spec.duration_s)
    assert times[:3] == [0.0, 0.5, 1.0]
    assert [frame_index(f, spec) for _, f in frames] == [expected_index(spec, t) for t in times]


def test_window_is_half_open_and_windows_tile(sample_videos):
    spec = sample_videos["gop15_30fps"]          # 4 s, a keyframe every 0.5 s: the window start seeks
    window = decode_window(spec.path, 1.2, 3.1)
    assert [t for t, _ in window] == [1.5, 2.0, 2.5, 3.0]
    assert [frame_index(f, spec) for _, f in window] == [45, 60, 75, 90]
    whole = decode_window(spec.path)
    tiled = decode_window(spec.path, 0.0, 2.0) + decode_window(spec.path, 2.0, 4.0)
    assert [t for t, _ in tiled] == [t for t, _ in whole] == sample_times(4.0)
    for (_, a), (_, b) in zip(tiled, whole):
        assert np.array_equal(a, b)               # decoding after a seek gives the same pixels
    assert decode_window(spec.path, 5.0, 6.0) == []   # past the end: nothing, no error


def test_window_without_nearby_keyframe(sample_videos):
    spec = sample_videos["landscape_30fps"]      # libx264 default GOP: one keyframe at 0
    window = decode_window(spec.path, 1.0, 2.0)
    assert [(t, frame_index(f, spec)) for t, f in window] == [(1.0, 30), (1.5, 45)]


def test_stream_whose_first_pts_is_not_zero(tmp_path):
    # Written by hand: pts start at 45 ticks of 1/30 s (1.5 s); media time 0 is the first frame.
    path = tmp_path / "late_start.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=30, options={"preset": "veryfast"})
        stream.width, stream.height, stream.pix_fmt = 160, 90, "yuv420p"
        stream.codec_context.time_base = Fraction(1, 30)
        for i in range(60):
            frame = av.VideoFrame.from_ndarray(frame_pixels(i, 160, 90), format="rgb24")
            frame.pts, frame.time_base = 45 + i, Fraction(1, 30)
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    info = probe(path)
    assert info.start_time == pytest.approx(1.5)
    assert info.duration == pytest.approx(2.0, abs=1e-3)
    for backend in ("pyav", "decord"):
        frames = decode_window(path, backend=backend)
        assert [t for t, _ in frames] == [0.0, 0.5, 1.0, 1.5]
        assert [read_frame_index(np.asarray(Image.fromarray(f).resize((160, 90), Image.BILINEAR)))
                for _, f in frames] == [0, 15, 30, 45]


def test_skipping_unseen_frames_changes_nothing(sample_videos):
    spec = sample_videos["hd_30fps"]
    with av.open(str(spec.path)) as container:   # the file must have B-frames for this to test anything
        kinds = {str(f.pict_type).split(".")[-1] for f in container.decode(video=0)}
    assert kinds & {"B", "3"}, f"expected B-frames in the test clip, got picture types {kinds}"
    fast = decode_window(spec.path, skip_nonref=True)
    full = decode_window(spec.path, skip_nonref=False)
    assert [t for t, _ in fast] == [t for t, _ in full]
    for (_, a), (_, b) in zip(fast, full):
        assert np.array_equal(a, b)


def test_backends_agree_on_frames(sample_videos):
    spec = sample_videos["hd_30fps"]
    pyav = decode_window(spec.path, backend="pyav")
    dec = decode_window(spec.path, backend="decord")
    assert [t for t, _ in pyav] == [t for t, _ in dec]
    assert [frame_index(f, spec) for _, f in pyav] == [frame_index(f, spec) for _, f in dec]
    assert pyav[0][1].shape == dec[0][1].shape


# ---------------------------------------------------------------- sizes

@pytest.mark.parametrize("name", ["hd_30fps", "portrait_25fps", "wide_25fps"])
def test_sizes_follow_smart_resize(sample_videos, name):
    spec = sample_videos[name]
    for min_px, max_px in ((VIDEO_MIN_PIXELS, VIDEO_MAX_PIXELS), (4 * 28 * 28, 64 * 28 * 28)):
        frames = decode_window(spec.path, 0.0, 1.0, min_pixels=min_px, max_pixels=max_px)
        h, w = smart_resize(spec.height, spec.width, factor=28, min_pixels=min_px, max_pixels=max_px)
        for _, f in frames:
            assert f.shape == (h, w, 3) and f.dtype == np.uint8
        assert min_px <= h * w <= max_px


def test_huge_frame_is_capped_by_max_pixels(video_factory):
    path = video_factory("uhd.mp4", width=3840, height=2160, fps=30, frames=2, preset="ultrafast")
    spec = video_factory.spec(path)
    frames = decode_window(path)
    assert len(frames) == 1
    h, w = frames[0][1].shape[:2]
    assert (h, w) == smart_resize(2160, 3840, 28, VIDEO_MIN_PIXELS, VIDEO_MAX_PIXELS) == (560, 1008)
    assert h * w <= VIDEO_MAX_PIXELS
    assert frame_index(frames[0][1], spec) == 0


def test_one_frame_clip_gives_one_frame_and_a_padded_segment(sample_videos):
    spec = sample_videos["one_frame"]
    frames = decode_window(spec.path)
    assert [t for t, _ in frames] == [0.0]
    assert frame_index(frames[0][1], spec) == 0
    (segment,) = segment_frames("one", frames)
    assert segment.frames.shape[0] == 2 and segment.padded
    assert np.array_equal(segment.frames[0], segment.frames[1])


def test_pyarrow_uri_reads_like_a_path(sample_videos):
    spec = sample_videos["portrait_25fps"]
    uri = Path(spec.path).resolve().as_uri()
    assert uri.startswith("file://")
    assert probe(uri).frame_count == spec.frames
    by_uri, by_path = decode_window(uri, 0.5, 2.0), decode_window(spec.path, 0.5, 2.0)
    assert [t for t, _ in by_uri] == [t for t, _ in by_path] == [0.5, 1.0, 1.5]
    for (_, a), (_, b) in zip(by_uri, by_path):
        assert np.array_equal(a, b)


# ---------------------------------------------------------------- bad input

def _audio_only(path: Path) -> Path:
    with av.open(str(path), "w") as container:
        stream = container.add_stream("aac", rate=16000, layout="mono")
        for k in range(10):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            frame.sample_rate, frame.pts, frame.time_base = 16000, k * 1024, Fraction(1, 16000)
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return path


def _faststart_truncated(path: Path) -> Path:
    # moov first (faststart), then half the media data cut off: the container opens, the frames run out.
    full = path.with_name("faststart_full.mp4")
    with av.open(str(full), "w", options={"movflags": "faststart"}) as container:
        stream = container.add_stream("libx264", rate=25, options={"preset": "ultrafast"})
        stream.width, stream.height, stream.pix_fmt = 160, 90, "yuv420p"
        for i in range(100):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame_pixels(i, 160, 90, "noise"), format="rgb24")))
        container.mux(stream.encode(None))
    data = full.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


@pytest.fixture
def bad_inputs(tmp_path, sample_videos):
    good = Path(sample_videos["landscape_30fps"].path).read_bytes()
    (tmp_path / "empty.mp4").write_bytes(b"")
    (tmp_path / "cut.mp4").write_bytes(good[: len(good) // 2])          # moov (written last) is lost
    (tmp_path / "notes.mp4").write_text("this is a text file, not a video\n" * 50)
    (tmp_path / "unknown_codec.mp4").write_bytes(good.replace(b"avc1", b"zq9x"))   # no decoder for 'zq9x'
    (tmp_path / "a_folder.mp4").mkdir()
    return {
        "zero-byte file": (tmp_path / "empty.mp4", "empty"),
        "truncated file": (tmp_path / "cut.mp4", "truncated"),
        "truncated media data": (_faststart_truncated(tmp_path / "cut_faststart.mp4"), "truncated"),
        "text file named .mp4": (tmp_path / "notes.mp4", "not a readable video"),
        "missing path": (tmp_path / "nope.mp4", "no such file"),
        "a folder": (tmp_path / "a_folder.mp4", "not a regular file"),
        "no video stream": (_audio_only(tmp_path / "voice.m4a"), "no video stream"),
        "unsupported codec": (tmp_path / "unknown_codec.mp4", "unsupported codec"),
        "missing URI": (Path(tmp_path / "nope.mp4").as_uri(), "no such file"),
    }


@pytest.mark.parametrize("backend", ["pyav", "decord"])
def test_bad_input_raises_decode_error_quickly(bad_inputs, backend):
    for what, (path, reason) in bad_inputs.items():
        t = time.perf_counter()
        with pytest.raises(DecodeError) as err:
            decode_window(path, backend=backend)
        assert time.perf_counter() - t < BAD_INPUT_SECONDS, what
        assert isinstance(err.value, ValueError)
        assert err.value.path == str(path) and str(path) in str(err.value), what
        if not (backend == "decord" and what == "truncated media data"):   # decord words its own failure
            assert reason in str(err.value), f"{what}: {err.value}"
        if what != "truncated media data":      # probe reads only headers: the cut data is not seen
            with pytest.raises(DecodeError):
                probe(path)


def test_bad_arguments_raise_value_error(sample_videos):
    path = sample_videos["square_30fps"].path
    for kwargs in (dict(start=-1.0), dict(start=2.0, end=1.0), dict(fps=0.0), dict(backend="opencv"),
                   dict(interpolation="NEAREST_PLEASE"), dict(min_pixels=10**6, max_pixels=10**5)):
        with pytest.raises(ValueError):
            decode_window(path, **kwargs)


# ---------------------------------------------------------------- display rotation (phone video)

@pytest.mark.parametrize("rotation", [-90, 90, 180])
def test_display_rotation_is_applied_like_ffmpeg(tmp_path, rotation):
    """Phones store portrait video sideways with a display matrix. Every decode path turns frames upright, exactly
    the stored frames turned, in ffmpeg's autorotate direction; the tubes take the upright size."""
    size = dict(min_pixels=4 * 784, max_pixels=16 * 784)            # 112x56 is already a valid model size
    plain = encode_video(tmp_path / "plain.mp4", 112, 56, 10, seconds=1.0, gop=5).path
    turned = encode_video(tmp_path / f"turned{rotation}.mp4", 112, 56, 10, seconds=1.0, gop=5,
                          rotation=rotation).path
    stored = decode_window(plain, fps=2, threads=1, **size)
    k = rotation // 90
    for options in (dict(threads=1), dict(threads=2), dict(backend="decord")):
        got = decode_window(turned, fps=2, **size, **options)
        assert [t for t, _ in got] == [t for t, _ in stored], options
        for (_, a), (_, b) in zip(got, stored):
            if options.get("backend") != "decord":                  # decord converts YUV with its own swscale
                assert np.array_equal(a, np.rot90(b, k=k)), options
            assert a.shape == np.rot90(b, k=k).shape and a.flags.c_contiguous, options
    # ffmpeg's own autorotate agrees on the direction (its RGB conversion differs by a few levels)
    raw = subprocess.run(["ffmpeg", "-hide_banner", "-loglevel", "error", "-i", str(turned), "-frames:v", "1",
                          "-f", "rawvideo", "-pix_fmt", "rgb24", "-"], check=True, capture_output=True).stdout
    first = decode_window(turned, fps=2, threads=1, **size)[0][1]
    ref = np.frombuffer(raw, np.uint8).reshape(first.shape)
    right = np.abs(first.astype(int) - ref).mean()
    wrong = min(np.abs(np.rot90(first, k=j).astype(int) - ref).mean() for j in (1, 2, 3)
                if np.rot90(first, k=j).shape == ref.shape)
    assert right < 3 < wrong
    seg = segment_frames("phone", decode_window(turned, fps=2, threads=1, **size), segment_seconds=1.0, fps=2)[0]
    tubes = tubes_from_segment(seg, as_uint8=True)
    assert tuple(tubes.grid_thw)[1:] == (first.shape[0] // 14, first.shape[1] // 14)
