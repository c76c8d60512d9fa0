"""Recording and clips (JSON on stdout): what recording costs a feed reader, and how soon a clip's first byte comes.

    .venv/bin/python bench/recording.py                 # 360p25 H.264, 3 rounds of 15 s per reader, 120 s clip source
    .venv/bin/python bench/recording.py --quick         # 1 round of 5 s: a smoke run

Recording CPU: the same file feed (played at real time, as feeds of local files are) is read by a StreamSampler
with and without a Recorder, rounds interleaved so background load hits both alike; the CPU time of this process
(the reading thread that demuxes, decodes, samples and, with recording, remuxes, and FFmpeg's decoder threads; nothing
else runs meanwhile) over the wall time is the feed's share of one core. The cost of recording is the difference of
the medians. Goal: <= 2% of one core per feed. Beside it, the Recorder alone: 120 s of the footage remuxed at once
(no pacing, no decoding), its CPU seconds per second of footage.

Clip first byte: 120 s of the same footage recorded in 60 s chunks (by the Recorder, from the file's packets), then
a 30 s window across the chunk boundary asked over HTTP from a loopback uvicorn server whose one route makes the clip
(pipeline.clips.make_clip, uncached: each request names another window) and returns it as the clip route does
(FileResponse). Time to the first byte of the body, median of several windows. The service's route adds its key
check and Serve's proxy hop (a few ms). Goal: <= 300 ms.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

FFMPEG = shutil.which("ffmpeg") or "/usr/bin/ffmpeg"


def make_video(path: Path, seconds: float, size: str = "640x360", fps: int = 25) -> Path:
    subprocess.run([FFMPEG, "-v", "error", "-y", "-f", "lavfi", "-i", f"testsrc2=size={size}:rate={fps}",
                    "-t", str(seconds), "-c:v", "libx264", "-preset", "veryfast", "-g", str(fps), "-bf", "0",
                    "-pix_fmt", "yuv420p", str(path)], check=True)
    return path


def reader_share(video: Path, seconds: float, record_to: Path | None) -> float:
    """Share of one core the feed's reader used over `seconds` of a file feed."""
    from pipeline.video.recording import Recorder
    from pipeline.video.sampler_config import SamplerConfig
    from pipeline.video.stream import StreamSampler

    recorder = Recorder(record_to, chunk_seconds=60.0) if record_to is not None else None
    sampler = StreamSampler(SamplerConfig("bench", str(video)), recorder=recorder)
    sampler.start()
    time.sleep(1.0)                                  # past the open and the first frames
    cpu0, wall0 = time.process_time(), time.monotonic()
    time.sleep(seconds)
    cpu1, wall1 = time.process_time(), time.monotonic()
    sampler.stop()
    return (cpu1 - cpu0) / (wall1 - wall0)


def record_file(video: Path, folder: Path, chunk_seconds: float) -> None:
    """Record every packet of `video` at once (no pacing), as a feed would over its length."""
    import av

    from pipeline.video.clock import PtsClock
    from pipeline.video.recording import Recorder

    recorder, clock = Recorder(folder, chunk_seconds), PtsClock(paced=True)
    with av.open(str(video)) as container:
        stream = container.streams.video[0]
        recorder.begin(stream)
        clock.to_epoch(0.0, 1.8e9)                  # the footage starts at epoch 1.8e9
        for packet in container.demux(stream):
            recorder.write(packet, clock)
        recorder.end()


def first_byte_ms(settings, windows: list[tuple[float, float]]) -> list[float]:
    import http.client

    import uvicorn
    from fastapi import FastAPI
    from fastapi.responses import FileResponse

    from pipeline.clips import make_clip

    app = FastAPI()

    @app.get("/clip")
    def clip(start: float, end: float):
        made = make_clip(settings, "bench", start, end)
        return FileResponse(made.path, media_type="video/mp4")

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    out = []
    try:
        for start, end in windows:
            conn = http.client.HTTPConnection("127.0.0.1", port)
            t0 = time.perf_counter()
            conn.request("GET", f"/clip?start={start}&end={end}")
            response = conn.getresponse()
            response.read(1)
            out.append((time.perf_counter() - t0) * 1000)
            assert response.status == 200, response.status
            response.read()
            conn.close()
    finally:
        server.should_exit = True
        thread.join(5)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=15.0, help="measured seconds per reader run")
    args = parser.parse_args()
    rounds, seconds = (1, 5.0) if args.quick else (args.rounds, args.seconds)
    from pipeline.settings import load_settings
    from pipeline.recordings import source_folder

    with tempfile.TemporaryDirectory(prefix="tubescope-bench-rec-") as tmp:
        tmp = Path(tmp)
        feed = make_video(tmp / "feed.mp4", seconds + 5)
        shares: dict[str, list[float]] = {"without": [], "with": []}
        for r in range(rounds):
            shares["without"].append(reader_share(feed, seconds, None))
            shares["with"].append(reader_share(feed, seconds, tmp / f"rec-{r}"))
        without, with_ = statistics.median(shares["without"]), statistics.median(shares["with"])

        settings = load_settings(data_dir=tmp / "data")
        long = make_video(tmp / "long.mp4", 120)
        cpu0 = time.process_time()
        record_file(long, source_folder(settings, "bench"), 60.0)
        remux_core_share = (time.process_time() - cpu0) / 120      # CPU s per footage s: the share at real time
        windows = [(1.8e9 + 45 + i * 0.5, 1.8e9 + 75 + i * 0.5) for i in range(7)]   # each one new: no cache
        ttfb = first_byte_ms(settings, windows)
    print(json.dumps({
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "feed": "640x360 25 fps H.264 file feed at real time",
        "recording_cpu": {"feed_core_share_without": round(without, 4), "feed_core_share_with": round(with_, 4),
                          "cost_core_percent": round(100 * (with_ - without), 2), "goal_core_percent": 2.0,
                          "rounds": {k: [round(x, 4) for x in v] for k, v in shares.items()},
                          # the Recorder alone: 120 s of the footage remuxed at once, CPU seconds per footage second
                          "remux_only_core_percent": round(100 * remux_core_share, 3),
                          "seconds_per_run": seconds},
        "clip_first_byte_ms": {"window_s": 30, "median": round(statistics.median(ttfb), 1),
                               "max": round(max(ttfb), 1), "runs": [round(x, 1) for x in ttfb], "goal": 300},
    }, indent=2))


if __name__ == "__main__":
    main()
