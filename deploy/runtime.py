"""What every long-running tubescope command needs: Redis (configured or embedded), Ray, the checkpoint, the index
and the event sink, set up in one place and torn down in reverse order."""
from __future__ import annotations

import contextlib
import logging
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from pipeline.settings import Settings

TINY_MODEL_NOTE = ("the tiny model has random weights: its outputs are meaningless; set TUBESCOPE_MODEL_PATH to a "
                   "Qwen2-VL checkpoint folder (Hugging Face layout) for real answers")


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


def ray_address() -> str | None:
    """The cluster to join (RAY_ADDRESS), or None when tubescope starts and owns a local Ray."""
    return os.environ.get("RAY_ADDRESS") or None


def init_ray(settings: Settings) -> None:
    """Join RAY_ADDRESS when set (a cluster), else start a closed local Ray without the dashboard."""
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], logging_level=logging.WARNING)
        return
    # a fixed metrics export port is what dashboards/prometheus.yml scrapes (every actor's tubescope_* metrics)
    # (when that port is taken, e.g. by another local tubescope, Ray picks one: a clash would stop Ray from starting)
    port = settings.metrics_export_port
    if port and not _port_free(port):
        logging.getLogger(__name__).warning("metrics export port %d is in use; Ray picks another", port)
        port = 0
    start_closed_ray(include_dashboard=False, logging_level=logging.WARNING, ignore_reinit_error=True,
                     _metrics_export_port=port or None)


# Ray's single-machine mode (named for Windows and macOS, where it is the default): the node's address is 127.0.0.1,
# and Ray binds the ports of a node at 127.0.0.1 to loopback. Each Ray process reads the variable when it imports Ray.
RAY_SINGLE_MACHINE_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
RAY_TOKEN_ENV = "RAY_AUTH_TOKEN"
LOOPBACK = "127.0.0.1"
# one token per process: Ray's token loader keeps the first one it reads for the life of the process
_RUN_TOKEN = secrets.token_urlsafe(32)


def start_closed_ray(**init_args):
    """`ray.init(**init_args)` of a new local cluster that only this run can use: every port of every Ray process
    (GCS, raylet, object manager, workers, agents, metrics) on 127.0.0.1, and Ray's token authentication on with a
    random token of this process, which only the processes it starts inherit (never printed or written to a file).
    Stops Ray and raises when the node did not come up on loopback. See docs/architecture.md, "The local Ray
    cluster and secrets", for what that leaves open."""
    import ray
    from ray._private import ray_constants

    os.environ[RAY_SINGLE_MACHINE_ENV] = "0"          # for the processes Ray starts
    ray_constants.ENABLE_RAY_CLUSTER = False          # this process imported Ray before the variable was set
    # RAY_AUTH_MODE left unset: a new local cluster then turns token authentication on by itself, which also
    # reloads this process's Ray config (read when Ray was imported), and takes the token from RAY_AUTH_TOKEN
    for name in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH"):
        os.environ.pop(name, None)
    os.environ[RAY_TOKEN_ENV] = _RUN_TOKEN
    notice = logging.getLogger("ray._private.authentication.authentication_token_setup")
    level = notice.level
    notice.setLevel(logging.ERROR)                    # its notice offers an opt-out this cluster does not have
    try:
        context = ray.init(**init_args)
    finally:
        notice.setLevel(level)
    node = context.address_info["node_ip_address"]
    if node != LOOPBACK:
        ray.shutdown()
        raise RuntimeError(f"the local Ray came up on {node}, not {LOOPBACK}: refusing to run it open to the network")
    return context


def _port_free(port: int) -> bool:
    import socket

    with socket.socket() as s:
        try:
            s.bind(("", port))
        except OSError:
            return False
    return True


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
