"""The feed registry: which live sources tubescope reads, kept in Redis, and how each one is read.

Hash `tubescope:feeds`, feed id -> JSON {id, url, name, fps, max_pixels, record, created}, and `tubescope:feeds:version`,
raised with every change in the same transaction. The id is the source_id of the feed's segments. The supervisor
keeps a durable copy beside the index (pipeline/registry_copy.py). add_feed / list_feeds / get_feed / remove_feed
work on a redis.Redis client or a redis:// URL; add_feed checks everything before storing anything (the URL against
the protocol table, local files against the allowed roots, per-feed fps by the segment rule, max_pixels against the
encoder budget, and last the host every address of it resolves to, under host_policy). sampler_config turns a
record and the settings into the plain StreamSampler config (pipeline.video never reads settings).
"""
from __future__ import annotations

import json
import re
import time
import uuid
from typing import Any
from urllib.parse import urlsplit

from pipeline.redis_server import as_client
from pipeline.settings import Settings, load_settings
from pipeline.video.hosts import HostPolicy, Service, check_host
from pipeline.video.protocols import ALL_SCHEMES, check_protocol, check_regular_file, check_roots, validate_url
from pipeline.video.segments import frames_per_segment
from pipeline.video.sampler_config import SamplerConfig
from qwen2vl.geometry import PATCH_AREA, TOKEN_AREA

FEEDS_KEY = "tubescope:feeds"
VERSION_KEY = "tubescope:feeds:version"       # INCR on every change, in the same transaction
_FEED_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")        # the whole id (fullmatch: no trailing newline)
MAX_FPS = 30.0


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def add_feed(redis: Any, url: str, name: str | None = None, fps: float | None = None,
             max_pixels: int | None = None, *, feed_id: str | None = None, record: bool = True,
             schemes: tuple[str, ...] | list[str] = ALL_SCHEMES, file_roots: list | None = None,
             settings: Settings | None = None) -> dict:
    """Register a feed and return its record. Raises ValueError for bad input (nothing is stored then).

    schemes: the URL schemes accepted (the REST API passes settings.feed_schemes). file_roots: when given,
    local files must lie under one of them (the REST API passes settings.file_roots); None (trusted Python
    callers) accepts any local path. fps and max_pixels override the settings for this feed (None: use them);
    they are checked against `settings` (default: load_settings()). record=False: this feed is never recorded. The host is checked under host_policy(settings)
    whoever calls: no caller may point a feed at this node's own services.
    """
    settings = settings or load_settings()
    url = validate_url(url, schemes)
    check_protocol(url)
    check_roots(url, file_roots)
    check_regular_file(url)
    if name is not None and (not isinstance(name, str) or not name.strip() or len(name) > 200):
        raise ValueError(f"name must be a non-empty string of at most 200 characters, got {name!r}")
    if fps is not None:
        if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not 0 < fps <= MAX_FPS:
            raise ValueError(f"fps must be a number in (0, {MAX_FPS:g}], got {fps!r}")
        frames_per_segment(fps, settings.segment_seconds)
        fps = float(fps)
    if max_pixels is not None:
        budget_px = settings.encoder_token_budget * PATCH_AREA
        if isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or not TOKEN_AREA <= max_pixels <= budget_px:
            raise ValueError(f"max_pixels must be an int in [{TOKEN_AREA}, {budget_px}] (one frame must fit the "
                             f"encoder token budget), got {max_pixels!r}")
    if not isinstance(record, bool):
        raise ValueError(f"record must be true or false, got {record!r}")
    if feed_id is None:
        feed_id = uuid.uuid4().hex[:12]
    elif not isinstance(feed_id, str) or not _FEED_ID.fullmatch(feed_id):
        raise ValueError(f"feed_id must be 1-64 letters, digits, '_', '.' or '-' (starting with a letter or digit), "
                         f"got {feed_id!r}")
    check_host(url, host_policy(settings))            # last: it may ask DNS
    record = {"id": feed_id, "url": url, "name": name.strip() if name else feed_id, "fps": fps,
              "max_pixels": max_pixels, "record": record, "created": time.time()}
    pipe = as_client(redis).pipeline(transaction=True)
    pipe.hsetnx(FEEDS_KEY, feed_id, json.dumps(record))
    pipe.incr(VERSION_KEY)
    if not pipe.execute()[0]:
        raise ValueError(f"a feed with id {feed_id!r} already exists")
    return record


def _sorted(feeds: list[dict]) -> list[dict]:
    return sorted(feeds, key=lambda f: (f.get("created", 0), f["id"]))


def list_feeds(redis: Any) -> list[dict]:
    """Every registered feed, oldest first."""
    return _sorted([json.loads(_text(v)) for v in as_client(redis).hvals(FEEDS_KEY)])


def read_registry(redis: Any) -> tuple[int | None, list[dict]]:
    """(version, feeds) in one read. The version goes up with every change; None means Redis holds no registry at
    all (a new server, or one that restarted without persistence), which `registry_lost` tells from "no feeds"."""
    pipe = as_client(redis).pipeline(transaction=True)
    pipe.get(VERSION_KEY)
    pipe.hvals(FEEDS_KEY)
    version, values = pipe.execute()
    return (None if version is None else int(version)), _sorted([json.loads(_text(v)) for v in values])


