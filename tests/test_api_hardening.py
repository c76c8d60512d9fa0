"""The REST API against hostile or unlucky clients, over real HTTP: real Ray Serve (a small app of its own: no feed
service, no captions), real Redis that one test stops, a real archive job.

Keys before bodies (over the app's whole route table), the error statuses in the OpenAPI, JSON booleans refused as
numbers, slow bodies and slow request heads (408) and idle connections closed while others are served, source ids
hashed in the metrics, and a Redis outage answered 503 with Retry-After. The Redis outage test is last: it stops the app's Redis.
"""
from __future__ import annotations

import re
import socket
import threading
import time
import typing

import httpx
import pytest
from pydantic import BaseModel

from deploy.api.deps import SCOPES
from deploy.api.main import ROUTERS
from deploy.app import run_app, stop_app
from pipeline.redis_server import free_port
from pipeline.settings import load_settings
from raw_http import read_response, read_until_closed
from services import start_redis
from videos import encode_video

OPENAI_PATHS = ("/v1/chat/completions", "/v1/models", "/v1/models/{model}")
ADMIN = "admin-key-0123456789"
READER = "reader-key-0123456789"
METRICS_KEY = "metrics-label-key-0123456789"
BODY_TIMEOUT_S = 2.0
KEEP_ALIVE_S = 4
HEADER_TIMEOUT_S = 1.5
RETRY_AFTER_S = 3
pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def app(tmp_path_factory, ray_local):
    root = tmp_path_factory.mktemp("api-hardening")
    videos = root / "videos"
    clip = encode_video(videos / "lobby.mp4", 160, 90, 30, seconds=2.0).path
    redis = start_redis(root / "redis")
    settings = load_settings(
        data_dir=root / "data", redis_url=redis.url, file_roots=[videos], segment_seconds=2.0,
        min_pixels=4 * 784, max_pixels=16 * 784, captions=False, decoder_cpus=0,
        api_keys=[{"key": ADMIN, "role": "admin"}, {"key": READER, "role": "reader"}],
        api_body_timeout_seconds=BODY_TIMEOUT_S, api_keep_alive_seconds=KEEP_ALIVE_S,
        api_header_timeout_seconds=HEADER_TIMEOUT_S,
        api_retry_after_seconds=RETRY_AFTER_S, metrics_source_key=METRICS_KEY)
    port = free_port()
    url = run_app(settings, host="127.0.0.1", port=port, feeds=False, live=False)
    yield {"url": url, "port": port, "settings": settings, "redis": redis, "clip": clip}
    stop_app()
    redis.stop()


def http(app, key: str | None = ADMIN) -> httpx.Client:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.Client(base_url=app["url"], headers=headers, timeout=60)


def scoped_routes():
    """(method, path with its parameters filled in, scope name) of every route of the app."""
    for router in ROUTERS:
        for route in router.routes:
            for method in sorted(route.methods):
                yield method, re.sub(r"\{[^}]+\}", "x", route.path), SCOPES[route.scope]


def error_message(body: dict) -> str:
    """The message of an error body: {"error": message}, or OpenAI's {"error": {"message": ...}} on its routes."""
    return body["error"]["message"] if isinstance(body["error"], dict) else body["error"]


# ---- keys before bodies ---------------------------------------------------------------------------------------------
def test_keys_are_checked_before_the_body_on_every_route(app):
    """A malformed body must not be judged (422) before the caller is (401/403): the anonymous would learn the
    routes' request shapes."""
    malformed = {"content": b'{"paths": [', "headers": {"content-type": "application/json"}}
    checked = 0
    for method, path, scope in scoped_routes():
        if scope == "public":
            continue
        with http(app, None) as c:
            r = c.request(method, path, **malformed)
            assert r.status_code == 401, (method, path, r.status_code, r.text)
            assert error_message(r.json()).startswith("missing API key") and r.headers["www-authenticate"] == "Bearer"
        if scope in ("admin", "metrics"):
            with http(app, READER) as c:
                r = c.request(method, path, **malformed)
                assert r.status_code == 403, (method, path, r.status_code, r.text)
        checked += 1
    assert checked >= 13
    with http(app, ADMIN) as c:              # with the right key the body is judged as before
        r = c.post("/v1/jobs", **malformed)
        assert r.status_code == 422 and "JSON" in r.json()["error"], r.text


