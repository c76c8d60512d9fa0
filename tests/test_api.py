"""The REST API over real HTTP: real Ray Serve (one app for the module), real Redis, a real clip indexed by a job.

Order matters and is the file order: the job indexes footage that search/ask then use; the restart test is last.
"""
from __future__ import annotations

import io
import json
import re
import threading
import time
from pathlib import Path

import av
import httpx
import pytest
import ray

from actors.feeds import NAMESPACE, reader_name
from deploy.app import run_app, stop_app
from deploy.client import ApiError, TubescopeClient, parse_sse
from pipeline.events import ANSWERS_STREAM, SUMMARIES_STREAM
from pipeline.redis_server import free_port
from pipeline.settings import load_settings
from services import read_only, start_redis
from streams import free_tcp_port, wait_for
from videos import encode_video

ADMIN = "admin-key-0123456789"
READER = "reader-key-0123456789"
CAM_READER = "camreader-key-0123456789"        # a reader limited to source "cam1"
CAM_ADMIN = "camadmin-key-0123456789"          # an admin limited to source "cam1"
SOURCE = "clip"
pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
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
        api_max_question_chars=200, api_max_window_seconds=3600, api_max_new_tokens=64, api_max_request_bytes=4096,
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


# ---- health, metrics, docs ------------------------------------------------------------------------------------------
def test_health_and_docs_need_no_key_metrics_need_an_unlimited_admin(served):
    with http(served, None) as c:
        assert c.get("/healthz").json() == {"status": "ok", "redis": True, "index": True, "index_writable": True}
        assert c.get("/docs").status_code == 200
        spec = c.get("/openapi.json").json()
        assert {"/v1/ask", "/v1/search", "/v1/feeds", "/v1/jobs", "/v1/sources"} <= set(spec["paths"])
        assert spec["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"     # /docs can send a key
        assert "security" in spec["paths"]["/v1/ask"]["post"] and "security" not in spec["paths"]["/healthz"]["get"]
        err(c.get("/metrics"), 401, "missing API key")       # the series name every source, with counts and bytes
        err(c.get("/v1/nowhere"), 404, "Not Found")
    for key in (READER, CAM_ADMIN):                          # a reader, or an admin of some sources only
        with http(served, key) as c:
            assert c.get("/metrics").status_code == 403
    with http(served) as c:
        # requests are counted in Ray's metrics (from every replica) and /metrics shows this node's series
        wait_for_metric(c, r'tubescope_requests_total\{[^}]*endpoint="GET /healthz"[^}]*status="200"')


# ---- auth matrix ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method,path,body", [
    ("GET", "/v1/feeds", None), ("POST", "/v1/feeds", {"url": "rtsp://h/x"}), ("GET", "/v1/sources", None),
    ("POST", "/v1/jobs", {"paths": ["/x.mp4"]}), ("GET", "/v1/jobs/abc", None),
    ("POST", "/v1/search", {"query": "q"}), ("POST", "/v1/ask", {"question": "q", "source": "clip"})])
def test_missing_or_unknown_key_is_401(served, method, path, body):
    for key, words in [(None, "missing API key"), ("not-a-real-key-0000", "unknown API key")]:
        with http(served, key) as c:
            r = c.request(method, path, json=body)
            err(r, 401, words)
            assert r.headers["www-authenticate"] == "Bearer"
    with http(served, None) as c:                            # a non-bearer scheme is no key either
        err(c.request(method, path, json=body, headers={"Authorization": f"Basic {ADMIN}"}), 401, "missing")
        if body is not None:                                  # the key is checked before the body
            err(c.request(method, path, json={"bogus": 1}), 401, "missing API key")
    with http(served, READER) as c:
        if method == "POST" and path in ("/v1/feeds", "/v1/jobs"):
            err(c.request(method, path, json={"bogus": 1}), 403, "needs an admin key")


def test_reader_on_admin_routes_is_403(served):
    with http(served, READER) as c:
        err(c.post("/v1/feeds", json={"url": "rtsp://h/x"}), 403, "needs an admin key")
        err(c.delete("/v1/feeds/any"), 403, "needs an admin key")
        err(c.post("/v1/jobs", json={"paths": [str(served["clip"])]}), 403, "needs an admin key")
        err(c.get("/v1/jobs/any"), 403, "needs an admin key")
        err(c.delete("/v1/jobs/any"), 403, "needs an admin key")
        err(c.get("/v1/status"), 403, "needs an admin key")


def test_source_limited_keys_cannot_touch_other_sources(served):
    with http(served, CAM_READER) as c:
        err(c.post("/v1/ask", json={"question": "what?", "source": SOURCE}), 403, "may not access source 'clip'")
        err(c.post("/v1/search", json={"query": "car", "sources": ["cam1", SOURCE]}), 403, "'clip'")
        err(c.get(f"/v1/sources/{SOURCE}/segments"), 403, "'clip'")
        err(c.get("/v1/feeds/other"), 403, "'other'")
    with http(served, CAM_ADMIN) as c:
        err(c.post("/v1/feeds", json={"url": "rtsp://h/x"}), 403, "give the feed an id among them")
        err(c.post("/v1/feeds", json={"url": "rtsp://h/x", "id": "cam2"}), 403, "'cam2'")
        err(c.post("/v1/jobs", json={"paths": [str(served["clip"])], "source_id": SOURCE}), 403, "'clip'")
        err(c.delete("/v1/feeds/cam2"), 403, "'cam2'")


