"""Memory soak of live ingest (JSON on stdout): does the service's memory stay bounded while feeds run for a long time?

    .venv/bin/python bench/soak.py                          # 4 file feeds at 1080p25 for 600 s
    .venv/bin/python bench/soak.py --feeds 2 --size 1280x720 --seconds 300

Starts `tubescope serve` (a closed local Ray, the embedded Redis, the tiny model) on a fresh data dir, registers N
file feeds over REST (local files play at real time and loop, as a camera would), and every `--every` seconds
samples the memory of the whole process tree (the service, Ray's GCS and raylet, every worker) and the feeds'
counters. Reported: RSS and USS over time (RSS also counts the pages of Ray's shared object store each worker has
touched, so it climbs while the store fills; USS, the memory no other process shares, is what a leak grows), the
slope of a least-squares line through USS over the second half of the run (MB per minute; a bounded service tends to
0 once its caches and queues are full), USS per process, segments indexed and dropped. On a small
machine the feeds outrun the encoder: that must show as counted drops, never as memory growth.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def make_video(path: Path, seconds: float, size: str, fps: int = 25) -> Path:
    subprocess.run(["ffmpeg", "-v", "error", "-y", "-f", "lavfi", "-i", f"testsrc2=size={size}:rate={fps}",
                    "-t", str(seconds), "-c:v", "libx264", "-preset", "veryfast", "-g", str(fps), "-bf", "0",
                    "-pix_fmt", "yuv420p", str(path)], check=True)
    return path


def tree_memory_mb(pid: int) -> tuple[float, float]:
    """(RSS, USS) of the process tree in MB. RSS counts the pages of Ray's shared object store each worker touched
    (once per worker), so it grows while the store fills; USS (memory no other process shares) is what leaks."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0.0, 0.0
    rss = uss = 0
    for p in procs:
        try:
            info = p.memory_full_info()
            rss, uss = rss + info.rss, uss + info.uss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return rss / 2**20, uss / 2**20


def rss_by_process(pid: int) -> dict[str, float]:
    """USS in MB per process of the tree, keyed by what it is (a Ray worker's actor or task name, else its command)."""
    out: dict[str, float] = {}
    try:
        procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return out
    for p in procs:
        try:
            cmd = p.cmdline()
            name = cmd[0] if cmd and cmd[0].startswith("ray::") else " ".join(cmd)[:60]
            key = f"{name} [{p.pid}]"
            out[key] = round(p.memory_full_info().uss / 2**20, 1)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return out


def slope_mb_per_min(points: list[tuple[float, float]]) -> float | None:
    if len(points) < 3:
        return None
    n = len(points)
    mt = sum(t for t, _ in points) / n
    mr = sum(r for _, r in points) / n
    var = sum((t - mt) ** 2 for t, _ in points)
    return 60.0 * sum((t - mt) * (r - mr) for t, r in points) / var if var else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--feeds", type=int, default=4)
    ap.add_argument("--size", default="1920x1080")
    ap.add_argument("--seconds", type=float, default=600.0)
    ap.add_argument("--every", type=float, default=10.0)
    ap.add_argument("--port", type=int, default=8765)
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="tubescope-soak-"))
    videos = work / "videos"
    videos.mkdir()
    video = make_video(videos / "cam.mp4", 10.0, args.size)
    key = secrets.token_urlsafe(32)
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("TUBESCOPE_")},
           "TUBESCOPE_DATA_DIR": str(work / "data"), "TUBESCOPE_FILE_ROOTS": json.dumps([str(videos)]),
           "TUBESCOPE_API_KEYS": json.dumps([{"key": key, "role": "admin"}]), "TUBESCOPE_CAPTIONS": "false",
           "TUBESCOPE_ALERTS": "false"}
    log = open(work / "serve.log", "w")
    service = subprocess.Popen([sys.executable, "-m", "deploy", "serve", "--port", str(args.port)], cwd=ROOT, env=env,
                               stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{args.port}"
    samples, feeds_status = [], {}
    try:
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=30) as c:
            deadline = time.time() + 300
            while True:
                try:
                    if c.get("/healthz").status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if service.poll() is not None or time.time() > deadline:
                    raise SystemExit(f"the service did not start; see {work / 'serve.log'}")
                time.sleep(2)
            for i in range(args.feeds):
                r = c.post("/v1/feeds", json={"url": str(video), "id": f"cam{i}"})
                print(f"feed cam{i}: {r.status_code} {r.text[:200]}", file=sys.stderr)
            start = time.time()
            first_by_process = None
            while (elapsed := time.time() - start) < args.seconds:
                status = c.get("/v1/status").json().get("feeds", {})      # feed id -> its reader's status
                status = {k: v for k, v in status.items() if isinstance(v, dict)}
                rss, uss = tree_memory_mb(service.pid)
                sample = {"t": round(elapsed, 1), "rss_mb": round(rss, 1), "uss_mb": round(uss, 1),
                          "segments": sum(s.get("segments_produced", 0) or 0 for s in status.values()),
                          "drops": sum(s.get("drops", 0) or 0 for s in status.values())}
                samples.append(sample)
                print(json.dumps(sample), file=sys.stderr)
                feeds_status = status
                if first_by_process is None and elapsed >= 60:        # after the warm-up
                    first_by_process = rss_by_process(service.pid)
                time.sleep(args.every)
            last_by_process = rss_by_process(service.pid)
            indexed = {s["source_id"]: s.get("segments") for s in c.get("/v1/sources").json()["sources"]}
    finally:
        os.killpg(service.pid, signal.SIGINT)
        try:
            service.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(service.pid, signal.SIGKILL)
    half = [(s["t"], s["uss_mb"]) for s in samples if s["t"] >= args.seconds / 2]
    print(json.dumps({
        "bench": "soak", "machine": f"{platform.machine()} {os.cpu_count()} cpus", "feeds": args.feeds,
        "size": args.size, "seconds": args.seconds,
        "rss_mb_first_last": [samples[0]["rss_mb"], samples[-1]["rss_mb"]] if samples else None,
        "uss_mb_first_max_last": [samples[0]["uss_mb"], max(s["uss_mb"] for s in samples), samples[-1]["uss_mb"]]
        if samples else None,
        "uss_slope_mb_per_min_second_half": slope_mb_per_min(half),
        "segments_produced": samples[-1]["segments"] if samples else 0,
        "drops": samples[-1]["drops"] if samples else 0,
        "indexed_segments": indexed, "samples": samples,
        "uss_mb_by_process_after_warmup_and_at_end": {k: [(first_by_process or {}).get(k), v] for k, v in sorted(
            last_by_process.items(), key=lambda kv: -kv[1])},
        "feeds_last_error": {k: v.get("last_error") for k, v in feeds_status.items()},
    }, indent=2))


if __name__ == "__main__":
    main()
