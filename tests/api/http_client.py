"""What the route tests share: the API keys of the served app, the source its job indexes, an HTTP client
and the small assertions over responses."""
from __future__ import annotations

import re
import time

import httpx

ADMIN = "admin-key-0123456789"
READER = "reader-key-0123456789"
CAM_READER = "camreader-key-0123456789"        # a reader limited to source "cam1"
CAM_ADMIN = "camadmin-key-0123456789"          # an admin limited to source "cam1"
SOURCE = "clip"


def http(served, key: str | None = ADMIN) -> httpx.Client:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.Client(base_url=served["url"], headers=headers, timeout=120)


def raw_post(c: httpx.Client, path: str, body: str) -> httpx.Response:
    """A JSON body written by hand: NaN, Infinity and 1e400 are what httpx itself refuses to send."""
    return c.post(path, content=body.encode(), headers={"content-type": "application/json"})


def err(r: httpx.Response, status: int, words: str) -> None:
    assert r.status_code == status, (r.status_code, r.text)
    assert words in r.json()["error"], r.json()


def wait_for_metric(c: httpx.Client, pattern: str, timeout_s: float = 20.0) -> str:
    deadline = time.time() + timeout_s
    while True:
        text = c.get("/metrics").text
        if re.search(pattern, text):
            return text
        assert time.time() < deadline, f"no series matching {pattern!r} in /metrics:\n{text[-3000:]}"
        time.sleep(0.5)


def wait_job(c: httpx.Client, job_id: str, timeout_s: float = 120) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job = c.get(f"/v1/jobs/{job_id}").json()
        if job["state"] not in ("queued", "running"):
            return job
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} still {job['state']} after {timeout_s} s: {job}")


def feed_status(c: httpx.Client, feed_id: str) -> dict:
    r = c.get(f"/v1/feeds/{feed_id}")
    assert r.status_code == 200, r.text
    return r.json()["status"]