def registry_lost(version: int | None, feeds: list[dict]) -> bool:
    """True when Redis has neither feeds nor a version: every removal leaves the version behind, a lost dataset
    does not (then the durable copy, pipeline.registry_copy, knows the feeds)."""
    return version is None and not feeds


def get_feed(redis: Any, feed_id: str) -> dict:
    """The feed's record; KeyError for an unknown id."""
    raw = as_client(redis).hget(FEEDS_KEY, feed_id)
    if raw is None:
        raise KeyError(f"no feed with id {feed_id!r}")
    return json.loads(_text(raw))


def remove_feed(redis: Any, feed_id: str) -> dict:
    """Unregister a feed and return its record; KeyError for an unknown id. A supervisor stops its reader."""
    pipe = as_client(redis).pipeline(transaction=True)
    pipe.hget(FEEDS_KEY, feed_id)
    pipe.hdel(FEEDS_KEY, feed_id)
    pipe.incr(VERSION_KEY)
    raw, deleted, _ = pipe.execute()
    if raw is None or not deleted:
        raise KeyError(f"no feed with id {feed_id!r}")
    return json.loads(_text(raw))




def host_policy(settings: Settings) -> HostPolicy:
    """Where feeds may point under `settings`: feed_allow_hosts, feed_udp_listen, and the service's own ports known
    to this process (the API, Redis, Ray's metrics export, and every Ray port of the cluster when Ray is up)."""
    services = [Service("API", settings.host, settings.port)]
    if settings.redis_url:
        redis = urlsplit(settings.redis_url)
        if redis.scheme in ("redis", "rediss") and redis.hostname:
            services.append(Service("Redis", redis.hostname, redis.port or 6379))
    if settings.metrics_export_port:
        services.append(Service("Ray metrics export", "", settings.metrics_export_port))
    services += _ray_services()
    return HostPolicy(allow=tuple(settings.feed_allow_hosts), services=tuple(dict.fromkeys(services)),
                      udp_listen=settings.feed_udp_listen)


_RAY_NODE_PORTS = ("NodeManagerPort", "ObjectManagerPort", "MetricsExportPort", "MetricsAgentPort",
                   "DashboardAgentListenPort", "RuntimeEnvAgentPort")


def _ray_services() -> list[Service]:
    """The ports of the Ray cluster this process belongs to: its GCS and each live node's raylet, object manager and
    agents. None outside Ray."""
    import ray

    if not ray.is_initialized():
        return []
    gcs_host, _, gcs_port = (ray.get_runtime_context().gcs_address or "").rpartition(":")
    out = [Service("Ray GCS", gcs_host, int(gcs_port))] if gcs_port.isdigit() else []
    for node in ray.nodes():
        if node.get("Alive"):
            out += [Service("Ray", node.get("NodeManagerAddress", ""), int(node[key]))
                    for key in _RAY_NODE_PORTS if node.get(key)]
    return out


def sampler_config(feed: dict, settings: Settings | None = None, **overrides: Any) -> SamplerConfig:
    """The StreamSampler config of a registry record: settings, then the feed's fps/max_pixels, then overrides."""
    settings = settings or load_settings()
    per_feed = {"fps": feed.get("fps"), "max_pixels": feed.get("max_pixels")}
    if per_feed["max_pixels"] is not None:          # a small per-feed cap lowers the floor with it
        per_feed["min_pixels"] = min(settings.min_pixels, per_feed["max_pixels"])
    # the stored URL is checked again by the reader under today's settings: schemes, hosts, and the file roots when set
    values = dict(fps=settings.fps, segment_seconds=settings.segment_seconds, min_pixels=settings.min_pixels,
                  max_pixels=settings.max_pixels, queue_size=settings.feed_queue_segments,
                  backoff_max_s=settings.feed_reconnect_max_seconds,
                  schemes=tuple(settings.feed_schemes) + ("file",),
                  file_roots=tuple(str(r) for r in settings.file_roots) or None, hosts=host_policy(settings))
    values["backoff_initial_s"] = min(SamplerConfig.backoff_initial_s, values["backoff_max_s"])
    values.update({k: v for k, v in {**per_feed, **overrides}.items() if v is not None})
    return SamplerConfig(source_id=feed["id"], url=feed["url"], **values)


def resolve_sources(requested: list[str], source_ids: set[str], feeds: list[dict] | None) -> list[str]:
    """Source ids for what a person wrote: a source (or feed) id as is, or a feed's name. ValueError when a name is
    ambiguous (several feeds, or a feed name that is also another source's id). Unknown words stay as they are, for
    the caller's "unknown source" error. `feeds` (list_feeds) may be None when every word is a known id."""
    by_name: dict[str, list[str]] = {}
    for f in feeds or []:
        by_name.setdefault(f.get("name") or f["id"], []).append(f["id"])
    out = []
    for word in requested:
        named = [i for i in by_name.get(word, []) if i != word]
        known = word in source_ids or any(f["id"] == word for f in feeds or [])
        if named and (known or len(named) > 1):
            ids = sorted(set(named) | ({word} if known else set()))
            raise ValueError(f"{word!r} names several sources ({', '.join(ids)}): use a source id")
        out.append(named[0] if named else word)
    return list(dict.fromkeys(out))
