"""The one app every module of this package talks to (see __init__.py)."""
from __future__ import annotations

from pathlib import Path

import pytest

from deploy.app import run_app, stop_app
from pipeline.redis_server import free_port
from pipeline.settings import load_settings
from services import start_redis
from videos import encode_video

from .http_client import ADMIN, CAM_ADMIN, CAM_READER, READER


@pytest.fixture(scope="package")
def served(tmp_path_factory, ray_local):
    root = tmp_path_factory.mktemp("api")
    videos = root / "videos"
    clip = encode_video(videos / "clip.mp4", 160, 90, 30, seconds=4.0).path      # 2 segments of 2 s
    redis = start_redis(root / "redis")
    settings = load_settings(
        data_dir=root / "data", redis_url=redis.url, file_roots=[videos], segment_seconds=2.0,
        model_path=exclaiming_model(root / "model"),
        min_pixels=4 * 784, max_pixels=16 * 784,
        api_keys=[{"key": ADMIN, "role": "admin"}, {"key": READER, "role": "reader"},
                  {"key": CAM_READER, "role": "reader", "sources": ["cam1"]},
                  {"key": CAM_ADMIN, "role": "admin", "sources": ["cam1"]}],
        api_max_question_chars=200, api_max_window_seconds=3600, api_max_new_tokens=1024, api_max_request_bytes=4096,
        api_default_new_tokens=64,
        api_max_images=2, api_max_image_bytes=16384,     # image routes: 4096 + 2 base64 images = 47920 bytes
        decoder_cpus=0, decoder_max_ongoing_requests=1, decoder_max_queued_requests=1, api_retry_after_seconds=7,
        feed_reconcile_seconds=0.5, job_reconcile_seconds=0.5, caption_max_new_tokens=8, caption_poll_seconds=0.5,
        feed_allow_hosts=["127.0.0.1"])            # test feeds on 127.0.0.1; the rest of loopback stays refused
    port = free_port()
    url = run_app(settings, host="127.0.0.1", port=port, live=False)
    state = {"url": url, "settings": settings, "redis": redis, "clip": clip, "port": port}
    yield state
    stop_app()
    redis.stop()


def exclaiming_model(directory: Path) -> Path:
    """The tiny random checkpoint with its output layer zeroed: every logit is 0, so greedy decoding always picks
    token 0, which the tiny tokenizer decodes as "!". A known answer lets the tests check streamed text exactly; the
    hidden states (caption vectors) are untouched."""
    import qwen2vl
    from safetensors.torch import load_file, save_file

    path = Path(qwen2vl.write_tiny_checkpoint(directory))
    weights = load_file(str(path / "model.safetensors"))
    weights["lm_head.weight"].zero_()
    save_file(weights, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path