def test_ray_stores_no_plain_api_key(served):
    """Serve keeps the app's deployments and their arguments (the settings) in the GCS key-value store, which
    anyone holding the cluster's token can read: the keys must be there as salted hashes only."""
    from ray.experimental.internal_kv import _internal_kv_get, _internal_kv_list

    stored = []
    for namespace in (None, b"serve", b"fun", b"session", b"cluster", b"job", b"dashboard"):
        stored += [k + b"=" + (_internal_kv_get(k, namespace=namespace) or b"")
                   for k in _internal_kv_list(b"", namespace=namespace)]
    blob = b"\n".join(stored)
    assert served["settings"].redis_url.encode() in blob           # the settings are there...
    for key in (ADMIN, READER, CAM_READER, CAM_ADMIN):
        assert key.encode() not in blob                             # ...but no key
    with http(served, CAM_ADMIN) as c:                              # and every key still works
        assert c.get("/v1/sources").status_code == 200


# ---- jobs -------------------------------------------------------------------------------------------------------------
def wait_job(c: httpx.Client, job_id: str, timeout_s: float = 120) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job = c.get(f"/v1/jobs/{job_id}").json()
        if job["state"] not in ("queued", "running"):
            return job
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} still {job['state']} after {timeout_s} s: {job}")


def test_job_indexes_a_clip_and_its_segments_are_listed(served):
    with http(served) as c:
        r = c.post("/v1/jobs", json={"paths": [str(served["clip"])], "source_id": SOURCE})
        assert r.status_code == 202, r.text
        job = r.json()
        assert job["state"] == "queued" and job["paths"] == [str(served["clip"])] and len(job["id"]) == 12
        done = wait_job(c, job["id"])
        assert done["state"] == "succeeded", done
        assert (done["segments"], done["files_total"], done["failures"]) == (2, 1, [])
        assert done["indexed"] == [str(served["clip"])] and done["source_seconds"] == pytest.approx(4.0, abs=0.1)
        err(c.delete(f"/v1/jobs/{job['id']}"), 409, "already finished")

        sources = c.get("/v1/sources").json()["sources"]
        assert [(s["source_id"], s["segments"]) for s in sources] == [(SOURCE, 2)]
        segs = c.get(f"/v1/sources/{SOURCE}/segments").json()["segments"]
        assert [(s["segment_id"], s["t0"], s["t1"]) for s in segs] == [("clip:0", 0.0, 2.0), ("clip:2000", 2.0, 4.0)]
        assert all(s["n_tokens"] > 0 and len(s["grid_thw"]) == 3 for s in segs)
        assert [s["thumbnail_url"] for s in segs] == ["/v1/segments/clip%3A0/thumbnail",
                                                      "/v1/segments/clip%3A2000/thumbnail"]
        one = c.get(f"/v1/sources/{SOURCE}/segments", params={"start": 2.5, "end": 3.0}).json()["segments"]
        assert [s["segment_id"] for s in one] == ["clip:2000"]
        err(c.get(f"/v1/sources/{SOURCE}/segments", params={"start": 3, "end": 1}), 422, "must be >= start")
        err(c.get("/v1/sources/nope/segments"), 404, "no indexed source 'nope'")
        err(c.get(f"/v1/sources/{SOURCE}/segments", params={"start": "soon"}), 422, "start")
    with http(served, CAM_READER) as c:                       # a limited key does not even see the source
        assert c.get("/v1/sources").json() == {"sources": []}
    with http(served, CAM_ADMIN) as c:                        # ...nor another source's job, its counts or feeds
        err(c.get(f"/v1/jobs/{job['id']}"), 404, "no job with id")
        err(c.delete(f"/v1/jobs/{job['id']}"), 404, "no job with id")
        assert c.get("/v1/status").json() == {"index": {"sources": 0, "segments": 0, "bytes": 0}, "feeds": {}}
    with http(served) as c:
        assert c.get("/v1/status").json()["index"]["segments"] >= 2


def test_segment_thumbnails_and_metadata_follow_the_source_scope(served):
    from PIL import Image

    with http(served, READER) as c:
        r = c.get("/v1/segments/clip%3A2000/thumbnail")
        assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg", r.text
        assert "max-age=31536000" in r.headers["cache-control"] and "private" in r.headers["cache-control"]
        image = Image.open(io.BytesIO(r.content))
        assert image.format == "JPEG" and 0 < image.width <= 320
        again = c.get("/v1/segments/clip%3A2000/thumbnail", headers={"If-None-Match": r.headers["etag"]})
        assert again.status_code == 304 and not again.content
        meta = c.get("/v1/segments/clip:2000").json()
        assert (meta["segment_id"], meta["t0"], meta["t1"], meta["start"]) == ("clip:2000", 2.0, 4.0, "0:02")
        assert meta["thumbnail_url"] == "/v1/segments/clip%3A2000/thumbnail" and meta["n_tokens"] > 0
        missing = c.get("/v1/segments/clip%3A4000/thumbnail")
        err(missing, 404, "no thumbnail for segment 'clip:4000'")
        err(c.get("/v1/segments/clip:4000"), 404, "no indexed segment 'clip:4000'")
        err(c.get("/v1/segments/clip/thumbnail"), 422, "segment_id must look like")
        err(c.get(f"/v1/segments/{'x' * 300}:0/thumbnail"), 422, "too long")
    with http(served, CAM_READER) as c:        # another source's segment is a 404 like an unknown one: no probing
        other = c.get("/v1/segments/clip%3A2000/thumbnail")
        err(other, 404, "no thumbnail for segment 'clip:2000'")
        assert other.json()["error"].replace("2000", "4000") == missing.json()["error"]
        err(c.get("/v1/segments/clip:2000"), 404, "no indexed segment 'clip:2000'")
    with http(served, None) as c:
        err(c.get("/v1/segments/clip%3A2000/thumbnail"), 401, "missing API key")


