"""The Grafana dashboards, provisioning files and prometheus.yml are valid and only use metrics tubescope exports.

The PromQL of every panel is evaluated against a real Prometheus in tests/test_metrics.py; here the files are
checked on their own (fast, no services).
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from pipeline.metric_catalog import METRICS, exported_series_names
from pipeline.metrics import RAY_PREFIX

ROOT = Path(__file__).resolve().parents[1] / "dashboards"
DASHBOARD_FILES = sorted((ROOT / "grafana").glob("*.json"))
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
FEED_VARIABLE_QUERY = "label_values(tubescope_feed_up, feed)"

# PromQL words that are not metric names: aggregations, functions, keywords.
PROMQL_WORDS = {
    "sum", "min", "max", "avg", "count", "stddev", "stdvar", "topk", "bottomk", "quantile", "count_values", "group",
    "by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool", "offset",
    "rate", "irate", "increase", "delta", "idelta", "deriv", "histogram_quantile", "time", "vector", "scalar",
    "abs", "clamp_min", "clamp_max", "max_over_time", "min_over_time", "avg_over_time", "sum_over_time",
    "last_over_time", "changes", "resets", "timestamp", "absent", "label_replace", "round", "inf", "nan",
}


def all_panels(dashboard: dict) -> list[dict]:
    """Every panel, including those nested in collapsed rows."""
    out = []
    for p in dashboard.get("panels", []):
        out.append(p)
        out.extend(p.get("panels", []))
    return out


def query_panels(dashboard: dict) -> list[dict]:
    return [p for p in all_panels(dashboard) if p.get("type") != "row"]


def prometheus_annotations(dashboard: dict) -> list[dict]:
    return [a for a in dashboard.get("annotations", {}).get("list", []) if a.get("datasource", {}).get("type")
            == "prometheus"]


def expressions(dashboard: dict) -> list[str]:
    """The PromQL of every panel target and every Prometheus annotation (tests/test_metrics.py runs them all)."""
    return [t["expr"] for p in query_panels(dashboard) for t in p.get("targets", [])] + \
        [a["expr"] for a in prometheus_annotations(dashboard)]


def metric_names(expr: str) -> set[str]:
    """Metric names referenced by a PromQL expression (label matchers, ranges, strings and grouping removed)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)                 # string literals
    text = re.sub(r"\{[^}]*\}", "", text)                            # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)                           # range selectors
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    text = re.sub(r"\b\d+(\.\d+)?(e[+-]?\d+)?\b", " ", text)         # numbers
    names = set()
    for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", text):
        word = m.group(0)
        if word.lower() not in PROMQL_WORDS:
            names.add(word)
    return names


@pytest.fixture(scope="module")
def dashboards() -> dict[str, dict]:
    assert len(DASHBOARD_FILES) >= 4, f"expected the four dashboards in {ROOT / 'grafana'}, found {DASHBOARD_FILES}"
    return {p.name: json.loads(p.read_text()) for p in DASHBOARD_FILES}


def test_the_four_dashboards_exist_with_unique_uids_and_titles(dashboards):
    uids = [d["uid"] for d in dashboards.values()]
    titles = [d["title"] for d in dashboards.values()]
    assert len(set(uids)) == len(uids) and len(set(titles)) == len(titles), (uids, titles)
    for uid in uids:
        assert re.fullmatch(r"[A-Za-z0-9_-]{1,40}", uid), uid
    assert {"overview.json", "feeds.json", "pipeline.json", "queries.json"} <= set(dashboards)
    for name, d in dashboards.items():
        assert 36 <= d["schemaVersion"] <= 41, (name, d["schemaVersion"])
        assert "id" not in d or d["id"] is None, f"{name}: a provisioned dashboard must not carry a database id"


def test_panels_have_unique_ids_valid_layout_and_targets(dashboards):
    for name, d in dashboards.items():
        panels = all_panels(d)
        ids = [p["id"] for p in panels]
        assert all(isinstance(i, int) and i > 0 for i in ids), (name, ids)
        assert len(set(ids)) == len(ids), f"{name}: duplicate panel ids {ids}"
        titles = [p["title"] for p in query_panels(d)]
        boxes = []
        for p in panels:
            g = p["gridPos"]
            assert g["w"] >= 1 and g["h"] >= 1 and g["x"] >= 0 and g["y"] >= 0 and g["x"] + g["w"] <= 24, (name, p)
            boxes.append((p["title"], g["x"], g["y"], g["x"] + g["w"], g["y"] + g["h"]))
        for i, a in enumerate(boxes):                       # Grafana would push overlapping panels around
            for b in boxes[i + 1:]:
                assert a[3] <= b[1] or b[3] <= a[1] or a[4] <= b[2] or b[4] <= a[2], f"{name}: {a} overlaps {b}"
        assert titles, name
        for p in query_panels(d):
            assert p["type"] in {"timeseries", "stat", "gauge", "table", "bargauge", "state-timeline"}, p["type"]
            targets = p.get("targets") or []
            assert targets, f"{name}: panel {p['title']!r} has no targets"
            ref_ids = [t["refId"] for t in targets]
            assert len(set(ref_ids)) == len(ref_ids), (name, p["title"], ref_ids)
            for t in targets:
                assert isinstance(t.get("expr"), str) and t["expr"].strip(), (name, p["title"], t)


