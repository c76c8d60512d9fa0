"""`tubescope demo`: the whole mission on a generated sample clip.

Redis (embedded unless REDIS_URL names one), the model (the tiny random one unless one is configured), a local Ray, the
Serve app, an archive job through POST /v1/jobs, a streamed question through POST /v1/ask, and a summary entry in the
Redis stream tubescope:demo. Every step says what it did, so a new user sees the system work end to end.
"""
from __future__ import annotations

import time
from fractions import Fraction
from pathlib import Path

import click

from pipeline.settings import Settings
from pipeline.video.protocols import redact_url

DEMO_STREAM = "tubescope:demo"
DEMO_CLIP = dict(width=320, height=180, fps=30, seconds=4.0)   # small, 16:9, moving content
DEMO_QUESTION = "What moves in this clip, and when?"


def run_demo(settings: Settings, say=click.echo) -> bool:
    """Run the mission; True when every step worked. The summary (or the error) goes to tubescope:demo either way."""
    from pipeline.redis_server import redis_endpoint

    settings.data_dir.mkdir(parents=True, exist_ok=True)
    say(f"tubescope demo: data dir {settings.data_dir}")
    with redis_endpoint(settings) as redis_ep:
        if redis_ep.embedded:
            say(f"[redis] embedded redis-server started, listening on {redact_url(redis_ep.url)} "
                f"(dir {settings.redis_dir})")
        else:
            say(f"[redis] using REDIS_URL {redact_url(redis_ep.url)}")
        clip = demo_clip(settings.data_dir / "samples" / "demo.mp4")
        n_frames, size, duration = _probe(clip)
        say(f"[clip] {clip}: {size[0]}x{size[1]}, {n_frames} frames, {duration:.1f} s "
            "(generated with PyAV: tubescope bundles no video file)")
        try:
            event = _demo_mission(settings, redis_ep.url, clip, say)
        except Exception as e:   # report where it broke; still record the attempt and exit non-zero
            say(f"demo FAILED: {type(e).__name__}: {e}", err=True)
            event = {"kind": "demo", "clip": str(clip), "error": f"{type(e).__name__}: {e}"[:1000]}
        event["at"] = f"{time.time():.3f}"
        client = redis_ep.client(decode_responses=True)
        try:
            entry = client.xadd(DEMO_STREAM, event, maxlen=settings.stream_maxlen, approximate=True)
            say(f"[redis] wrote the demo summary to stream {DEMO_STREAM!r}, entry {entry} "
                f"(read it: XRANGE {DEMO_STREAM} - +)")
        finally:
            client.close()
        if redis_ep.embedded:
            say(f"[redis] stopping the embedded server; its data is saved in {settings.redis_dir / 'dump.rdb'}")
    return "error" not in event


def _demo_mission(settings: Settings, redis_url: str, clip: Path, say) -> dict:
    """Start Ray and the Serve app, index the clip through POST /v1/jobs, ask through POST /v1/ask; shut down."""
    import ray

    from deploy.app import run_app, stop_app
    from deploy.auth import generate_key
    from deploy.client import TubescopeClient
    from deploy.runtime import TINY_MODEL_NOTE, ensure_model, init_ray, ray_address
    from pipeline.redis_server import free_port
    from pipeline.settings import ApiKey

    key = generate_key()
    settings = settings.model_copy(update={"redis_url": redis_url, "file_roots": [clip.parent],
                                           "api_keys": [ApiKey(key=key, role="admin")]})
    model_path = ensure_model(settings)
    say(f"[model] {model_path}")
    if settings.uses_tiny_model:
        say(f"[model] NOTE: {TINY_MODEL_NOTE}")
    t0 = time.perf_counter()
    init_ray(settings)
    say(f"[ray] {'joined the cluster at $RAY_ADDRESS' if ray_address() else 'started a local Ray'} "
        f"({time.perf_counter() - t0:.1f} s)")
    try:
        t0 = time.perf_counter()
        url = run_app(settings, host="127.0.0.1", port=free_port(), feeds=False, live=False, quiet=True)
        say(f"[serve] REST API up at {url} (OpenAPI: {url}/docs) in {time.perf_counter() - t0:.1f} s; "
            "this run's admin key was generated for it")
        with TubescopeClient(url, key) as api:
            return _demo_requests(api, settings, clip, say)
    finally:
        t0 = time.perf_counter()
        stop_app()
        if not ray_address():
            ray.shutdown()
        say(f"[serve] Serve and Ray shut down ({time.perf_counter() - t0:.1f} s)")


