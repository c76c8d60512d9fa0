"""Records every tubescope Prometheus metric (defined in pipeline/metric_catalog.py) through small helpers.

Mechanism: `ray.util.metrics` (Counter / Gauge / Histogram). A value recorded in any Ray process (driver, actor,
Ray Data worker, Serve replica) goes to its node's metrics agent, which serves it on the node's metrics export
port beside Ray's own metrics; one Prometheus scrape job over the Ray nodes sees everything. Ray adds the prefix
`ray_` (`ray_tubescope_feed_up`); dashboards/prometheus.yml renames `ray_tubescope_*` back to `tubescope_*`, the
names of the catalogue (RAY_PREFIX). Values reach the agent every RAY_metrics_report_interval_ms (Ray's default
10 s; 1 s in the tests). Ray labels every series with WorkerId etc., so dashboards aggregate with sum/max by.
Ray forgets a gauge that was not set again within two report intervals, so this module re-sets the last value
of every gauge series of its process every GAUGE_REFRESH_S (a daemon thread); counters and histograms persist.

Outside Ray (the CLI before ray.init, plain unit tests) every helper is a no-op: ray is not even imported. A
helper never raises because of the export itself; it does raise ValueError for arguments that are wrong (a bug
in the caller), so instrumentation mistakes show up in tests.
Source ids (labels feed, source) go through `source_label`; each path that records them calls `configure` first.
"""
from __future__ import annotations

import hashlib
import hmac
import logging
import math
import numbers
import os
import sys
import threading
import time
from collections.abc import Iterable, Mapping

from pipeline.metric_catalog import (DECODE_ERROR_KINDS, HTTP_TIMEOUT_PHASES, METRICS, PIPELINES, PREFIX,
                                     RETENTION_REASONS)

log = logging.getLogger("tubescope.metrics")

GAUGE_REFRESH_S = 1.0        # below Ray's smallest report interval (1 s), so no gauge ever ages out
RAY_PREFIX = "ray_"          # what Ray's exporter puts in front of every application metric name


# ---------------------------------------------------------------- export through Ray

_lock = threading.Lock()
_instances: dict[str, object] = {}
_failed_once: set[str] = set()
_gauge_values: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}   # (name, tags) -> last value set here
_refresher_pid: int | None = None          # the process whose refresher thread runs (a fork needs its own)
_source_key: bytes | None = None           # this process's metrics_source_key (configure)


def configure(settings) -> None:
    """Take this process's metric settings (the feed reader, live indexer, archive jobs and retention call it)."""
    global _source_key
    _source_key = settings.metrics_source_key.encode() if settings.metrics_source_key else None


def source_label(source_id: str) -> str:
    """A source's label value: its id, or with metrics_source_key "src-" + 12 hex digits of HMAC-SHA256(key, id),
    stable across processes and runs. Keyed, so a guessable id ("lobby") is not found by hashing guesses."""
    source_id = _label("source_id", source_id)
    if _source_key is None:
        return source_id
    return "src-" + hmac.new(_source_key, source_id.encode(), hashlib.sha256).hexdigest()[:12]


def enabled() -> bool:
    """True when recorded values are exported: this process is a Ray driver or worker."""
    ray = sys.modules.get("ray")             # never import Ray just to find out it is not running
    try:
        return ray is not None and ray.is_initialized()
    except Exception:                        # a half-imported or shut-down Ray: treat as off
        return False


def _metric(name: str):
    """The ray.util.metrics object of `name`, created on first use in this process; None when Ray is off."""
    if not enabled():
        return None
    inst = _instances.get(name)
    if inst is not None:
        return inst
    spec = METRICS[name]
    with _lock:
        inst = _instances.get(name)
        if inst is None:
            from ray.util import metrics as ray_metrics

            if spec.kind == "counter":
                inst = ray_metrics.Counter(spec.name, description=spec.help, tag_keys=spec.labels)
            elif spec.kind == "gauge":
                inst = ray_metrics.Gauge(spec.name, description=spec.help, tag_keys=spec.labels)
            else:
                inst = ray_metrics.Histogram(spec.name, description=spec.help, boundaries=list(spec.buckets),
                                             tag_keys=spec.labels)
            _instances[name] = inst
    return inst


def _export(name: str, op: str, value: float, tags: dict[str, str] | None = None) -> None:
    """Hand one value to Ray; an export problem is logged once per metric, never raised."""
    try:
        inst = _metric(name)
        if inst is None:
            return
        getattr(inst, op)(value, tags=tags or None)
    except Exception as e:                   # metrics must never take the pipeline down
        if name not in _failed_once:
            _failed_once.add(name)
            log.warning("could not export metric %s: %s: %s", name, type(e).__name__, e)