def test_every_panel_uses_the_datasource_variable(dashboards):
    for name, d in dashboards.items():
        variables = d["templating"]["list"]
        var_names = [v["name"] for v in variables]
        assert len(set(var_names)) == len(var_names), (name, var_names)
        ds = [v for v in variables if v["name"] == "datasource"]
        assert len(ds) == 1 and ds[0]["type"] == "datasource" and ds[0]["query"] == "prometheus", (name, ds)
        for p in query_panels(d):
            assert p["datasource"] == DATASOURCE, (name, p["title"], p["datasource"])
            for t in p["targets"]:
                assert t.get("datasource", DATASOURCE) == DATASOURCE, (name, p["title"], t)
        for v in variables:
            if v["type"] == "query":
                assert v["datasource"] == DATASOURCE, (name, v)


def test_feed_panels_follow_the_feed_variable(dashboards):
    feed_metrics = {n for s in METRICS.values() if "feed" in s.labels for n in s.series_names()}
    used_feed_anywhere = False
    for name, d in dashboards.items():
        feed_vars = [v for v in d["templating"]["list"] if v["name"] == "feed"]
        for p in query_panels(d):
            for t in p["targets"]:
                if metric_names(t["expr"]) & feed_metrics:
                    used_feed_anywhere = True
                    assert feed_vars, f"{name}: {p['title']!r} shows per-feed metrics but there is no feed variable"
                    # every selector of a per-feed metric follows the variable
                    for m in re.finditer(r"(tubescope_[a-z_]+)(\{[^}]*\})?", t["expr"]):
                        if m.group(1) in feed_metrics:
                            assert m.group(2) and 'feed=~"$feed"' in m.group(2), (name, p["title"], t["expr"])
        for v in feed_vars:
            assert v["type"] == "query" and v["definition"] == FEED_VARIABLE_QUERY, (name, v)
            assert v["query"]["query"] == FEED_VARIABLE_QUERY and v["includeAll"] and v["allValue"] == ".*"
    assert used_feed_anywhere


def test_metric_name_parser_finds_foreign_metrics():
    # the check below must be able to fail: a Ray metric, a typo, and names hidden in label matchers
    assert metric_names('sum(rate(ray_node_cpu_utilization{instance="a"}[5m]))') == {"ray_node_cpu_utilization"}
    assert metric_names('tubescope_feed_upp{feed=~"$feed"} or vector(0)') == {"tubescope_feed_upp"}
    assert metric_names('histogram_quantile(0.95, sum by (le, feed) (rate(tubescope_x_bucket[$__rate_interval])))') \
        == {"tubescope_x_bucket"}


def test_dashboards_reference_only_exported_metrics_and_show_all_of_them(dashboards):
    exported = exported_series_names()
    used = set()
    for name, d in dashboards.items():
        for expr in expressions(d):
            names = metric_names(expr)
            assert names, f"{name}: no metric in {expr!r}"
            unknown = names - exported
            assert not unknown, f"{name}: {expr!r} references metrics tubescope does not export: {sorted(unknown)}"
            used |= names
    # every metric pipeline/metric_catalog.py defines is on some dashboard (a metric nobody can see is dead weight)
    unseen = [s.name for s in METRICS.values() if not set(s.series_names()) & used]
    assert not unseen, f"metrics shown on no dashboard: {unseen}"


def test_provisioning_files():
    ds = yaml.safe_load((ROOT / "provisioning" / "datasources" / "tubescope.yaml").read_text())
    assert ds["apiVersion"] == 1
    (prom,) = [d for d in ds["datasources"] if d["type"] == "prometheus"]
    assert prom["url"].startswith("http") and prom["access"] == "proxy"
    prov = yaml.safe_load((ROOT / "provisioning" / "dashboards" / "tubescope.yaml").read_text())
    assert prov["apiVersion"] == 1
    (provider,) = prov["providers"]
    assert provider["type"] == "file" and provider["options"]["path"].startswith("/")


def test_prometheus_config_renames_ray_prefixed_tubescope_metrics():
    config = yaml.safe_load((ROOT / "prometheus.yml").read_text())
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "ray"]
    assert job["static_configs"][0]["targets"] and job["file_sd_configs"][0]["files"]
    (rule,) = job["metric_relabel_configs"]
    assert rule["source_labels"] == ["__name__"] and rule["target_label"] == "__name__"
    # Prometheus anchors relabel regexes; $1 is the first group
    pattern = re.compile(f"^(?:{rule['regex']})$")
    for series in sorted(exported_series_names()):
        m = pattern.match(RAY_PREFIX + series)
        assert m and rule["replacement"].replace("$1", m.group(1)) == series, series
    assert not pattern.match("ray_node_cpu_utilization")         # Ray's own metrics keep their names
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool not found: install Debian's prometheus package (.ci/run does)")
    out = subprocess.run([promtool, "check", "config", str(ROOT / "prometheus.yml")], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_readme_documents_every_metric():
    text = (ROOT / "README.md").read_text()
    missing = [name for name in METRICS if f"`{name}`" not in text]
    assert not missing, f"dashboards/README.md does not list: {missing}"


def test_alert_hits_are_annotations(dashboards):
    """Standing-alert hits mark the time axis of the overview, feeds and queries dashboards: a Prometheus
    annotation on the hits counter, through the datasource variable, titled by the alert id."""
    marked = []
    for name, d in dashboards.items():
        for a in prometheus_annotations(d):
            assert a["datasource"] == DATASOURCE and a["enable"] and a["name"], (name, a)
            assert isinstance(a["expr"], str) and metric_names(a["expr"]) <= exported_series_names(), (name, a)
            if "tubescope_alert_hits_total" in metric_names(a["expr"]):
                assert "{{alert}}" in a["titleFormat"] and a["tagKeys"] == "alert", (name, a)
                marked.append(name)
    assert {"overview.json", "feeds.json", "queries.json"} <= set(marked), marked