def test_clip_of_the_indexed_archive_with_range_requests(served, tmp_path):
    from click.testing import CliRunner

    from deploy.cli import cli
    with http(served, READER) as c:
        r = c.get(f"/v1/sources/{SOURCE}/clip", params={"start": "1", "end": "+0:02.5"})
        assert r.status_code == 200, r.text
        assert r.headers["content-type"] == "video/mp4" and r.headers["accept-ranges"] == "bytes"
        assert float(r.headers["x-clip-start"]) <= 1.0 and float(r.headers["x-clip-end"]) >= 2.5
        full, size = r.content, len(r.content)
        (tmp_path / "whole.mp4").write_bytes(full)
        with av.open(str(tmp_path / "whole.mp4")) as mp4:                 # a playable MP4 of the archive's frames
            assert sum(1 for _ in mp4.decode(video=0)) >= 45
        for ask, first, last in (("bytes=0-99", 0, 99), ("bytes=100-", 100, size - 1), ("bytes=-50", size - 50,
                                                                                          size - 1)):
            part = c.get(f"/v1/sources/{SOURCE}/clip", params={"start": 1, "end": 2.5}, headers={"Range": ask})
            assert part.status_code == 206 and part.headers["content-range"] == f"bytes {first}-{last}/{size}"
            assert part.content == full[first:last + 1]
        bad = c.get(f"/v1/sources/{SOURCE}/clip", params={"start": 1, "end": 2.5}, headers={"Range": f"bytes={size}-"})
        assert bad.status_code == 416 and bad.headers["content-range"] == f"bytes */{size}"
        err(c.get(f"/v1/sources/{SOURCE}/clip", params={"start": 100, "end": 110}), 404, "no footage")
        err(c.get("/v1/sources/nope/clip", params={"start": 1, "end": 2}), 404, "no footage of 'nope'")
        err(c.get(f"/v1/sources/{SOURCE}/clip", params={"start": 0, "end": 700}), 422, "clip_max_seconds")
        err(c.get(f"/v1/sources/{SOURCE}/clip", params={"start": 2, "end": 1}), 422, "must be after")
        err(c.get(f"/v1/sources/{SOURCE}/clip", params={"start": "soon", "end": 1}), 422, "start")
        assert c.get(f"/v1/sources/{SOURCE}/clip", params={"start": 1}).status_code == 422
    with http(served, CAM_READER) as c:
        err(c.get(f"/v1/sources/{SOURCE}/clip", params={"start": 1, "end": 2}), 403, "'clip'")
    out = tmp_path / "cli.mp4"
    result = CliRunner().invoke(cli, ["clip", SOURCE, "--start", "1", "--end", "2.5", "-o", str(out),
                                      "--url", served["url"], "--key", READER])
    assert result.exit_code == 0, result.output
    assert out.read_bytes() == full and "covering" in result.output
    result = CliRunner().invoke(cli, ["clip", SOURCE, "--start", "100", "--end", "110", "-o", str(out),
                                      "--url", served["url"], "--key", READER])
    assert result.exit_code == 1 and "no footage" in result.output


def test_job_errors(served, tmp_path):
    outside = tmp_path / "outside.mp4"
    outside.write_bytes(b"not a video")
    with http(served) as c:
        err(c.post("/v1/jobs", json={"paths": [str(outside)]}), 422, "outside the allowed roots")
        err(c.post("/v1/jobs", json={"paths": ["videos/clip.mp4"]}), 422, "must be absolute")
        err(c.post("/v1/jobs", json={"paths": [str(served["clip"].parent / ".." / "x.mp4")]}), 422, "'..'")
        err(c.post("/v1/jobs", json={"paths": ["s3://bucket/x.mp4"]}), 422, "URI scheme 's3'")
        err(c.post("/v1/jobs", json={"paths": []}), 422, "non-empty list")
        err(c.post("/v1/jobs", json={"paths": "x"}), 422, "paths")
        err(c.post("/v1/jobs", json={"paths": [str(served["clip"])], "extra": 1}), 422, "extra")
        err(c.get("/v1/jobs/nosuchjob"), 404, "no job with id 'nosuchjob'")
        err(c.delete("/v1/jobs/nosuchjob"), 404, "no job")
        # a file under the roots that is not a video: the job runs and reports the failure
        bad = served["clip"].parent / "broken.mp4"
        bad.write_bytes(b"\x00" * 1000)
        job = c.post("/v1/jobs", json={"paths": [str(bad)]}).json()
        done = wait_job(c, job["id"])
        assert done["state"] == "failed" and done["failures"][0]["path"] == str(bad), done


def test_cancel_a_running_job_over_http(served):
    """The cancel flag is polled after every encoded batch: a job cancelled while Ray Data starts up stops at its
    first poll, keeping what it wrote."""
    with http(served) as c:
        job = c.post("/v1/jobs", json={"paths": [str(served["clip"])], "source_id": "cancel-me"}).json()
        wait_for(lambda: c.get(f"/v1/jobs/{job['id']}").json()["state"] != "queued", 30, 0.05, "the job to start")
        r = c.delete(f"/v1/jobs/{job['id']}")
        assert r.status_code == 202 and r.json()["cancel_requested"] is True, r.text
        done = wait_job(c, job["id"])
        assert done["state"] == "cancelled" and done["error"].startswith("cancelled after"), done
        kept = c.get("/v1/sources").json()["sources"]
        assert all(s["segments"] == done["segments"] for s in kept if s["source_id"] == "cancel-me")