# ---- the OpenAPI lists every status -------------------------------------------------------------------------------
def test_openapi_documents_each_routes_error_statuses(app):
    with http(app, None) as c:
        spec = c.get("/openapi.json").json()
    scopes = {(m.lower(), re.sub(r":path}", "}", p)): s
              for router in ROUTERS for route in router.routes if route.include_in_schema for m, p, s in
              [(m, route.path, SCOPES[route.scope]) for m in route.methods]}
    assert len(scopes) == sum(len(ops) for ops in spec["paths"].values())
    error_ref = {"$ref": "#/components/schemas/ErrorBody"}
    openai_ref = {"$ref": "#/components/schemas/OpenAIErrorBody"}          # OpenAI's shape on its routes
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            statuses = set(op["responses"])
            where = f"{method.upper()} {path}"
            if scopes[(method, path)] != "public":
                assert {"401", "403"} <= statuses, where
            if "requestBody" in op:
                assert {"408", "413", "422"} <= statuses, where
            if op.get("parameters"):
                assert "422" in statuses, where
            assert "503" in statuses or path == "/metrics", where
            for status, response in op["responses"].items():
                if status >= "400" and path != "/healthz":       # /healthz answers 503 with its own status body
                    assert response["content"]["application/json"]["schema"] == \
                        (openai_ref if path in OPENAI_PATHS else error_ref), (where, status)
                    assert response["description"], (where, status)
    assert "HTTPValidationError" not in spec["components"]["schemas"]     # 422 is {"error": ...} like the rest
    assert spec["paths"]["/v1/feeds"]["post"]["responses"]["409"]["description"]
    assert "404" in spec["paths"]["/v1/jobs/{job_id}"]["get"]["responses"]


# ---- JSON true is no number -----------------------------------------------------------------------------------------
def request_models() -> list[type[BaseModel]]:
    return [p.field_info.annotation for router in ROUTERS for route in router.routes
            for p in route.dependant.body_params
            if isinstance(p.field_info.annotation, type) and issubclass(p.field_info.annotation, BaseModel)]


def numeric_fields(model: type[BaseModel]) -> list[str]:
    def numeric(annotation) -> bool:          # int, float, or a union / Annotated holding one (StrictFloat)
        return annotation in (int, float) or any(numeric(a) for a in typing.get_args(annotation))
    return [name for name, f in model.model_fields.items() if numeric(f.annotation)]


def test_request_models_refuse_json_booleans_as_numbers():
    models = request_models()
    assert {m.__name__ for m in models} == {"FeedCreate", "JobCreate", "SearchRequest", "AskRequest",
                                            "SummarizeRequest", "AlertCreate", "ChatCompletionRequest"}
    fields = {(m, f) for m in models for f in numeric_fields(m)}
    assert {(m.__name__, f) for m, f in fields} >= {("FeedCreate", "fps"), ("FeedCreate", "max_pixels"),
                                                    ("SearchRequest", "limit"), ("SearchRequest", "start"),
                                                    ("AskRequest", "max_new_tokens"), ("AskRequest", "end"),
                                                    ("SummarizeRequest", "granularity"),
                                                    ("AlertCreate", "threshold"), ("AlertCreate", "cooldown_seconds"),
                                                    ("AskRequest", "temperature"), ("AskRequest", "seed"),
                                                    ("ChatCompletionRequest", "max_tokens"),
                                                    ("ChatCompletionRequest", "temperature"),
                                                    ("ChatCompletionRequest", "top_k")}
    for model, field in fields:
        for value, refused in ((True, True), (False, True), (1, False)):
            try:
                model.model_validate_json(f'{{"{field}": {str(value).lower()}}}')
                bad = set()
            except Exception as e:     # noqa: BLE001 - pydantic's ValidationError; other fields may be missing
                bad = {err["loc"][0] for err in e.errors()}
            assert (field in bad) == refused, (model.__name__, field, value, bad)


def test_a_boolean_for_a_number_is_422_over_http(app):
    with http(app, READER) as c:
        r = c.post("/v1/ask", json={"question": "q?", "source": "lobby", "max_new_tokens": True})
        assert r.status_code == 422 and "max_new_tokens" in r.json()["error"], r.text