def _set_gauge(name: str, value: float, tags: dict[str, str] | None = None) -> None:
    """Set a gauge and remember it, so the refresher keeps it alive in Ray's export."""
    global _refresher_pid
    with _lock:
        _gauge_values[(name, tuple(sorted((tags or {}).items())))] = value
        start = _refresher_pid != os.getpid() and enabled()
        if start:
            _refresher_pid = os.getpid()
    _export(name, "set", value, tags)
    if start:
        threading.Thread(target=_refresh_gauges, name="tubescope-gauges", daemon=True).start()


def _refresh_gauges() -> None:
    while True:
        time.sleep(GAUGE_REFRESH_S)
        with _lock:
            items = list(_gauge_values.items())
        for (name, tags), value in items:
            _export(name, "set", value, dict(tags))


# ---------------------------------------------------------------- argument checks

def _number(what: str, value, *, minimum: float | None = 0.0) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        raise ValueError(f"{what} must be a finite number, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{what} must be >= {minimum:g}, got {value!r}")
    return float(value)


def _count(what: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ValueError(f"{what} must be an int >= 0, got {value!r}")
    return int(value)


def _label(what: str, value, allowed: tuple[str, ...] | None = None) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{what} must be a non-empty str, got {value!r}")
    if allowed is not None and value not in allowed:
        raise ValueError(f"{what} must be one of {', '.join(allowed)}, got {value!r}")
    return value


def _inc(name: str, amount: float, tags: dict[str, str] | None = None) -> None:
    if amount > 0:                           # Ray rejects inc(0); a counter that never moved simply has no series
        _export(name, "inc", float(amount), tags)


# ---------------------------------------------------------------- feeds

_feed_totals: dict[tuple[str, str], float] = {}      # (feed, status key) -> last cumulative value seen
_FEED_COUNTERS = (("frames_decoded", "tubescope_feed_frames_decoded_total", None),
                  ("frames_sampled", "tubescope_feed_frames_sampled_total", None),
                  ("reconnects", "tubescope_feed_reconnects_total", None),
                  ("drops", "tubescope_feed_dropped_segments_total", None),
                  ("packets_skipped", "tubescope_decode_errors_total", {"kind": "packet"}))   # live: undecodable


def record_feed_status(feed_id: str, status: Mapping) -> None:
    """Export one snapshot of StreamSampler.status() (FeedReader calls this every second).

    Counters advance by the difference to the previous snapshot of the same feed in this process; a smaller
    value (a new sampler) counts from zero again. Missing keys are skipped.
    """
    feed = source_label(feed_id)
    if not isinstance(status, Mapping):
        raise ValueError(f"status must be a mapping (StreamSampler.status()), got {type(status).__name__}")
    tags = {"feed": feed}
    _set_gauge("tubescope_feed_up", 1.0 if status.get("connected") else 0.0, tags)
    _set_gauge("tubescope_recording_paused", 1.0 if status.get("recording_error") else 0.0, tags)
    for key, name in (("lag_s", "tubescope_feed_lag_seconds"),
                      ("last_segment_time", "tubescope_feed_last_segment_timestamp_seconds"),
                      ("queued", "tubescope_feed_queued_segments")):
        if status.get(key) is not None:
            _set_gauge(name, _number(f"status[{key!r}]", status[key], minimum=None), tags)
    for key, name, own_tags in _FEED_COUNTERS:
        if status.get(key) is None:
            continue
        now = _number(f"status[{key!r}]", status[key])
        with _lock:
            before = _feed_totals.get((feed, key), 0.0)
            _feed_totals[(feed, key)] = now
        _inc(name, now - before if now >= before else now, own_tags or tags)


def record_feed_stopped(feed_id: str) -> None:
    """The feed's reader stopped: it is down, and its queue is gone."""
    tags = {"feed": source_label(feed_id)}
    _set_gauge("tubescope_feed_up", 0.0, tags)
    _set_gauge("tubescope_feed_queued_segments", 0.0, tags)


def record_live_latency(feed_id: str, seconds: float) -> None:
    """A live segment was indexed `seconds` after its last frame."""
    _export("tubescope_live_segment_latency_seconds", "observe",
            max(0.0, _number("seconds", seconds, minimum=None)), {"feed": source_label(feed_id)})


def record_live_lost(feed_id: str, count: int) -> None:
    """The live indexer dropped `count` of this feed's segments."""
    _inc("tubescope_live_lost_segments_total", _count("count", count), {"feed": _label("feed_id", feed_id)})


def record_registry_restored() -> None:
    _inc("tubescope_feed_registry_restores_total", 1)


# ---------------------------------------------------------------- pipeline

def record_encoder_batch(fill: float, seconds: float, patches: int, tubes: int, tokens: int | None = None,
                         pipeline: str = "archive") -> None:
    """One packed encoder batch: its fill ratio (patches / budget), wall time, patches, tubes and merged tokens
    (default patches // 4, the 2x2 spatial merge)."""
    tags = {"pipeline": _label("pipeline", pipeline, PIPELINES)}
    fill, seconds = _number("fill", fill), _number("seconds", seconds)
    patches, tubes = _count("patches", patches), _count("tubes", tubes)
    tokens = patches // 4 if tokens is None else _count("tokens", tokens)
    _export("tubescope_encoder_batch_fill_ratio", "observe", fill, tags)
    _export("tubescope_encoder_batch_duration_seconds", "observe", seconds, tags)
    _inc("tubescope_patches_processed_total", patches, tags)
    _inc("tubescope_tubes_processed_total", tubes, tags)
    _inc("tubescope_visual_tokens_total", tokens, tags)


def record_segments_indexed(count: int, pipeline: str) -> None:
    """`count` segments were newly written to the index by the live or archive pipeline."""
    _inc("tubescope_segments_processed_total", _count("count", count),
         {"pipeline": _label("pipeline", pipeline, PIPELINES)})


def decode_error_kind(message: str) -> str:
    """A short, bounded label for an archive failure message (pipeline.video.media.DecodeError text and the like)."""
    if not isinstance(message, str):
        raise ValueError(f"message must be a str, got {type(message).__name__}")
    text = message.lower()
    rules = (("not_found", ("no such file", "glob matched no files", "folder holds no video", "not a regular file")),
             ("empty", ("is empty",)),
             ("unsupported", ("no video stream", "unsupported codec", "no frame size")),
             ("frame_size", ("cannot be resized",)),
             ("corrupt", ("corrupt", "truncated", "not a readable", "no decodable", "decord")),
             ("io", ("cannot open", "oserror", "permission", "timed out")))
    for kind, needles in rules:
        if any(n in text for n in needles):
            return kind
    return "other"


def record_decode_error(kind: str) -> None:
    """One video (archive) or packet (live) that could not be decoded; kind from DECODE_ERROR_KINDS."""
    _inc("tubescope_decode_errors_total", 1, {"kind": _label("kind", kind, DECODE_ERROR_KINDS)})


_outbox_depths: dict[str, int] = {}                    # outbox folder -> events waiting (this process)


def record_outbox_depth(outbox: str, depth: int) -> None:
    """An EventSink's outbox now holds `depth` events; the gauge is this process's total over its outboxes."""
    key, depth = _label("outbox", outbox), _count("depth", depth)
    with _lock:
        _outbox_depths[key] = depth
        total = sum(_outbox_depths.values())
    _set_gauge("tubescope_events_outbox_events", float(total))


def record_events_dropped(count: int = 1) -> None:
    _inc("tubescope_events_dropped_total", _count("count", count))


# ---------------------------------------------------------------- index

def record_index_source(source_id: str, segments: int, nbytes: int) -> None:
    """The index now holds `segments` segments of `nbytes` data bytes for this source."""
    tags = {"source": source_label(source_id)}
    _set_gauge("tubescope_index_segments", float(_count("segments", segments)), tags)
    _set_gauge("tubescope_index_bytes", float(_count("nbytes", nbytes)), tags)


def record_index_sources(rows: Iterable[Mapping]) -> None:
    """SegmentIndex.sources() rows: {"source_id", "segments", "bytes"}."""
    for r in rows:
        record_index_source(r["source_id"], r["segments"], r["bytes"])


def record_retention_deletions(count: int, reason: str) -> None:
    """The retention sweep deleted `count` segments, for their age or for the total size cap."""
    _inc("tubescope_index_retention_deletions_total", _count("count", count),
         {"reason": _label("reason", reason, RETENTION_REASONS)})


# ---------------------------------------------------------------- captions

def record_captions(count: int) -> None:
    """`count` segments got their caption and vector."""
    _inc("tubescope_captions_total", _count("count", count))


def record_caption_backlog(segments: int, lag_s: float) -> None:
    """The captioner's backlog as last measured: segments waiting, and the oldest one's wait since indexing."""
    _set_gauge("tubescope_caption_backlog_segments", float(_count("segments", segments)))
    _set_gauge("tubescope_caption_lag_seconds", _number("lag_s", lag_s))


# ---------------------------------------------------------------- queries

def record_query(endpoint: str, status: int | str, seconds: float) -> None:
    """One API request: endpoint is the route template ("/v1/ask"), status the HTTP status code."""
    endpoint = _label("endpoint", endpoint)
    code = status if isinstance(status, int) and not isinstance(status, bool) else \
        int(status) if isinstance(status, str) and status.isdigit() else None
    if code is None or not 100 <= code <= 599:
        raise ValueError(f"status must be an HTTP status code (100-599), got {status!r}")
    _inc("tubescope_requests_total", 1, {"endpoint": endpoint, "status": str(code)})
    _export("tubescope_request_duration_seconds", "observe", _number("seconds", seconds), {"endpoint": endpoint})


def record_http_timeout(phase: str) -> None:
    """One connection closed by Serve's HTTP proxy for a slow client (deploy/http_deadlines.py): its request head
    came too late ("head"), or it read nothing of a waiting response for too long ("send")."""
    _inc("tubescope_http_timeouts_total", 1, {"phase": _label("phase", phase, HTTP_TIMEOUT_PHASES)})


def record_ask(ttft_s: float | None, total_s: float, new_tokens: int, cache_hit: bool | None) -> None:
    """One answered question: time to first token (None when no token came), total time, tokens generated, and
    whether the video-prefix KV came from the cache (None: no cache lookup was made)."""
    total_s, new_tokens = _number("total_s", total_s), _count("new_tokens", new_tokens)
    if cache_hit is not None and not isinstance(cache_hit, bool):
        raise ValueError(f"cache_hit must be True, False or None, got {cache_hit!r}")
    if ttft_s is not None:
        _export("tubescope_ask_time_to_first_token_seconds", "observe", _number("ttft_s", ttft_s))
    _export("tubescope_ask_duration_seconds", "observe", total_s)
    _inc("tubescope_generated_tokens_total", new_tokens)
    if cache_hit is True:
        _inc("tubescope_prefix_cache_hits_total", 1)
    elif cache_hit is False:
        _inc("tubescope_prefix_cache_misses_total", 1)


def record_search(seconds: float) -> None:
    """One search (segments ranked for a query)."""
    _export("tubescope_search_duration_seconds", "observe", _number("seconds", seconds))


# ---------------------------------------------------------------- standing alerts

def record_alert_hit(alert_id: str) -> None:
    _inc("tubescope_alert_hits_total", 1, {"alert": _label("alert_id", alert_id)})


def record_alert_scoring(seconds: float) -> None:
    _export("tubescope_alert_scoring_seconds", "observe", _number("seconds", seconds))


def record_alert_webhook(result: str) -> None:
    _inc("tubescope_alert_webhook_total", 1, {"result": _label("result", result, ("delivered", "failed", "dropped"))})


def node_exposition(timeout_s: float = 3.0) -> str:
    """The tubescope_* series this Ray node exports (every process on it), in Prometheus text format, named as
    Prometheus sees them after dashboards/prometheus.yml's relabelling. Empty outside Ray or when the node's
    metrics agent does not answer: a /metrics endpoint must never fail because of it."""
    if not enabled():
        return ""
    import urllib.request

    import ray

    try:
        me = ray.util.get_node_ip_address()
        node = next((n for n in ray.nodes() if n.get("Alive") and n.get("NodeManagerAddress") == me), None)
        port = node and node.get("MetricsExportPort")
        if not port:
            return ""
        with urllib.request.urlopen(f"http://{me}:{port}/metrics", timeout=timeout_s) as resp:
            text = resp.read().decode()
    except Exception as e:  # noqa: BLE001 - an unreachable agent means "nothing to add", not an error page
        log.debug("node metrics not available: %s", e)
        return ""
    keep = []
    for line in text.splitlines():
        body = line[7:] if line.startswith(("# HELP ", "# TYPE ")) else line
        if body.startswith(RAY_PREFIX + PREFIX):
            keep.append(line.replace(RAY_PREFIX + PREFIX, PREFIX, 1))
    return "\n".join(keep) + ("\n" if keep else "")


__all__ = ["node_exposition", "RAY_PREFIX",
           "configure", "decode_error_kind", "enabled", "record_ask", "record_decode_error",
           "record_encoder_batch", "record_events_dropped", "record_feed_status", "record_feed_stopped",
           "record_http_timeout", "record_index_source", "record_index_sources", "record_live_latency", "record_live_lost",
           "record_outbox_depth", "record_query", "record_registry_restored", "record_retention_deletions",
           "record_search", "record_segments_indexed", "source_label"]