def test_cancel_a_queued_job(served):
    """A cancel that arrives before the job's task starts stops it at once (state cancelled, nothing indexed)."""
    from deploy.job_runner import execute_job
    from deploy.jobs import create_job, request_cancel

    r = served["redis"].client()
    job = create_job(r, [str(served["clip"])], "cancelled-src")
    assert request_cancel(r, job["id"])["cancel_requested"] is True
    assert execute_job(job["id"], [str(served["clip"])], "cancelled-src", served["settings"], served["redis"].url) \
        == "cancelled"
    with http(served) as c:
        assert c.get(f"/v1/jobs/{job['id']}").json()["state"] == "cancelled"
        assert "cancelled-src" not in [s["source_id"] for s in c.get("/v1/sources").json()["sources"]]


# ---- search and ask ---------------------------------------------------------------------------------------------------
def test_indexed_segments_get_captions_that_listings_and_search_show(served):
    """The caption service follows the index: the job's segments get the exclaiming model's caption ("!" per
    token), written to the index, the retrieval index and tubescope:captions, and search considers them all."""
    with http(served) as c:
        deadline = time.time() + 90
        while True:
            status = c.get("/v1/status").json()["captions"]
            if status.get("state") == "running" and status["captioned"] >= 2 and status["backlog"]["segments"] == 0:
                break
            assert time.time() < deadline, json.dumps(status)
            time.sleep(0.5)
        segs = c.get(f"/v1/sources/{SOURCE}/segments").json()["segments"]
        assert [s["caption"] for s in segs] == ["!" * 8] * 2
        r = c.post("/v1/search", json={"query": "a white box", "sources": [SOURCE]}).json()
        assert r["coverage"] == {"segments": 2, "captioned": 2, "retrieval": True, "reranked": 2}
        assert sorted(x["segment_id"] for x in r["results"]) == ["clip:0", "clip:2000"]
        assert all(x["caption"] == "!" * 8 for x in r["results"])
        wait_for_metric(c, r"tubescope_captions_total\S* [1-9]")
    entries = served["redis"].client().xrange("tubescope:captions")
    assert {e[b"segment_id"].decode() for _, e in entries} >= {"clip:0", "clip:2000"}


def test_search_ranks_segments(served):
    with http(served, READER) as c:
        r = c.post("/v1/search", json={"query": "a white box", "sources": [SOURCE], "limit": 5})
        assert r.status_code == 200, r.text
        results = r.json()["results"]
        assert sorted(x["segment_id"] for x in results) == ["clip:0", "clip:2000"]
        assert all(set(x) >= {"source", "segment_id", "t0", "t1", "score"} and x["source"] == SOURCE for x in results)
        assert all(x["thumbnail_url"] == f"/v1/segments/{SOURCE}%3A{x['segment_id'][5:]}/thumbnail" for x in results)
        scores = [x["score"] for x in results]
        assert scores == sorted(scores, reverse=True)
        # no sources: every source the key may see
        everything = c.post("/v1/search", json={"query": "a white box", "limit": 10}).json()["results"]
        indexed = {s["source_id"] for s in c.get("/v1/sources").json()["sources"]}
        assert {x["source"] for x in everything} == indexed and SOURCE in indexed
        assert len(c.post("/v1/search", json={"query": "a white box", "limit": 1}).json()["results"]) == 1
        err(c.post("/v1/search", json={"query": "x" * 501}), 422, "query has 501 characters; the limit is 500")
        err(c.post("/v1/search", json={"query": "q", "limit": 101}), 422, "api_max_search_results")
        err(c.post("/v1/search", json={"query": "q", "limit": 0}), 422, "limit")
        err(c.post("/v1/search", json={"query": "q", "limit": True}), 422, "limit")
        err(raw_post(c, "/v1/search", '{"query": "q", "start": NaN}'), 422, "start")
        err(raw_post(c, "/v1/search", '{"query": "q", "end": 1e400}'), 422, "end")
        err(c.post("/v1/search", json={"query": ""}), 422, "query")
        err(c.post("/v1/search", json={"query": "q", "sources": []}), 422, "non-empty list")
        err(c.post("/v1/search", json={"query": "q", "sources": ["nope"]}), 404, "nope")
        # times as people write them: "+m:ss" into an archive; hits show their times back the same way
        late = c.post("/v1/search", json={"query": "a white box", "sources": [SOURCE], "start": "+0:02"}).json()
        assert [(x["segment_id"], x["start"], x["end"]) for x in late["results"]] == [("clip:2000", "0:02", "0:04")]
        err(c.post("/v1/search", json={"query": "q", "start": "soon"}), 422, "start must be a time")
        err(c.post("/v1/search", json={"query": "q", "end": True}), 422, "end")
        segs = c.get(f"/v1/sources/{SOURCE}/segments", params={"end": "+0:01"}).json()["segments"]
        assert [(x["segment_id"], x["start"]) for x in segs] == [("clip:0", "0:00")]
        err(c.get(f"/v1/sources/{SOURCE}/segments", params={"start": "-2x"}), 422, "start must be a time")
    with http(served, CAM_READER) as c:                       # sees no source: an empty result, not an error
        assert c.post("/v1/search", json={"query": "q"}).json()["results"] == []


