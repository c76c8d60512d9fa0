"""Metric helpers without Ray: the catalog's names follow Prometheus conventions, every helper is a silent no-op
outside Ray, bad arguments are a ValueError, and real decode failures map to their error kinds. The end-to-end test
through a real Prometheus lives in test_metrics.py."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import metric_catalog, metrics

ROOT = Path(__file__).resolve().parents[1]


def test_metric_names_follow_prometheus_conventions():
    assert len(metric_catalog.METRICS) >= 25
    for spec in metric_catalog.METRICS.values():
        assert spec.name.startswith(metric_catalog.PREFIX), spec.name
        assert spec.kind in {"counter", "gauge", "histogram"}, spec
        assert spec.help.strip(), spec
        assert all(label.isidentifier() and not label.startswith("__") for label in spec.labels), spec
        if spec.kind == "counter":
            assert spec.name.endswith("_total"), spec.name
        else:
            assert not spec.name.endswith("_total"), spec.name
        if spec.kind == "histogram":
            assert spec.name.endswith(("_seconds", "_ratio")), spec.name        # base units
            assert list(spec.buckets) == sorted(set(spec.buckets)) and spec.buckets[0] > 0, spec
        else:
            assert not spec.buckets, spec
        for word in ("_ms", "milliseconds", "_kb", "_mb", "minutes"):
            assert word not in spec.name, spec.name
    names = metric_catalog.exported_series_names()
    assert "tubescope_encoder_batch_duration_seconds_bucket" in names and "tubescope_feed_up" in names


def test_helpers_are_silent_no_ops_outside_ray():
    # a fresh interpreter: no Ray anywhere, so every helper must return quietly and never import ray
    code = """
import sys
from pipeline import metrics as m
m.record_feed_status("cam", {"connected": True, "lag_s": 0.4, "frames_decoded": 10, "frames_sampled": 2,
                             "reconnects": 0, "drops": 1, "queued": 1, "last_segment_time": 1.0e9,
                             "packets_skipped": 1})
m.record_feed_stopped("cam")
m.record_live_latency("cam", 1.5)
m.record_encoder_batch(0.5, 0.1, 100, 2, 25, pipeline="live")
m.record_segments_indexed(3, "archive")
m.record_decode_error("corrupt")
m.record_outbox_depth("/tmp/outbox", 3)
m.record_events_dropped(2)
m.record_index_source("cam", 3, 1000)
m.record_retention_deletions(1, "age")
m.record_query("/v1/ask", 200, 0.3)
m.record_http_timeout("head")
m.record_ask(0.1, 0.5, 12, True)
m.record_search(0.05)
assert not m.enabled()
assert "ray" not in sys.modules, "a helper imported ray"
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


@pytest.mark.parametrize("call, message", [
    (lambda: metrics.record_query("/v1/ask", 999, 0.1), "HTTP status"),
    (lambda: metrics.record_query("", 200, 0.1), "endpoint"),
    (lambda: metrics.record_query("/v1/ask", "ok", 0.1), "HTTP status"),
    (lambda: metrics.record_ask(None, -1.0, 3, True), "total_s"),
    (lambda: metrics.record_ask(0.1, 1.0, 3, "yes"), "cache_hit"),
    (lambda: metrics.record_encoder_batch(0.5, 0.1, 100, 2, pipeline="batch"), "pipeline"),
    (lambda: metrics.record_encoder_batch(float("nan"), 0.1, 100, 2), "fill"),
    (lambda: metrics.record_decode_error("mystery"), "kind"),
    (lambda: metrics.record_retention_deletions(1, "whim"), "reason"),
    (lambda: metrics.record_http_timeout("body"), "phase"),
    (lambda: metrics.record_feed_status("cam", [1, 2]), "mapping"),
    (lambda: metrics.record_feed_status("cam", {"frames_decoded": -3}), "frames_decoded"),
    (lambda: metrics.record_index_source("cam", 1.5, 10), "segments"),
])
def test_bad_arguments_raise_value_error(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_decode_error_kinds_of_real_failures(tmp_path, video_factory):
    from pipeline.archive_sources import expand_sources
    from pipeline.video.files import decode_window
    from pipeline.video.media import DecodeError, probe

    (tmp_path / "empty.mp4").write_bytes(b"")
    (tmp_path / "notes.mp4").write_text("not a video\n" * 40)
    good = video_factory("good.mp4", width=64, height=48, seconds=0.5)
    truncated = tmp_path / "truncated.mp4"
    truncated.write_bytes(good.read_bytes()[:2000])
    kinds = {}
    for name in ("empty.mp4", "notes.mp4", "missing.mp4", "truncated.mp4"):
        with pytest.raises(DecodeError) as e:
            probe(str(tmp_path / name))
            decode_window(str(tmp_path / name), 0.0, 1.0, fps=2.0)
        kinds[name] = metrics.decode_error_kind(str(e.value))
    assert kinds == {"empty.mp4": "empty", "notes.mp4": "corrupt", "missing.mp4": "not_found",
                     "truncated.mp4": "corrupt"}
    _, failed = expand_sources([str(tmp_path / "nothing-*.mp4"), str(tmp_path / "gone.mp4")])
    assert [metrics.decode_error_kind(f["error"]) for f in failed] == ["not_found", "not_found"]
    assert metrics.decode_error_kind("something new") == "other"
    assert set(kinds.values()) <= set(metric_catalog.DECODE_ERROR_KINDS)
