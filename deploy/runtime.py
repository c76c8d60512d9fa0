"""What every long-running tubescope command needs: Redis (configured or embedded), Ray, the checkpoint, the index
and the event sink, set up in one place and torn down in reverse order."""
from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from pipeline.settings import Settings


@dataclass
class Runtime:
    settings: Settings
    redis_url: str
    embedded_redis: bool
    model_path: Path
    index: "object"          # pipeline.index.SegmentIndex
    events: "object"         # pipeline.events.EventSink


def ensure_model(settings: Settings) -> Path:
    """The checkpoint folder; the tiny random model is written on first use when none is configured."""
    path = settings.resolved_model_path()
    if settings.uses_tiny_model and not (path / "config.json").is_file():
        import qwen2vl

        qwen2vl.write_tiny_checkpoint(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"no checkpoint at {path} (config.json missing); set TUBESCOPE_MODEL_PATH")
    return path


def init_ray(settings: Settings) -> None:
    """Join RAY_ADDRESS when set (a cluster), else start a local Ray without the dashboard."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")     # local, loopback-only cluster owned by this process
    ray.init(address=os.environ.get("RAY_ADDRESS"), include_dashboard=False, logging_level=logging.WARNING,
             ignore_reinit_error=True, runtime_env={"env_vars": {"RAY_AUTH_MODE": "disabled"}}
             if not os.environ.get("RAY_ADDRESS") else None)


@contextlib.contextmanager
def local_runtime(settings: Settings, *, ray_init: bool = True) -> Iterator[Runtime]:
    from pipeline.events import EventSink
    from pipeline.index import SegmentIndex
    from pipeline.redis_server import redis_endpoint

    settings.data_dir.mkdir(parents=True, exist_ok=True)
    with redis_endpoint(settings) as ep:
        model_path = ensure_model(settings)
        if ray_init:
            init_ray(settings)
        events = EventSink(ep.url, settings.outbox_dir, maxlen=settings.stream_maxlen,
                           outbox_max=settings.outbox_max_events)
        try:
            yield Runtime(settings, ep.url, ep.server is not None, model_path, SegmentIndex(settings.index_root),
                          events)
        finally:
            events.close()