def test_ask_answers_with_evidence_and_writes_redis(served):
    with http(served, READER) as c:
        r = c.post("/v1/ask", json={"question": "What moves?", "source": SOURCE, "start": 0, "end": 4,
                                    "max_new_tokens": 8})
        assert r.status_code == 200, r.text
        ans = r.json()
        assert set(ans) >= {"id", "answer", "boxes", "evidence", "model", "timings", "stream_entry"}
        assert ans["answer"] == "!" * 8 and ans["boxes"] == []     # the exclaiming model's only answer
        assert [(e["source"], e["segment_id"], e["t0"], e["t1"]) for e in ans["evidence"]] == \
            [(SOURCE, "clip:0", 0.0, 2.0), (SOURCE, "clip:2000", 2.0, 4.0)]
        assert ans["generation"]["temperature"] == 0.0                # the checkpoint's: greedy
        sampled = c.post("/v1/ask", json={"question": "What moves?", "source": SOURCE, "max_new_tokens": 8,
                                          "temperature": 1.5, "top_k": 5, "seed": 3}).json()
        assert sampled["generation"] == {"temperature": 1.5, "top_p": 1.0, "top_k": 5, "repetition_penalty": 1.0,
                                         "seed": 3}
        err(c.post("/v1/ask", json={"question": "q", "source": SOURCE, "temperature": 9}), 422, "temperature")
        err(c.post("/v1/ask", json={"question": "q", "source": SOURCE, "top_p": 0}), 422, "top_p")
        assert [e["thumbnail_url"] for e in ans["evidence"]] == ["/v1/segments/clip%3A0/thumbnail",
                                                                 "/v1/segments/clip%3A2000/thumbnail"]
    entries = served["redis"].client(decode_responses=True).xrange(ANSWERS_STREAM, ans["stream_entry"],
                                                                   ans["stream_entry"])
    assert len(entries) == 1 and ans["id"] in json.dumps(entries[0][1]) and json.loads(entries[0][1]["boxes"]) == []


def test_ask_streams_tokens_as_server_sent_events(served):
    with http(served, READER) as c:
        with c.stream("POST", "/v1/ask", json={"question": "What moves?", "sources": [SOURCE], "max_new_tokens": 8,
                                               "stream": True}) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            events = list(parse_sse(r.iter_lines()))
    kinds = [e for e, _ in events]
    result = events[-1][1]
    assert kinds[-1] == "result" and set(kinds[:-1]) <= {"token"}, events
    assert result["answer"] == "!" * 8 and len(kinds) >= 2, events
    assert "".join(d["text"] for e, d in events[:-1]) == result["answer"]
    assert result["stream_entry"] and len(result["evidence"]) == 2 and result["boxes"] == []
    # the client gives the same through its on_token callback
    pieces: list[str] = []
    with TubescopeClient(served["url"], READER) as tc:
        out = tc.ask("What moves?", [SOURCE], max_new_tokens=4, on_token=pieces.append)
        assert "".join(pieces) == out["answer"] == "!!!!" and out["boxes"] == []
        with pytest.raises(ApiError) as info:                   # an error before the stream starts is plain HTTP
            tc.ask("What moves?", ["nope"], on_token=pieces.append)
        assert info.value.status == 404


# ---- the OpenAI-compatible API, through the official client --------------------------------------------------------
def openai_client(served, key: str = READER):
    import openai

    return openai.OpenAI(base_url=served["url"] + "/v1", api_key=key, max_retries=0, timeout=120)


def chat(text: str = "What moves?", url: str = f"tubescope://{SOURCE}?start=0&end=4", **extra) -> dict:
    """A user turn of a video_url part and a question, and the request's other arguments."""
    return {"model": "tubescope", "messages": [{"role": "user", "content": [
        {"type": "video_url", "video_url": {"url": url}}, {"type": "text", "text": text}]}], **extra}


def test_openai_client_gets_the_answer_of_ask_plain_and_streamed(served):
    with http(served, READER) as c:
        asked = c.post("/v1/ask", json={"question": "What moves?", "source": SOURCE, "start": 0, "end": 4,
                                        "max_new_tokens": 8}).json()
    client = openai_client(served)
    assert [m.id for m in client.models.list()] == ["model"]              # the checkpoint folder's name
    # the defaults some clients send are accepted
    out = client.chat.completions.create(**chat(model="model", max_tokens=8, stop=None, presence_penalty=0,
                                                frequency_penalty=0, logprobs=False, n=1))
    assert (out.object, out.model, out.choices[0].finish_reason) == ("chat.completion", "model", "length")
    assert out.choices[0].message.role == "assistant" and out.choices[0].message.content == asked["answer"]
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (asked["timings"]["prompt_tokens"], 8)
    extra = out.model_extra["tubescope"]
    assert extra["evidence"] == asked["evidence"] and extra["boxes"] == [] and extra["plan"] == asked["plan"]

    chunks = list(client.chat.completions.create(**chat(max_completion_tokens=8, stream=True,
                                                        stream_options={"include_usage": True})))
    assert chunks[0].object == "chat.completion.chunk" and chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == asked["answer"]
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8
    assert chunks[-2].model_extra["tubescope"]["evidence"] == asked["evidence"]

    # sampling as OpenAI and vLLM name it; a system message goes before the question
    sampled = client.chat.completions.create(
        model="tubescope", max_tokens=4, temperature=1.5, seed=3, extra_body={"top_k": 5, "repetition_penalty": 1.1},
        messages=[{"role": "system", "content": "Be brief."}, *chat()["messages"]])
    assert sampled.model_extra["tubescope"]["generation"] == {"temperature": 1.5, "top_p": 1.0, "top_k": 5,
                                                             "repetition_penalty": 1.1, "seed": 3}
    entry = sampled.model_extra["tubescope"]["stream_entry"]
    (_, fields), = served["redis"].client(decode_responses=True).xrange(ANSWERS_STREAM, entry, entry)
    assert fields["question"] == "Be brief.\n\nWhat moves?"


