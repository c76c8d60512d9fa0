"""2 fps decode-to-tubes throughput vs the ffmpeg CLI and ray.data.read_videos (JSON on stdout).

    .venv/bin/python bench/decode.py            # 30 s clips at 1080p30, 720p25, 360p30, 3 rounds, with Ray
    .venv/bin/python bench/decode.py --quick    # 3 s clips, 1 round, no Ray: a smoke run of a few seconds

Each clip is H.264 (libx264 veryfast, yuv420p, ffmpeg's testsrc2 pattern), made once with the ffmpeg CLI into a
cache folder. Per round, for each clip, every contender runs once, interleaved, so background load hits all of
them alike; the best round of each is reported (other processes share these cores). Before each timed run the
bench waits (up to --idle-wait seconds) until both cores were idle for a moment, so a burst of someone else's
work does not land on one contender; the idle fraction seen before each run is in the report.
Contenders, all at 2 fps over the whole clip with the same decoder thread count:
  ffmpeg        `ffmpeg -threads N -i X -vf fps=2 -f null -` (decode + fps filter; no resize, no RGB)
  tubes         pipeline.video (PyAV, default) -> segments -> uint8 pixel rows (decode, resize, patchify):
                what archive jobs ship to the encoder, which normalizes on its own device. With N threads
                pipeline.video runs N single-threaded decoders over parts of the clip cut at keyframes (at
                most N decoding at once); ffmpeg runs one decoder with N threads
  tubes_f32     the same plus CLIP normalization to float32 rows on this CPU (4x the bytes to write)
  tubes_noskip  the same as tubes with every frame decoded (skip_nonref=False), to show what skipping buys
  tubes_decord  the same as tubes with the decord backend
  read_videos   ray.data.read_videos(path, fps=2) consumed fully (full-size RGB frames, no tubes)
Throughput is source-seconds per wall-second; ratios are (other's seconds) / (tubes seconds).
CPU seconds (this process and its children: decoder threads, the ffmpeg CLI) are reported beside wall time
because other work on a shared machine stretches wall time; read_videos runs in Ray workers, so it has none.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.tubes import tubes_from_segment  # noqa: E402
from pipeline.video.files import iter_window  # noqa: E402
from pipeline.video.media import probe, target_size  # noqa: E402
from pipeline.video.segments import iter_segments  # noqa: E402
from qwen2vl.geometry import VIDEO_MAX_PIXELS, VIDEO_MIN_PIXELS  # noqa: E402

CLIPS = {  # name: (width, height, fps)
    "1080p30": (1920, 1080, 30),
    "720p25": (1280, 720, 25),
    "360p30": (640, 360, 30),
}
GOALS = {"vs_ffmpeg": 1.0, "vs_read_videos": 2.0}


def make_clip(cache: Path, name: str, seconds: float) -> Path:
    width, height, fps = CLIPS[name]
    path = cache / f"{name}_{seconds:g}s.mp4"
    if path.exists() and path.stat().st_size > 0:
        return path
    tmp = path.with_suffix(".part.mp4")
    subprocess.run(["ffmpeg", "-hide_banner", "-nostdin", "-loglevel", "error", "-y", "-f", "lavfi",
                    "-i", f"testsrc2=size={width}x{height}:rate={fps}", "-t", f"{seconds:g}", "-c:v", "libx264",
                    "-preset", "veryfast", "-pix_fmt", "yuv420p", str(tmp)], check=True)
    tmp.rename(path)
    return path


def time_ffmpeg(path: Path, threads: int) -> tuple[float, dict]:
    t = time.perf_counter()
    subprocess.run(["ffmpeg", "-hide_banner", "-nostdin", "-loglevel", "error", "-threads", str(threads),
                    "-i", str(path), "-vf", "fps=2", "-f", "null", "-"], check=True)
    return time.perf_counter() - t, {}


def time_tubes(path: Path, threads: int, backend: str = "pyav", as_uint8: bool = True,
               skip_nonref: bool = True) -> tuple[float, dict]:
    t = time.perf_counter()
    frames = iter_window(path, 0.0, None, fps=2.0, backend=backend, threads=threads, skip_nonref=skip_nonref)
    n_segments = n_rows = n_frames = 0
    for segment in iter_segments("bench", frames, segment_seconds=8.0, fps=2.0):
        tubes = tubes_from_segment(segment, as_uint8=as_uint8)
        n_segments += 1
        n_frames += segment.frames.shape[0]
        n_rows += tubes.pixel_rows.shape[0]
    return time.perf_counter() - t, {"segments": n_segments, "frames": n_frames, "pixel_rows": n_rows}


def time_read_videos(path: Path) -> tuple[float, dict]:
    import ray

    t = time.perf_counter()
    ds = ray.data.read_videos(str(path), fps=2)
    n = 0
    for batch in ds.iter_batches(batch_size=32, batch_format="numpy"):
        n += len(batch["frame"])
    return time.perf_counter() - t, {"frames": n}


def _idle_fraction(seconds: float = 0.3) -> float:
    """Share of all cores' time spent idle over the next `seconds` (Linux /proc/stat; 1.0 elsewhere)."""
    def idle_total() -> tuple[int, int]:
        with open("/proc/stat") as f:
            ticks = [int(x) for x in f.readline().split()[1:]]
        return ticks[3] + ticks[4], sum(ticks)   # idle + iowait, all

    try:
        i0, t0 = idle_total()
        time.sleep(seconds)
        i1, t1 = idle_total()
    except OSError:
        return 1.0
    return (i1 - i0) / max(1, t1 - t0)


