"""Shared fixtures: real Redis, real videos, real Ray. No mocks.

Fixtures
- redis_server (per test) / redis_session (per session): a real redis-server on a free 127.0.0.1 port with
  .url, .port, .client(), .stop(), .start() (restarts on the same port, for outage tests).
- video_factory: make_video(name, width, height, fps, seconds=None, frames=None, codec="libx264", audio=False,
  vfr=False, gop=None, pattern="moving") -> Path, encoded with PyAV into the test's tmp dir;
  video_factory.spec(path) -> tests.videos.VideoSpec (frame count, pts, ...). Frames carry their index
  (videos.read_frame_index).
- sample_videos (session): dict name -> VideoSpec, see SAMPLE_VIDEOS below.
- ray_local (session): a local Ray with 2 CPUs (see below).

Sizing Ray work on 2 CPUs (ray_local has num_cpus=2)
- Ray Data read and map tasks take 1 CPU each by default. An actor pool that holds every CPU (two actors at
  num_cpus=1) leaves none for them and the job hangs without an error. Keep
  pool_size * actor_num_cpus <= RAY_TEST_CPUS - 1, e.g. ActorPoolStrategy(size=2) with num_cpus=0.5, or
  size=1 with num_cpus=1; give light tasks fractions too (num_cpus=0.25).
- Never ask for num_gpus on a machine without GPUs: the task waits forever. Read the count from
  ray.cluster_resources().get("GPU", 0) first.
- Every test that uses ray_local gets a timeout of RAY_TEST_TIMEOUT_S unless it sets its own
  (@pytest.mark.timeout(N)); all other tests get the pyproject default (300 s).
"""
from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.video.sampler_config import SamplerConfig
from pipeline.video.stream import StreamSampler
from services import RAY_TEST_CPUS, RayLocal, start_local_ray, start_redis
from streams import LOOPBACK, SMALL, make_stream_video
from videos import VideoSpec, encode_video

RAY_TEST_TIMEOUT_S = 180
ACTOR_CPUS = 0.5            # a safe per-actor CPU claim under ray_local (two actors leave one CPU for reads)


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "ray_local" in getattr(item, "fixturenames", ()) and item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(RAY_TEST_TIMEOUT_S))


# ---- Redis ---------------------------------------------------------------------------------------------------------
@pytest.fixture
def redis_server(tmp_path):
    server = start_redis(tmp_path / "redis")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_session(tmp_path_factory):
    server = start_redis(tmp_path_factory.mktemp("redis-session"))
    yield server
    server.stop()


# ---- videos --------------------------------------------------------------------------------------------------------
class VideoFactory:
    """make_video(...) -> Path under `root`; the VideoSpec of each file is kept for assertions."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.specs: dict[Path, VideoSpec] = {}

    def __call__(self, name: str, width: int = 160, height: int = 90, fps: float = 30.0, seconds: float | None = None,
                 frames: int | None = None, codec: str = "libx264", audio: bool = False, vfr: bool = False,
                 gop: int | None = None, pattern: str = "moving", **kwargs) -> Path:
        if seconds is None and frames is None:
            seconds = 2.0
        spec = encode_video(self.root / name, width, height, fps, seconds=seconds, frames=frames, codec=codec,
                            audio=audio, vfr=vfr, gop=gop, pattern=pattern, **kwargs)
        self.specs[spec.path] = spec
        return spec.path

    def spec(self, path: str | Path) -> VideoSpec:
        return self.specs[Path(path)]


@pytest.fixture
def video_factory(tmp_path) -> VideoFactory:
    return VideoFactory(tmp_path / "videos")


# name -> encode_video keyword arguments. Small sizes keep the whole set under a second to encode.
SAMPLE_VIDEOS: dict[str, dict] = {
    "landscape_30fps": dict(width=160, height=90, fps=30, seconds=3.0),          # 16:9, 90 frames
    "portrait_25fps": dict(width=72, height=128, fps=25, frames=55),             # 9:16, odd length (2.2 s)
    "square_30fps": dict(width=96, height=96, fps=30, seconds=1.0),
    "wide_25fps": dict(width=256, height=64, fps=25, seconds=2.0),               # 4:1
    "hd_30fps": dict(width=640, height=360, fps=30, seconds=2.0),                # bigger than min_pixels
    "odd_length_30fps": dict(width=160, height=90, fps=30, frames=37),
    "ntsc_29.97fps": dict(width=160, height=90, fps=30000 / 1001, frames=45),
    "vfr_20fps": dict(width=128, height=96, fps=20, frames=41, vfr=True),         # durations cycle 0.5..1.5 periods
    "one_frame": dict(width=64, height=48, fps=25, frames=1),
    "with_audio_25fps": dict(width=128, height=72, fps=25, seconds=2.0, audio=True),
    "gop15_30fps": dict(width=160, height=90, fps=30, seconds=4.0, gop=15),       # a keyframe every 0.5 s
}


@pytest.fixture(scope="session")
def sample_videos(tmp_path_factory) -> dict[str, VideoSpec]:
    root = tmp_path_factory.mktemp("sample-videos")
    return {name: encode_video(root / f"{name}.mp4", **kw) for name, kw in SAMPLE_VIDEOS.items()}


# ---- Ray -----------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def ray_local() -> RayLocal:
    cluster = start_local_ray(RAY_TEST_CPUS)
    yield cluster
    cluster.stop()


@pytest.fixture(scope="session")
def stream_video(tmp_path_factory):
    """3 s of 320x240 H.264 at 25 fps, a keyframe every second."""
    return make_stream_video(tmp_path_factory.mktemp("streams") / "g25.mp4", seconds=3.0)


@pytest.fixture
def samplers():
    """Start StreamSamplers (small frames, loopback allowed) by samplers(url, **config); all are stopped at the end
    whatever happens."""
    made = []

    def make(url, source_id="cam", on_event=None, **kw):
        s = StreamSampler(SamplerConfig(source_id=source_id, url=str(url), **{**SMALL, "hosts": LOOPBACK, **kw}),
                          on_event=on_event)
        made.append(s)
        s.start()
        return s

    yield make
    for s in made:
        s.stop(timeout_s=10)