def _demo_requests(api, settings: Settings, clip: Path, say) -> dict:
    from pipeline.events import ANSWERS_STREAM

    job = api.create_job([str(clip)], source_id="demo")
    say(f"[index] POST /v1/jobs -> job {job['id']} (Ray Data decode at {settings.fps:g} fps -> tubes -> "
        "vision encoder actors -> footage index)")
    t0 = time.perf_counter()
    while job["state"] in ("queued", "running"):
        time.sleep(0.5)
        job = api.get_job(job["id"])
    if job["state"] != "succeeded":
        raise RuntimeError(f"indexing job ended {job['state']}: {job.get('error') or job.get('failures')}")
    segments = api.segments("demo")
    say(f"[index] job {job['state']}: {job['segments']} segment(s) indexed in {time.perf_counter() - t0:.1f} s; "
        f"GET /v1/sources/demo/segments:")
    for sg in segments:
        say(f"          {sg['segment_id']}  {sg['t0']:.1f}-{sg['t1']:.1f} s  grid {tuple(sg['grid_thw'])}  "
            f"{sg['n_tokens']} visual tokens")
    say(f"[ask] POST /v1/ask (streamed): {DEMO_QUESTION!r}")
    click.echo("[ask] answer: ", nl=False)
    answer = api.ask(DEMO_QUESTION, ["demo"], max_new_tokens=24,
                     on_token=lambda piece: click.echo(piece, nl=False))
    click.echo("")
    say(f"[ask] answer text: {answer['answer']!r}")
    if settings.uses_tiny_model:
        say("[ask] (random tiny model: the text above means nothing; set TUBESCOPE_MODEL_PATH for real answers)")
    for ev in answer["evidence"]:
        say(f"[ask] evidence: source {ev['source']} {ev['t0']:.1f}-{ev['t1']:.1f} s ({ev['segment_id']})")
    timings = answer.get("timings", {})
    say(f"[ask] model {answer['model']}; " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                                                      for k, v in timings.items()))
    say(f"[redis] the answer was written to stream {ANSWERS_STREAM!r}, entry {answer['stream_entry']} "
        f"(read it: XRANGE {ANSWERS_STREAM} {answer['stream_entry']} {answer['stream_entry']})")
    return {"kind": "demo", "clip": str(clip), "job": job["id"], "segments": str(len(segments)),
            "answer_id": answer["id"], "answer_stream": ANSWERS_STREAM, "answer_entry": answer["stream_entry"],
            "model": answer["model"]}


def demo_clip(path: Path) -> Path:
    """The demo's sample clip, encoded with PyAV on first use (a box moving over a shifting gradient)."""
    if path.is_file() and path.stat().st_size > 0:
        return path
    import av
    import numpy as np

    path.parent.mkdir(parents=True, exist_ok=True)
    w, h, fps = DEMO_CLIP["width"], DEMO_CLIP["height"], DEMO_CLIP["fps"]
    tmp = path.with_suffix(".part.mp4")
    with av.open(str(tmp), "w") as out:
        stream = out.add_stream("libx264", rate=Fraction(fps), options={"preset": "veryfast"})
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        xs, ys = np.meshgrid(np.arange(w), np.arange(h))
        for i in range(int(DEMO_CLIP["seconds"] * fps)):
            img = np.stack([(xs + 4 * i) % 256, (ys * 255 // h) + 0 * xs, np.full_like(xs, (60 + 3 * i) % 256)], -1)
            x0 = (i * 5) % (w - 40)
            img[60:100, x0:x0 + 40] = 255
            frame = av.VideoFrame.from_ndarray(img.astype(np.uint8), format="rgb24")
            frame.pts = i
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    tmp.replace(path)        # atomic: a crash never leaves a half-written clip under the final name
    return path


def _probe(path: Path) -> tuple[int, tuple[int, int], float]:
    import av

    with av.open(str(path)) as c:
        s = c.streams.video[0]
        size = (s.codec_context.width, s.codec_context.height)
        n = sum(1 for _ in c.decode(s))
        duration = float(c.duration / 1e6) if c.duration else 0.0
    return n, size, duration