def test_openai_errors_reach_the_clients_exceptions(served):
    import openai

    def refused(error: type, words: str, key: str = READER, **request) -> openai.APIStatusError:
        with pytest.raises(error) as info:
            openai_client(served, key).chat.completions.create(**(request or chat(max_tokens=2)))
        assert words in info.value.body["message"], info.value.body
        return info.value

    assert refused(openai.AuthenticationError, "unknown API key", "not-a-real-key-0000").type == \
        "authentication_error"
    refused(openai.PermissionDeniedError, "may not access source 'clip'", CAM_READER)
    assert refused(openai.NotFoundError, "'gpt-4o' does not exist", **chat(model="gpt-4o")).code == "model_not_found"
    refused(openai.NotFoundError, "nope", **chat(url="tubescope://nope", stream=True))   # before the stream
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    refused(openai.UnprocessableEntityError, "image_url parts are not supported yet",
            **chat(messages=[{"role": "user", "content": [image, {"type": "text", "text": "What?"}]}]))
    assert refused(openai.UnprocessableEntityError, "over the maximum 64", **chat(max_tokens=65)).param == \
        "max_tokens"
    refused(openai.UnprocessableEntityError, "same start and end", **chat(messages=[{"role": "user", "content": [
        {"type": "video_url", "video_url": {"url": f"tubescope://{SOURCE}?start=0"}},
        {"type": "video_url", "video_url": {"url": f"tubescope://{SOURCE}?start=2"}},
        {"type": "text", "text": "What?"}]}]))
    refused(openai.UnprocessableEntityError, "start must be a time", **chat(url=f"tubescope://{SOURCE}?start=soon"))
    assert refused(openai.APIStatusError, "request body over 4096 bytes", **chat(text="x" * 5000)).status_code == 413
    assert refused(openai.UnprocessableEntityError, "not supported", **chat(stop=["."])).param == "stop"
    refused(openai.UnprocessableEntityError, "no footage", **chat(messages=[{"role": "user", "content": "What?"}]))
    refused(openai.UnprocessableEntityError, "messages", **chat(messages=[{"role": "tool", "content": "x"}]))
    assert openai_client(served).models.retrieve("model").id == "model"
    with pytest.raises(openai.NotFoundError):
        openai_client(served).models.retrieve("gpt-4o")
    with pytest.raises(openai.AuthenticationError):
        openai_client(served, "not-a-real-key-0000").models.list()


def test_summarize_streams_lines_then_the_summary_and_reuses_them(served):
    lines: list[dict] = []
    with TubescopeClient(served["url"], READER) as tc:
        out = tc.summarize([SOURCE], max_new_tokens=4, on_line=lines.append)
        assert [line["level"] for line in lines] == ["period"] and out["lines"] == lines
        assert lines[0]["text"] == "!!!!" and (lines[0]["start"], lines[0]["end"]) == ("0:00", "0:04")
        assert out["summaries"] == {SOURCE: "!!!!"} and lines[0]["cached"] is False
        again = tc.summarize([SOURCE], max_new_tokens=4)                # plain JSON; the period from the cache
        assert again["summaries"] == out["summaries"] and again["lines"][0]["cached"] is True
        with pytest.raises(ApiError) as info:
            tc.summarize([SOURCE], granularity=1)
        assert info.value.status == 422 and "granularity" in str(info.value)
    (_, fields), *_ = served["redis"].client(decode_responses=True).xrevrange(SUMMARIES_STREAM, count=1)
    assert json.loads(fields["summaries"]) == out["summaries"]
    with http(served, CAM_READER) as c:                               # a key limited to cam1 cannot read clip
        err(c.post("/v1/summarize", json={"source": SOURCE}), 403, "clip")


def test_a_vanished_index_root_is_503_not_an_empty_index(served):
    """An unmounted or deleted index volume must not read as 'nothing indexed' (404) or be recreated by a write."""
    root = Path(served["settings"].index_root)
    away = root.with_name(root.name + "-unmounted")
    root.rename(away)
    try:
        with http(served, READER) as c:
            r = c.get("/healthz")
            assert r.status_code == 503 and r.json()["index"] is False and r.json()["redis"] is True
            err(c.get("/v1/sources"), 503, "index root")
            err(c.get(f"/v1/sources/{SOURCE}/segments"), 503, "index root")
            err(c.post("/v1/ask", json={"question": "What moves?", "source": SOURCE, "max_new_tokens": 2}), 503,
                "index root")
            err(c.post("/v1/search", json={"query": "a car", "sources": [SOURCE]}), 503, "index root")
        with http(served, ADMIN) as c:                     # a job could only fail (or start a new index): refused
            err(c.post("/v1/jobs", json={"paths": [str(served["clip"])], "source_id": "late"}), 503, "index root")
        assert not root.exists()
    finally:
        away.rename(root)                                  # the volume comes back: everything indexed is there
    with http(served, READER) as c:
        assert c.get("/healthz").json()["status"] == "ok"
        r = c.post("/v1/ask", json={"question": "What moves?", "source": SOURCE, "max_new_tokens": 2})
        assert r.status_code == 200 and r.json()["answer"] == "!!" and len(r.json()["evidence"]) == 2


def test_an_unwritable_index_is_503_in_healthz(served):
    """A volume remounted read-only still reads: /healthz must say ingest cannot write, naming the cause."""
    with read_only(served["settings"].index_root) as cause:
        with http(served, None) as c:
            r = c.get("/healthz")
            assert r.status_code == 503, r.text
            assert r.json()["index"] is True and r.json()["index_writable"] is False
            assert r.json()["error"] == f"index not writable: {cause}"
    with http(served, None) as c:
        assert c.get("/healthz").json()["status"] == "ok"
    assert not [p for p in Path(served["settings"].index_root).iterdir() if p.name.startswith(".tmp-")]