# ---- slow clients ---------------------------------------------------------------------------------------------------
def raw_connection(app) -> socket.socket:
    return socket.create_connection(("127.0.0.1", app["port"]), timeout=10)


def stalled_post(app, body_sent: bytes) -> socket.socket:
    sock = raw_connection(app)
    sock.sendall(b"POST /v1/jobs HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer " + ADMIN.encode() +
                 b"\r\nContent-Type: application/json\r\nContent-Length: 200\r\n\r\n" + body_sent)
    return sock


def trickle(sock: socket.socket, payload: bytes, every_s: float, stop: threading.Event) -> None:
    """Send payload one byte every every_s seconds from a thread, until it is sent, stop is set or the send fails:
    each byte arrives in time, the whole never does."""
    def run():
        for byte in payload:
            if stop.wait(every_s):
                return
            try:
                sock.sendall(bytes([byte]))
            except OSError:
                return
    threading.Thread(target=run, daemon=True).start()


def assert_408_and_closed(sock: socket.socket, setting: str, within_s: float) -> None:
    """The server answers 408 naming `setting`, with Connection: close, and closes within within_s."""
    data, closed_after = read_until_closed(sock, within_s + 10)
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408"), data[:300]
    assert b"connection: close" in head.lower() and setting.encode() in body, data
    assert closed_after < within_s


def test_a_stalled_or_trickled_body_is_408_and_closed_while_others_are_served(app):
    stalled = stalled_post(app, b'{"paths": [')
    trickled = stalled_post(app, b"")
    stop = threading.Event()
    trickle(trickled, b'{"paths": ["' + b"x" * 190, 0.2, stop)
    try:
        with http(app, READER) as c:         # meanwhile everyone else is answered at once
            t0 = time.monotonic()
            assert c.get("/v1/sources").status_code == 200
            assert c.get("/healthz").status_code == 200
            assert time.monotonic() - t0 < BODY_TIMEOUT_S
        for sock in (stalled, trickled):
            assert_408_and_closed(sock, "api_body_timeout_seconds", BODY_TIMEOUT_S + 5)
    finally:
        stop.set()
        stalled.close()
        trickled.close()


def test_idle_kept_alive_connections_are_closed(app):
    sock = raw_connection(app)
    try:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
        data, closed_after = read_until_closed(sock, KEEP_ALIVE_S + 10)
        assert data.startswith(b"HTTP/1.1 200"), data[:200]
        assert closed_after < KEEP_ALIVE_S + 3               # api_keep_alive_seconds reached Serve's proxy
    finally:
        sock.close()


def test_a_trickled_or_silent_request_head_is_408_and_closed_while_others_are_served(app):
    """Serve's proxy keeps the request-head deadline (deploy/http_deadlines.py): a slowloris client, one header
    byte a second, and a client that sends nothing are cut off after api_header_timeout_seconds; nobody waits."""
    trickled, silent = raw_connection(app), raw_connection(app)
    trickled.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
    stop = threading.Event()
    trickle(trickled, b"X-Slow: " + b"a" * 60, 1.0, stop)
    try:
        with http(app, None) as c:
            t0 = time.monotonic()
            assert c.get("/healthz").status_code == 200
            assert time.monotonic() - t0 < HEADER_TIMEOUT_S
        for sock in (trickled, silent):
            assert_408_and_closed(sock, "api_header_timeout_seconds", HEADER_TIMEOUT_S + 1.5)
    finally:
        stop.set()
        trickled.close()
        silent.close()
    with http(app) as c:                     # counted by the proxy process, exported through Ray
        deadline = time.time() + 30
        while not re.search(r'^tubescope_http_timeouts_total\{[^}]*phase="head"[^}]*\} ([2-9]|\d\d)',
                            text := c.get("/metrics").text, re.M):
            assert time.time() < deadline, text[-3000:]
            time.sleep(0.5)


def test_a_kept_alive_connection_waits_idle_up_to_the_keep_alive_not_the_head_deadline(app):
    """Between requests the keep-alive timeout rules: the head deadline starts at the next request's first byte."""
    sock = raw_connection(app)
    try:
        for pause in (0.0, HEADER_TIMEOUT_S + 1.0):
            time.sleep(pause)
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
            assert read_response(sock).startswith(b"HTTP/1.1 200"), pause
        sock.sendall(b"GET /healthz HTTP/1.1\r\n")          # then a head that never ends: cut off
        data, closed_after = read_until_closed(sock, HEADER_TIMEOUT_S + 10)
        assert data.startswith(b"HTTP/1.1 408") and closed_after < HEADER_TIMEOUT_S + 1.5, data[:200]
    finally:
        sock.close()


