"""Every tubescope Prometheus metric, defined once: its exported name, kind, help text, labels and buckets.

pipeline/metrics.py records them through Ray; dashboards and their tests read this catalogue.
"""
from __future__ import annotations

from dataclasses import dataclass

PREFIX = "tubescope_"

# Bucket boundaries (seconds unless said otherwise); Ray requires them positive and increasing.
FAST_SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
SLOW_SECONDS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0)
LIVE_LATENCY_SECONDS = (0.5, 1.0, 2.0, 3.0, 5.0, 8.0, 13.0, 20.0, 30.0, 60.0, 120.0)
FILL_RATIO = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0, 1.5, 2.0, 4.0)   # >1: one tube over budget

PIPELINES = ("live", "archive")
RETENTION_REASONS = ("age", "size")
HTTP_TIMEOUT_PHASES = ("head", "send")
DECODE_ERROR_KINDS = ("not_found", "empty", "corrupt", "unsupported", "frame_size", "io", "packet", "other")


@dataclass(frozen=True)
class MetricSpec:
    name: str                          # the final exported name, tubescope_*
    kind: str                          # "counter" | "gauge" | "histogram"
    help: str
    labels: tuple[str, ...] = ()
    buckets: tuple[float, ...] = ()    # histograms only

    def series_names(self) -> tuple[str, ...]:
        """The sample names Prometheus stores for this metric."""
        if self.kind == "histogram":
            return (f"{self.name}_bucket", f"{self.name}_sum", f"{self.name}_count")
        return (self.name,)


_SPECS = [
    # ---- feeds (label feed = the feed id = source_id of its segments)
    MetricSpec("tubescope_feed_up", "gauge", "One while the feed's reader is connected to its source, else 0",
               ("feed",)),
    MetricSpec("tubescope_feed_frames_decoded_total", "counter", "Frames decoded from the source", ("feed",)),
    MetricSpec("tubescope_feed_frames_sampled_total", "counter", "Frames kept by the 2 fps sampler", ("feed",)),
    MetricSpec("tubescope_feed_lag_seconds", "gauge", "Wall clock minus the time of the last sampled frame", ("feed",)),
    MetricSpec("tubescope_feed_reconnects_total", "counter", "Successful reopenings of the source", ("feed",)),
    MetricSpec("tubescope_feed_dropped_segments_total", "counter",
               "Segments dropped (oldest first) because the indexer was behind", ("feed",)),
    MetricSpec("tubescope_feed_last_segment_timestamp_seconds", "gauge",
               "End time (epoch seconds) of the feed's last completed segment", ("feed",)),
    MetricSpec("tubescope_feed_queued_segments", "gauge", "Segments waiting in the reader's queue", ("feed",)),
    MetricSpec("tubescope_recording_paused", "gauge",
               "One while the feed's recording is paused by a failed write (a full or read-only disk)", ("feed",)),
    MetricSpec("tubescope_live_segment_latency_seconds", "histogram",
               "Wall clock from a live segment's last frame until it is indexed", ("feed",), LIVE_LATENCY_SECONDS),
    MetricSpec("tubescope_live_lost_segments_total", "counter",
               "Live segments the indexer dropped (index writes failing past the feed's queue, encoding failed)",
               ("feed",)),
    MetricSpec("tubescope_feed_registry_restores_total", "counter",
               "Times Redis came back without the feed registry and it was restored from the durable copy"),
    # ---- pipeline (label pipeline = live | archive)
    MetricSpec("tubescope_segments_processed_total", "counter", "Segments encoded and written to the index",
               ("pipeline",)),
    MetricSpec("tubescope_tubes_processed_total", "counter", "Tubes (2-frame temporal patches) encoded", ("pipeline",)),
    MetricSpec("tubescope_patches_processed_total", "counter", "14x14x2 patches encoded", ("pipeline",)),
    MetricSpec("tubescope_visual_tokens_total", "counter", "Merged visual tokens produced by the encoder",
               ("pipeline",)),
    MetricSpec("tubescope_encoder_batch_fill_ratio", "histogram", "Packed patches / token budget of each encoder batch",
               ("pipeline",), FILL_RATIO),
    MetricSpec("tubescope_encoder_batch_duration_seconds", "histogram", "Wall time of one encoder batch",
               ("pipeline",), FAST_SECONDS),
    MetricSpec("tubescope_decode_errors_total", "counter", "Videos or packets that could not be decoded", ("kind",)),
    MetricSpec("tubescope_events_outbox_events", "gauge",
               "Events waiting in the local outbox because Redis was unreachable"),
    MetricSpec("tubescope_events_dropped_total", "counter",
               "Events that will never reach Redis (outbox full, rejected)"),
    # ---- index (label source = source_id)
    MetricSpec("tubescope_index_segments", "gauge", "Segments stored in the index", ("source",)),
    MetricSpec("tubescope_index_bytes", "gauge", "Bytes of segment data stored in the index", ("source",)),
    MetricSpec("tubescope_index_retention_deletions_total", "counter", "Segments deleted by the retention sweep",
               ("reason",)),
    # ---- captions
    MetricSpec("tubescope_captions_total", "counter", "Segments captioned (caption and vector written to the index)"),
    MetricSpec("tubescope_caption_backlog_segments", "gauge", "Indexed segments still waiting for a caption"),
    MetricSpec("tubescope_caption_lag_seconds", "gauge",
               "Time since the oldest segment still waiting for a caption was indexed (0: none waiting)"),
    # ---- queries (label endpoint = the route, status = the HTTP status code)
    MetricSpec("tubescope_requests_total", "counter", "API requests", ("endpoint", "status")),
    MetricSpec("tubescope_http_timeouts_total", "counter",
               "Connections the HTTP proxy closed for a slow client: phase head = the request head did not arrive "
               "within api_header_timeout_seconds, send = nothing of a waiting response read for "
               "api_keep_alive_seconds", ("phase",)),
    MetricSpec("tubescope_request_duration_seconds", "histogram", "API request latency", ("endpoint",), SLOW_SECONDS),
    MetricSpec("tubescope_ask_duration_seconds", "histogram", "Time to answer a question (all tokens)", (),
               SLOW_SECONDS),
    MetricSpec("tubescope_ask_time_to_first_token_seconds", "histogram", "Time from a question to its first token",
               (), SLOW_SECONDS),
    MetricSpec("tubescope_generated_tokens_total", "counter", "Tokens generated by the decoder"),
    MetricSpec("tubescope_prefix_cache_hits_total", "counter", "Asks that reused cached video-prefix KV"),
    MetricSpec("tubescope_prefix_cache_misses_total", "counter", "Asks that had to prefill their video prefix"),
    MetricSpec("tubescope_search_duration_seconds", "histogram", "Time to rank segments for a search", (),
               SLOW_SECONDS),
    # ---- standing alerts (label alert = the alert id; result = delivered | failed | dropped)
    MetricSpec("tubescope_alert_hits_total", "counter", "Standing-alert hits (score over threshold, past cooldown)",
               ("alert",)),
    MetricSpec("tubescope_alert_scoring_seconds", "histogram",
               "Wall time to score one round of new live segments against the standing alerts", (), FAST_SECONDS),
    MetricSpec("tubescope_alert_webhook_total", "counter", "Alert webhook deliveries by result", ("result",)),
]
METRICS: dict[str, MetricSpec] = {s.name: s for s in _SPECS}


def exported_series_names() -> set[str]:
    """Every sample name tubescope exports (after prometheus.yml drops Ray's prefix)."""
    return {n for s in METRICS.values() for n in s.series_names()}
