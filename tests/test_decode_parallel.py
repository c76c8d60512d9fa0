"""GOP-parallel PyAV decoding: a window cut at keyframes, parts decoded at once, must equal one sequential walk."""
from __future__ import annotations

import threading
from pathlib import Path

import av
import numpy as np
import pytest

import pipeline.video.parallel as parallel_module
from pipeline.video.files import decode_window, iter_window, sample_times
from pipeline.video.media import DecodeError
from pipeline.video.parallel import keyframe_cuts
from videos import frame_pixels

# name -> encode_video keyword arguments: several keyframes each, B-frames (libx264 veryfast), odd timings.
CLIPS = {
    "bframes_gop45": dict(width=320, height=180, fps=30, seconds=6.0, gop=45),
    "vfr_gop10": dict(width=128, height=96, fps=20, frames=80, vfr=True, gop=10),
    "audio_gop25": dict(width=128, height=72, fps=25, seconds=4.0, gop=25, audio=True),
    "ntsc_gop30": dict(width=160, height=90, fps=30000 / 1001, frames=150, gop=30),
    "slow_1.5fps_gop3": dict(width=96, height=64, fps=1.5, frames=12, gop=3),   # frames repeat at 2 fps
}


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    from videos import encode_video

    root = tmp_path_factory.mktemp("parallel-videos")
    return {name: encode_video(root / f"{name}.mp4", **kw) for name, kw in CLIPS.items()}


def keyframe_times(path) -> list[float]:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        return [float((p.pts - stream.start_time) * stream.time_base)
                for p in container.demux(stream) if p.is_keyframe and p.pts is not None]


def assert_same_frames(got, want):
    assert [t for t, _ in got] == [t for t, _ in want]
    for (t, a), (_, b) in zip(got, want):
        assert a.shape == b.shape and np.array_equal(a, b), f"frame at {t} s differs"


@pytest.mark.parametrize("name", list(CLIPS))
@pytest.mark.parametrize("window", [(0.0, None), (1.3, 4.1)])
def test_parallel_decode_equals_sequential(clips, name, window):
    spec = clips[name]
    start, end = window
    cuts = keyframe_cuts(str(spec.path), start, end, 2.0, decoders=2)
    assert cuts, "the clip must be cut, or this tests only the sequential path"
    sequential = decode_window(spec.path, start, end, threads=1)
    assert [t for t, _ in sequential] == sample_times(spec.duration_s, 2.0, start, end)
    for threads in (2, 3):
        assert_same_frames(decode_window(spec.path, start, end, threads=threads), sequential)


def test_cuts_are_keyframe_times_with_samples_between(clips):
    spec = clips["bframes_gop45"]                         # keyframes every 1.5 s over 6 s
    keyframes = keyframe_times(spec.path)
    for decoders in (2, 3, 4):
        cuts = keyframe_cuts(str(spec.path), 0.0, None, 2.0, decoders)
        assert cuts and set(cuts) <= set(keyframes[1:]), (cuts, keyframes)
        assert cuts == sorted(cuts) and len(cuts) <= decoders - 1
    # A window that holds no keyframe after its start is not cut.
    assert keyframe_cuts(str(spec.path), 1.6, 2.9, 2.0, 2) == []
    # Samples far denser than the parts' bound: more parts than decoders, run through the same pool.
    many = keyframe_cuts(str(spec.path), 0.0, None, 30.0, 2)
    assert len(many) >= 3
    assert_same_frames(decode_window(spec.path, fps=30.0, threads=2), decode_window(spec.path, fps=30.0, threads=1))


@pytest.mark.parametrize("name", ["bframes_gop45", "slow_1.5fps_gop3"])
def test_decoders_that_convert_their_own_frames_give_the_same_frames(clips, name, monkeypatch):
    # A tiny budget of unread decoded frames: the parts ahead convert most of their frames themselves.
    monkeypatch.setattr(parallel_module, "_RAW_BACKLOG_BYTES", 0)
    spec = clips[name]
    assert_same_frames(decode_window(spec.path, threads=2), decode_window(spec.path, threads=1))


@pytest.mark.parametrize("raw_budget", [None, 0])
def test_a_frame_shown_at_several_times_is_one_array(clips, raw_budget, monkeypatch):
    if raw_budget is not None:
        monkeypatch.setattr(parallel_module, "_RAW_BACKLOG_BYTES", raw_budget)
    spec = clips["slow_1.5fps_gop3"]
    frames = decode_window(spec.path, threads=2)
    shown_at = {}
    for (t, a), (_, b) in zip(frames, frames[1:]):
        if np.array_equal(a, b):
            shown_at[t] = a is b
    assert shown_at and all(shown_at.values())


def test_stopping_early_ends_the_decoder_threads(clips):
    spec = clips["bframes_gop45"]
    frames = iter_window(spec.path, threads=2)
    t, _ = next(frames)
    assert t == 0.0
    frames.close()
    assert not [th for th in threading.enumerate() if th.name.startswith("decode-part")]


def _faststart(path: Path, frames: int, gop: int) -> Path:
    with av.open(str(path), "w", options={"movflags": "faststart"}) as container:
        stream = container.add_stream("libx264", rate=25, options={"preset": "ultrafast", "g": str(gop),
                                                                   "keyint_min": str(gop), "sc_threshold": "0"})
        stream.width, stream.height, stream.pix_fmt = 160, 90, "yuv420p"
        for i in range(frames):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame_pixels(i, 160, 90, "noise"),
                                                                   format="rgb24")))
        container.mux(stream.encode(None))
    return path


def test_truncated_media_data_fails_in_parallel_as_in_sequence(tmp_path):
    data = _faststart(tmp_path / "full.mp4", frames=200, gop=25).read_bytes()   # 8 s, a keyframe a second
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: len(data) * 3 // 4])                                # the frames stop near 6 s
    assert keyframe_cuts(str(cut), 0.0, None, 2.0, 2)
    for threads in (1, 2):
        with pytest.raises(DecodeError, match="truncated"):
            decode_window(cut, threads=threads)
    assert_same_frames(decode_window(cut, 0.0, 5.0, threads=2), decode_window(cut, 0.0, 5.0, threads=1))