# ---- metrics name no source -----------------------------------------------------------------------------------------
def test_source_labels_are_stable_keyed_hashes_with_the_setting(tmp_path):
    from pipeline import metrics

    def labels(**settings) -> list[str]:
        metrics.configure(load_settings(data_dir=tmp_path, **settings))
        return [metrics.source_label(s) for s in ("lobby", "lot/north", "lobby")]

    try:
        assert labels() == ["lobby", "lot/north", "lobby"]                  # no key: the ids themselves
        one = labels(metrics_source_key=METRICS_KEY)
        assert one[0] == one[2] != one[1] and all(re.fullmatch(r"src-[0-9a-f]{12}", x) for x in one)
        assert labels(metrics_source_key=METRICS_KEY) == one                 # stable: any process, any run
        assert labels(metrics_source_key="another-key-0123456789")[0] != one[0]   # keyed: no guessing from ids
        with pytest.raises(ValueError, match="source_id"):
            metrics.source_label("")
        with pytest.raises(ValueError, match="metrics_source_key"):          # a short key is no secret
            load_settings(data_dir=tmp_path, metrics_source_key="short")
        public = load_settings(data_dir=tmp_path, metrics_source_key=METRICS_KEY).to_public_dict()
        assert public["metrics_source_key"] == "***"
    finally:
        metrics.configure(load_settings(data_dir=tmp_path))


def test_metric_labels_carry_a_keyed_hash_of_the_source_not_its_id(app):
    from pipeline import metrics

    # a name no other test gives a source: the Ray session's metrics outlive other tests' apps
    with http(app) as c:
        r = c.post("/v1/jobs", json={"paths": [str(app["clip"])], "source_id": "hashed-cam"})
        assert r.status_code == 202, r.text
        job_id = r.json()["id"]
        deadline = time.time() + 120
        while (job := c.get(f"/v1/jobs/{job_id}").json())["state"] in ("queued", "running"):
            assert time.time() < deadline, job
            time.sleep(0.5)
        assert job["state"] == "succeeded" and job["segments"] == 1, job
        metrics.configure(app["settings"])
        try:
            label = metrics.source_label("hashed-cam")
        finally:
            metrics.configure(load_settings(data_dir=app["settings"].data_dir))
        assert re.fullmatch(r"src-[0-9a-f]{12}", label)
        deadline = time.time() + 30
        while f'source="{label}"' not in (text := c.get("/metrics").text):
            assert time.time() < deadline, text[-3000:]
            time.sleep(0.5)
        assert re.search(rf'tubescope_index_segments\{{[^}}]*source="{label}"[^}}]*\}} 1', text), text[-3000:]
        assert "hashed-cam" not in text


# ---- Redis down: 503 with Retry-After (last: it stops the app's Redis) ----------------------------------------------
def test_redis_outage_is_503_with_retry_after_and_the_service_comes_back(app):
    redis = app["redis"]
    redis.stop()
    try:
        with http(app) as c:
            for method, path, body in [("GET", "/v1/feeds", None), ("POST", "/v1/feeds", {"url": "rtsp://h/cam"}),
                                       ("GET", "/v1/feeds/cam", None), ("DELETE", "/v1/feeds/cam", None),
                                       ("POST", "/v1/jobs", {"paths": [str(app["clip"])]}),
                                       ("GET", "/v1/jobs/abc", None), ("DELETE", "/v1/jobs/abc", None)]:
                r = c.request(method, path, json=body)
                assert r.status_code == 503, (method, path, r.status_code, r.text)
                assert r.headers["retry-after"] == str(RETRY_AFTER_S), (method, path, r.headers)
                assert r.json() == {"error": f"Redis is unreachable (feeds and jobs live there); retry in "
                                             f"{RETRY_AFTER_S} s"}, (method, path)
            assert c.get("/healthz").status_code == 503
    finally:
        redis.start()
    with http(app) as c:
        assert c.get("/v1/feeds").json() == {"feeds": []}
        assert c.get("/healthz").status_code == 200
