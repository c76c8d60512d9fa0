"""A real Prometheus for tests: started on 127.0.0.1 with the shipped scrape rules (dashboards/prometheus.yml) aimed
at a test cluster's metrics port, and instant queries against it."""
from __future__ import annotations

import json
import subprocess
import urllib.parse
import urllib.request
from pathlib import Path

import yaml

from streams import free_tcp_port, wait_for

ROOT = Path(__file__).resolve().parents[1]
PROMETHEUS = "/usr/bin/prometheus"


def query(base: str, expr: str) -> list[dict]:
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=10) as resp:
        body = json.load(resp)
    if body.get("status") != "success":
        raise AssertionError(f"Prometheus rejected {expr!r}: {body}")
    return body["data"]["result"]


def query_values(base: str, expr: str, label: str | None = None) -> dict:
    """{label value (or None): float} of an instant query."""
    return {(r["metric"].get(label) if label else None): float(r["value"][1]) for r in query(base, expr)}


def query_scalar(base: str, expr: str) -> float:
    """The single value of an aggregating query; AssertionError (a caller's poll retries) while it has no data."""
    values = query_values(base, expr)
    assert list(values) == [None], f"{expr!r} returned {values}"
    return values[None]


def start_prometheus(tmp_path: Path, metrics_port: int) -> tuple[subprocess.Popen, str]:
    config = yaml.safe_load((ROOT / "dashboards" / "prometheus.yml").read_text())
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    for job in config["scrape_configs"]:                 # the shipped rules, with the test cluster's port
        job.pop("file_sd_configs", None)
        job["static_configs"] = [{"targets": [f"127.0.0.1:{metrics_port}"]}]
    cfg = tmp_path / "prometheus.yml"
    cfg.write_text(yaml.safe_dump(config))
    port = free_tcp_port()
    log = open(tmp_path / "prometheus.log", "w")
    proc = subprocess.Popen([PROMETHEUS, f"--config.file={cfg}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                             f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
                            stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"

    def ready():
        try:
            return urllib.request.urlopen(f"{base}/-/ready", timeout=1).status == 200
        except OSError:
            assert proc.poll() is None, (tmp_path / "prometheus.log").read_text()
            return False
    wait_for(ready, 30, 0.1, "Prometheus to be ready")
    return proc, base
