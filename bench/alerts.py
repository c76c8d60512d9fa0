"""Standing-alert latency: segment end -> its `tubescope:alerts` entry, with 4 live feeds x 8 alerts (JSON).

    .venv/bin/python bench/alerts.py                  # 4 feeds, 8 alerts, 40 s measured (about 2 minutes)
    .venv/bin/python bench/alerts.py --seconds 10     # a shorter run

The whole service on a local closed Ray (deploy.app.run_app: API, decoder, feeds, live indexer, alert follower) and
a real redis-server; feeds and alerts are made through the REST API. The feeds are local files played at real time
(looping), 1-s segments at 2 fps, frames of at most 16 x 784 pixels, on the tiny random checkpoint (the tests'
config). Every alert watches every feed with a threshold no score reaches below (each segment hits all 8), cooldown
0, so each live segment is scored against 8 questions in the follower's batched call. Latency per hit is the
entry's Redis timestamp minus the segment's t1 (its last frame plus one sample period); hits of segments that end
during the warm-up are left out. The indexing share (segment end -> indexed, `latency_s` of tubescope:segments) is
reported beside it. Goal: p95 <= 3 s on this machine (docs/architecture.md, "Standing alerts").
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

GOAL_P95_S = 3.0
ADMIN = "bench-admin-key-0123456789"
CONFIG = dict(segment_seconds=1.0, fps=2.0, min_pixels=4 * 784, max_pixels=16 * 784, captions=False,
              decoder_cpus=0.0, feed_reconcile_seconds=0.5)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--feeds", type=int, default=4)
    ap.add_argument("--alerts", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=40.0, help="measured time after the warm-up")
    ap.add_argument("--warmup", type=float, default=10.0)
    args = ap.parse_args()

    import httpx

    import qwen2vl
    from deploy.alerts import hit_from_entry
    from deploy.app import run_app, stop_app
    from deploy.runtime import start_closed_ray
    from pipeline.events import ALERTS_STREAM, SEGMENTS_STREAM
    from pipeline.redis_server import free_port
    from pipeline.settings import load_settings
    from services import start_redis
    from streams import make_stream_video

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    work = Path(tempfile.mkdtemp(prefix="bench-alerts-"))
    ray_tmp = tempfile.mkdtemp(prefix="tsray", dir="/tmp")
    redis = start_redis(work / "redis")
    try:
        start_closed_ray(num_cpus=os.cpu_count(), include_dashboard=False, _temp_dir=ray_tmp)
        videos = work / "videos"
        videos.mkdir()
        settings = load_settings(data_dir=work / "data", redis_url=redis.url, file_roots=[videos],
                                 model_path=qwen2vl.write_tiny_checkpoint(work / "model"),
                                 api_keys=[{"key": ADMIN, "role": "admin"}], **CONFIG)
        url = run_app(settings, host="127.0.0.1", port=free_port(), quiet=True)
        c = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {ADMIN}"}, timeout=60)
        feeds = [f"cam{i}" for i in range(args.feeds)]
        for i, feed in enumerate(feeds):
            path = make_stream_video(videos / f"{feed}.mp4", seconds=4.0 + i, width=160, height=120)
            c.post("/v1/feeds", json={"url": str(path), "id": feed}).raise_for_status()
        for k in range(args.alerts):
            c.post("/v1/alerts", json={"query": f"event number {k}: something moves", "sources": feeds,
                                       "threshold": -1e9, "cooldown_seconds": 0}).raise_for_status()
        t_measure = time.time() + args.warmup
        time.sleep(args.warmup + args.seconds)
        r = redis.client()
        hits = [(int(i.split(b"-")[0]) / 1000, hit_from_entry(f)) for i, f in r.xrange(ALERTS_STREAM)]
        latency = [at - h["t1"] for at, h in hits if h["t1"] >= t_measure]
        indexing = [float(f[b"latency_s"]) for i, f in r.xrange(SEGMENTS_STREAM)
                    if f.get(b"live") == b"1" and float(f[b"t1"]) >= t_measure]
        status = c.get("/v1/status").json()
        per_segment = {}
        for _, h in hits:
            per_segment.setdefault(h["segment_id"], 0)
            per_segment[h["segment_id"]] += 1
        out = {
            "bench": "alerts", "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
            "model": "tiny random Qwen2-VL (qwen2vl.write_tiny_checkpoint)", "config": CONFIG,
            "feeds": args.feeds, "alerts": args.alerts, "measured_s": args.seconds,
            "hits": len(latency), "segments_indexed": len(indexing),
            "alerts_per_segment": statistics.median(per_segment.values()) if per_segment else 0,
            "latency_s": {"p50": round(percentile(latency, 0.5), 3), "p95": round(percentile(latency, 0.95), 3),
                          "max": round(max(latency), 3)} if latency else None,
            "indexing_latency_s": {"p50": round(percentile(indexing, 0.5), 3),
                                   "p95": round(percentile(indexing, 0.95), 3)} if indexing else None,
            "follower": {k: status["alerts"][k] for k in ("segments", "scored", "hits", "failed")},
            "goal_p95_s": GOAL_P95_S,
        }
        out["meets_goal"] = bool(latency) and out["latency_s"]["p95"] <= GOAL_P95_S
        print(json.dumps(out, indent=2))
        stop_app()
    finally:
        import ray

        ray.shutdown()
        redis.stop()
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(ray_tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