def test_ask_limits_and_bad_requests(served):
    with http(served, READER) as c:
        q = {"question": "What moves?", "source": SOURCE}
        err(c.post("/v1/ask", json={**q, "question": "x" * 201}), 422, "question has 201 characters; the limit is 200")
        err(c.post("/v1/ask", json={**q, "start": 0, "end": 7200}), 422, "longer than the limit 3600 s")
        err(c.post("/v1/ask", json={**q, "start": 5, "end": 5}), 422, "must be after start")
        err(c.post("/v1/ask", json={**q, "max_new_tokens": 65}), 422, "max_new_tokens 65 is over the maximum 64")
        err(c.post("/v1/ask", json={**q, "max_new_tokens": 0}), 422, "max_new_tokens")
        err(c.post("/v1/ask", json={**q, "sources": [SOURCE]}), 422, "either source or sources")
        err(c.post("/v1/ask", json={"question": "What?"}), 422, "source (one id) or sources")
        err(c.post("/v1/ask", json={**q, "source": "nope"}), 404, "nope")
        err(c.post("/v1/ask", json={**q, "start": 100, "end": 200}), 404, "")
        err(c.post("/v1/ask", json={"question": ""}), 422, "question")
        err(c.post("/v1/ask", content=b"{not json", headers={"content-type": "application/json"}), 422, "invalid")
        big = {**q, "question": "x" * 5000}
        err(c.post("/v1/ask", json=big), 413, "request body over 4096 bytes")

        def chunks():                                         # no Content-Length: counted as it arrives
            yield b'{"question": "'
            for _ in range(10):
                yield b"x" * 1000
            yield b'", "source": "clip"}'
        err(c.post("/v1/ask", content=chunks(), headers={"content-type": "application/json"}), 413, "4096 bytes")