def wait_for_idle_cpus(timeout: float, min_idle: float = 0.9) -> float:
    """Wait until the cores are at least `min_idle` idle (other engineers' jobs share them); the last fraction seen."""
    deadline = time.monotonic() + timeout
    while True:
        idle = _idle_fraction()
        if idle >= min_idle or time.monotonic() >= deadline:
            return idle


def _cpu_seconds() -> float:
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def start_ray(num_cpus: int) -> str:
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    tmp = tempfile.mkdtemp(prefix="rb", dir="/tmp")   # short: Ray's socket paths have a length limit
    ray.init(num_cpus=num_cpus, include_dashboard=False, _temp_dir=tmp, log_to_driver=False,
             logging_level="ERROR", configure_logging=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    return tmp


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="3 s clips, 1 round, no Ray (unless --ray)")
    ap.add_argument("--ray", action="store_true", help="measure read_videos even with --quick")
    ap.add_argument("--seconds", type=float, default=None, help="clip length (default 30, quick 3)")
    ap.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 3, quick 1)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="decoder threads for every contender")
    ap.add_argument("--clips", default=",".join(CLIPS), help=f"comma list of {list(CLIPS)}")
    ap.add_argument("--idle-wait", type=float, default=None,
                    help="seconds to wait at most for idle cores before each timed run (default 10, quick 0)")
    ap.add_argument("--cache", type=Path, default=Path(os.environ.get("TUBESCOPE_BENCH_CACHE",
                                                                         "/tmp/tubescope_bench")))
    args = ap.parse_args(argv)
    seconds = args.seconds or (3.0 if args.quick else 30.0)
    rounds = args.rounds or (1 if args.quick else 3)
    with_ray = args.ray or not args.quick
    idle_wait = args.idle_wait if args.idle_wait is not None else (0.0 if args.quick else 10.0)
    clips = [c for c in args.clips.split(",") if c]
    for c in clips:
        if c not in CLIPS:
            raise SystemExit(f"unknown clip {c!r}; expected some of {list(CLIPS)}")
    if shutil.which("ffmpeg") is None:
        raise SystemExit("ffmpeg CLI not found (apt-get install ffmpeg): it makes the clips and is the baseline")
    args.cache.mkdir(parents=True, exist_ok=True)
    paths = {c: make_clip(args.cache, c, seconds) for c in clips}

    contenders = {
        "ffmpeg": lambda p: time_ffmpeg(p, args.threads),
        "tubes": lambda p: time_tubes(p, args.threads),
        "tubes_f32": lambda p: time_tubes(p, args.threads, as_uint8=False),
        "tubes_noskip": lambda p: time_tubes(p, args.threads, skip_nonref=False),
        "tubes_decord": lambda p: time_tubes(p, args.threads, backend="decord"),
    }
    ray_tmp = None
    if with_ray:
        ray_tmp = start_ray(args.threads)
        contenders["read_videos"] = time_read_videos
        time_read_videos(paths[clips[-1]])   # warm-up: worker start-up is not part of decoding

    for name, fn in contenders.items():   # warm-up on the smallest clip: first-call costs are not decoding
        if name != "read_videos":
            fn(paths[clips[-1]])
    load_before = os.getloadavg()
    samples: dict[str, dict[str, list[float]]] = {c: {k: [] for k in contenders} for c in clips}
    cpu: dict[str, dict[str, list[float]]] = {c: {k: [] for k in contenders if k != "read_videos"} for c in clips}
    details: dict[str, dict[str, dict]] = {c: {} for c in clips}
    idle: dict[str, list[float]] = {c: [] for c in clips}
    for _ in range(rounds):
        for c in clips:
            for name, fn in contenders.items():
                if idle_wait > 0:
                    idle[c].append(wait_for_idle_cpus(idle_wait))
                cpu0 = _cpu_seconds()
                wall, extra = fn(paths[c])
                samples[c][name].append(wall)
                if name in cpu[c]:
                    cpu[c][name].append(_cpu_seconds() - cpu0)
                details[c][name] = extra

    report = {"bench": "decode", "quick": args.quick, "threads": args.threads, "rounds": rounds,
              "clip_seconds": seconds, "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                                                   "load_avg_before": load_before, "load_avg_after": os.getloadavg()},
              "goals": GOALS, "clips": {}}
    for c in clips:
        info = probe(paths[c])
        best = {k: min(v) for k, v in samples[c].items()}
        entry = {
            "path": str(paths[c]), "source_seconds": round(info.duration, 3), "size": [info.width, info.height],
            "fps": info.fps, "tube_frame_size": list(target_size(info.height, info.width, VIDEO_MIN_PIXELS,
                                                                 VIDEO_MAX_PIXELS)),
            "best_seconds": {k: round(v, 3) for k, v in best.items()},
            "all_seconds": {k: [round(x, 3) for x in v] for k, v in samples[c].items()},
            "throughput_x": {k: round(info.duration / v, 2) for k, v in best.items()},
            "ratio_vs_ffmpeg": {k: round(best["ffmpeg"] / best[k], 2) for k in best if k.startswith("tubes")},
            "best_cpu_seconds": {k: round(min(v), 3) for k, v in cpu[c].items()},
            "cpu_ratio_vs_ffmpeg": {k: round(min(cpu[c]["ffmpeg"]) / min(v), 2) for k, v in cpu[c].items()
                                    if k.startswith("tubes")},
            "work": details[c],
        }
        if idle[c]:
            entry["idle_before_runs"] = {"min": round(min(idle[c]), 2),
                                         "median": round(sorted(idle[c])[len(idle[c]) // 2], 2)}
        if "read_videos" in best:
            entry["ratio_vs_read_videos"] = {k: round(best["read_videos"] / best[k], 2)
                                             for k in best if k.startswith("tubes")}
        entry["goals_met"] = {"vs_ffmpeg": entry["ratio_vs_ffmpeg"]["tubes"] >= GOALS["vs_ffmpeg"]}
        if "ratio_vs_read_videos" in entry:
            entry["goals_met"]["vs_read_videos"] = entry["ratio_vs_read_videos"]["tubes"] >= GOALS["vs_read_videos"]
        report["clips"][c] = entry
    if with_ray:
        import ray

        ray.shutdown()
        shutil.rmtree(ray_tmp, ignore_errors=True)
    return report


if __name__ == "__main__":
    print(json.dumps(main(), indent=2))
