"""API keys and what each may reach (health, docs and metrics included), and live feeds over HTTP, ending with
a restart of the app that resumes its feeds and jobs."""
from __future__ import annotations

import json

import pytest
import ray

from actors.feeds import NAMESPACE, reader_name
from deploy.app import run_app, stop_app
from streams import free_tcp_port, wait_for

from .http_client import (ADMIN, CAM_ADMIN, CAM_READER, READER, SOURCE, err, feed_status, http, raw_post,
                          wait_for_metric, wait_job)

pytestmark = pytest.mark.timeout(180)


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


# ---- feeds ----------------------------------------------------------------------------------------------------------

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