def test_overload_is_503_with_retry_after(served):
    """One ask running, one queued (max_queued_requests=1): the rest are refused at once, not left hanging."""
    results: list[httpx.Response] = []
    lock = threading.Lock()
    start = threading.Barrier(8)

    def ask():
        with http(served, READER) as c:
            start.wait()
            r = c.post("/v1/ask", json={"question": "Describe everything in detail.", "source": SOURCE,
                                        "max_new_tokens": 64})
        with lock:
            results.append(r)

    threads = [threading.Thread(target=ask) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    codes = sorted(r.status_code for r in results)
    assert len(codes) == 8 and set(codes) <= {200, 503}, codes
    assert codes.count(200) >= 1 and codes.count(503) >= 1, codes
    for r in results:
        if r.status_code == 503:
            assert r.headers.get("retry-after") == "7" and "busy" in r.json()["error"], (r.headers, r.text)
    with http(served) as c:
        wait_for_metric(c, r'tubescope_requests_total\{[^}]*endpoint="POST /v1/ask"[^}]*status="503"')


# ---- feeds ----------------------------------------------------------------------------------------------------------
def feed_status(c: httpx.Client, feed_id: str) -> dict:
    r = c.get(f"/v1/feeds/{feed_id}")
    assert r.status_code == 200, r.text
    return r.json()["status"]


def test_feeds_add_list_get_delete(served, tmp_path):
    refused = f"rtsp://user:pw@127.0.0.1:{free_tcp_port()}/cam"
    with http(served) as c:
        r = c.post("/v1/feeds", json={"url": refused, "name": "Door", "id": "door"})
        assert r.status_code == 201, r.text
        feed = r.json()
        assert (feed["id"], feed["name"]) == ("door", "Door") and "pw" not in feed["url"]
        local = c.post("/v1/feeds", json={"url": str(served["clip"]), "fps": 1.0, "max_pixels": 8 * 784})
        assert local.status_code == 201, local.text
        assert [f["id"] for f in c.get("/v1/feeds").json()["feeds"]] == ["door", local.json()["id"]]

        # the supervisor starts the reader: it is running, not connected, and counts its failed connects
        wait_for(lambda: feed_status(c, "door")["state"] == "running", 30, 0.2, "door reader running")
        wait_for(lambda: feed_status(c, "door")["open_failures"] >= 1, 30, 0.2, "a refused connect")
        st = feed_status(c, "door")
        assert st["connected"] is False and {"lag_s", "last_frame_time", "reconnects", "drops"} <= set(st)

        err(c.post("/v1/feeds", json={"url": refused, "id": "door"}), 409, "already exists")
        # a feed is addressed by its name wherever a source is taken (nothing indexed for it yet: 404 by id)
        err(c.post("/v1/search", json={"query": "q", "sources": ["Door"]}), 404, "'door'")
        err(c.post("/v1/ask", json={"question": "q?", "source": "Door"}), 404, "'door'")
    with http(served, CAM_READER) as c:                 # a name outside the key's sources resolves to nothing
        err(c.post("/v1/search", json={"query": "q", "sources": ["Door"]}), 403, "'Door'")
    with http(served) as c:
        err(c.post("/v1/feeds", json={"url": "ftp://h/x.mp4"}), 422, "scheme 'ftp'")
        for sneaky, words in ((f"concat:{served['clip']}|/etc/passwd", "scheme 'concat'"),
                              (f"file:{served['clip']}", "must be written file://"),
                              (f"subfile,,start,0,end,0,,:{served['clip']}", "scheme 'subfile'")):
            err(c.post("/v1/feeds", json={"url": sneaky}), 422, words)    # FFmpeg prefixes are schemes too
        outside = tmp_path / "x.mp4"
        err(c.post("/v1/feeds", json={"url": str(outside)}), 422, "outside the allowed roots")
        err(c.post("/v1/feeds", json={"url": f"file://{outside}"}), 422, "outside the allowed roots")
        err(c.post("/v1/feeds", json={"url": refused, "fps": 0}), 422, "fps")
        for bad in ("true", '"2"', "NaN", "Infinity", "1e400"):         # no bool, string or non-finite numbers
            err(raw_post(c, "/v1/feeds", f'{{"url": "{refused}", "fps": {bad}}}'), 422, "fps")
        err(c.post("/v1/feeds", json={"url": refused, "id": "door2\n"}), 422, "feed_id")
        err(c.post("/v1/feeds", json={"url": refused, "id": "a:b"}), 422, "feed_id")
        err(c.post("/v1/feeds", json={}), 422, "url")
        err(c.get("/v1/feeds/nope"), 404, "no feed with id 'nope'")

        assert c.delete(f"/v1/feeds/{local.json()['id']}").json()["deleted"]["id"] == local.json()["id"]
        err(c.delete(f"/v1/feeds/{local.json()['id']}"), 404, "no feed")
        wait_for(lambda: _no_actor(reader_name(local.json()["id"])), 30, 0.2, "removed feed's reader stopped")
    with http(served, READER) as c:                              # readers may read feeds
        assert [f["id"] for f in c.get("/v1/feeds").json()["feeds"]] == ["door"]
    with http(served, CAM_READER) as c:                          # ...but only their own
        assert c.get("/v1/feeds").json() == {"feeds": []}
    with http(served) as c:
        status = c.get("/v1/status").json()
        assert "door" in status["feeds"] and status["index"]["sources"] >= 1 and status["live_indexer"] is None
        # the retention schedule runs in its own deployment (its first sweep at start), with or without feeds
        assert status["retention"]["running"] and status["retention"]["sweeps"] >= 1


def test_feeds_may_not_point_at_this_node_and_readers_see_no_port_state(served):
    redis_port, api_port = served["redis"].port, served["port"]
    with http(served) as c:
        for url, words in (("rtsp://127.0.0.2/cam", "'127.0.0.2' is a loopback address"),   # only 127.0.0.1 allowed
                           ("rtsp://[::1]:8554/cam", "loopback"),
                           ("http://169.254.169.254/latest/meta-data/", "link-local"),
                           ("rtsp://0.0.0.0:8554/cam", "unspecified"),
                           ("udp://:5600", "feed_udp_listen"),
                           (f"rtsp://127.0.0.1:{redis_port}/x", f"port {redis_port} of this service's own Redis"),
                           (f"http://127.0.0.1:{api_port}/healthz", f"port {api_port} of this service's own API")):
            err(c.post("/v1/feeds", json={"url": url}), 422, words)
        assert "gate" not in [f["id"] for f in c.get("/v1/feeds").json()["feeds"]]
        # 127.0.0.1 is allowed by feed_allow_hosts: a closed port there registers, and fails to open
        closed = f"rtsp://127.0.0.1:{free_tcp_port()}/cam"
        assert c.post("/v1/feeds", json={"url": closed, "id": "gate"}).status_code == 201
        admin_view = wait_for(lambda: (st := feed_status(c, "gate")).get("open_failures", 0) >= 1 and st, 30, 0.2,
                              "gate's refused connect")
        assert "refused" in admin_view["last_error_detail"].lower()
    with http(served, READER) as c:                 # a reader sees that it failed, never how
        reader_view = feed_status(c, "gate")
        assert reader_view["last_error"] == "open failed: source unreachable"
        assert not {"last_error_detail", "last_error_time", "open_failures", "backoff_s"} & set(reader_view)
        assert "refused" not in json.dumps(reader_view).lower()
    with http(served) as c:
        assert c.delete("/v1/feeds/gate").status_code == 200


def test_a_feed_is_refused_when_no_reader_fits(served, tmp_path):
    """2 CPUs hold 5 readers beside the live indexer (0.5) and room for an archive task (0.25): the sixth is a 409."""
    from pipeline.feeds import add_feed, remove_feed

    extra = [add_feed(served["redis"].url, f"rtsp://127.0.0.1:{free_tcp_port()}/x", feed_id=f"full{i}",
                      settings=served["settings"])["id"] for i in range(4)]
    try:
        with http(served) as c:
            err(c.post("/v1/feeds", json={"url": "rtsp://127.0.0.1:1/x", "id": "sixth"}), 409,
                "no capacity left for another feed reader: each claims 0.25 CPU, and the cluster's 2 CPUs hold 5")
            err(c.get("/v1/feeds/sixth"), 404, "no feed")
    finally:
        for feed_id in extra:
            remove_feed(served["redis"].url, feed_id)


def _no_actor(name: str) -> bool:
    try:
        ray.get_actor(name, namespace=NAMESPACE)
    except ValueError:
        return True
    return False


def test_restarted_app_resumes_feeds_from_the_registry(served):
    with http(served) as c:
        before = feed_status(c, "door")
    stop_app()                                                    # the service goes away: its readers with it
    assert _no_actor(reader_name("door"))
    from deploy.jobs import create_job, job_key                   # ...and a job it ran is left "running"
    orphan = create_job(served["redis"].url, [str(served["clip"])], "orphan")["id"]
    served["redis"].client().hset(job_key(orphan), "state", '"running"')
    run_app(served["settings"], host="127.0.0.1", port=served["port"], live=False)
    with http(served) as c:
        done = wait_job(c, orphan)                                # the new service resumes it at start
        assert (done["state"], done["segments"], done["resumes"]) == ("succeeded", 2, 1), done
        assert [f["id"] for f in c.get("/v1/feeds").json()["feeds"]] == ["door"]
        wait_for(lambda: feed_status(c, "door")["state"] == "running", 30, 0.2, "door reader resumed")
        after = feed_status(c, "door")
        assert after["started_at"] > before["started_at"] and after["pid"] != before["pid"]
        assert c.delete("/v1/feeds/door").status_code == 200
