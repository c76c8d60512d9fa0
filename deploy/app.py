"""The REST API of tubescope on Ray Serve: a FastAPI ingress and two backing deployments.

    ApiIngress   (FastAPI; routes below; OpenAPI at /docs)  -- auth, limits, feeds, jobs, sources
       |-- DecoderServer  (deploy.decoder.Decoder: one model load per replica; search and ask)
       `-- FeedService    (FeedSupervisor.run in a thread + the LiveIndexer actor: feeds resume after a restart)

`build_app(settings)` returns the bound Serve application; `run_app` starts it on a local Ray and waits until
/healthz answers; `stop_app` shuts Serve down. deploy/serve.yaml names `deploy.app:app_from_env` for clusters.
Errors are JSON {"error": message}. Overload of the decoder is a 503 with Retry-After (Serve's max_queued_requests).
"""
# No `from __future__ import annotations` here: Serve pickles a copy of `api`, and string annotations of the
# request bodies would not resolve in that copy (the OpenAPI schema then fails to build).
import asyncio
import json
import logging
import queue
import threading
import time
import uuid
from typing import Any

import ray
import redis as redis_lib
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from ray.serve.exceptions import BackPressureError
from starlette.exceptions import HTTPException as StarletteHTTPException

from pipeline import metrics
from deploy.auth import AuthError, Authorizer, Caller, require_role, require_sources, visible
from pipeline.index import IndexUnavailable
from pipeline.redis_server import as_client
from pipeline.settings import Settings, redact_url

log = logging.getLogger(__name__)

APP_NAME = "tubescope"
API, DECODER, FEEDS = "Api", "Decoder", "Feeds"      # deployment names (deploy/serve.yaml overrides them by name)
LIVE_INDEXER_NAME = "tubescope-live-indexer"
STATUS_TIMEOUT_S = 5.0

# Set by ApiIngress from the settings. A module global, not app.state: Serve serves a copy of `api`, while this
# module (and so _Guard and the handlers, pickled by reference) is the replica's own.
LIMITS: dict[str, int] = {"max_request_bytes": 64 * 1024, "retry_after_s": 5}


# ---- request bodies ------------------------------------------------------------------------------------------------
class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FeedCreate(_Body):
    url: str = Field(description="rtsp://, http(s)://, udp://, srt://...; or a local file under file_roots")
    name: str | None = None
    fps: float | None = None
    max_pixels: int | None = None
    id: str | None = Field(None, description="feed id (= source id); default: a random 12-character id")


class JobCreate(_Body):
    paths: list[str] = Field(description="files, folders or globs under file_roots (or allowed pyarrow.fs URIs)")
    source_id: str | None = None


class SearchRequest(_Body):
    query: str = Field(min_length=1)
    sources: list[str] | None = None
    start: float | None = None
    end: float | None = None
    limit: int = Field(10, ge=1)


class AskRequest(_Body):
    question: str = Field(min_length=1)
    sources: list[str] | None = None
    source: str | None = None
    start: float | None = None
    end: float | None = None
    max_new_tokens: int | None = Field(None, ge=1)
    stream: bool = False


# ---- the FastAPI app: errors, body limit, metrics -----------------------------------------------------------------
api = FastAPI(title="tubescope", version="0.1.0",
              description="Ask questions over live and archived video. Bearer API keys; errors are {\"error\": ...}.")


def _error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    return _error(exc.status_code, str(exc.detail), getattr(exc, "headers", None))


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    parts = []
    for e in exc.errors():
        where = ".".join(str(x) for x in e.get("loc", ()) if x != "body") or "body"
        parts.append(f"{where}: {e.get('msg', 'invalid')}")
    return _error(422, "invalid request: " + "; ".join(parts))


@api.exception_handler(AuthError)
async def _auth_error(request: Request, exc: AuthError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
    return _error(exc.status, exc.message, headers)


@api.exception_handler(IndexUnavailable)
async def _index_unavailable(request: Request, exc: IndexUnavailable) -> JSONResponse:
    return _error(503, str(exc))


@api.exception_handler(Exception)
async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return _error(500, f"internal error: {type(exc).__name__}: {exc}"[:1000])


def configure_app(settings: Settings) -> None:
    """Set this process's LIMITS and key checker. A module function on purpose: ApiIngress's methods are pickled by
    value (serve.ingress rebinds the class name), so module globals they touched directly would be copies."""
    LIMITS.update(max_request_bytes=settings.api_max_request_bytes, retry_after_s=settings.api_retry_after_seconds)
    _AUTH["authorizer"] = Authorizer(settings.api_keys)


# ---- who is calling: FastAPI dependencies, resolved before the body is validated (401/403 before 422) -------------
_AUTH: dict[str, Authorizer | None] = {"authorizer": None}
_bearer = HTTPBearer(auto_error=False, description="an API key from the settings (api_keys)")


def _authenticate(credentials: HTTPAuthorizationCredentials | None) -> Caller:
    authorizer = _AUTH["authorizer"]
    if authorizer is None:
        raise RuntimeError("the API has no key checker: ApiIngress did not call configure_app")
    return authorizer.authenticate(f"Bearer {credentials.credentials}" if credentials else None)


def reader_key(credentials: HTTPAuthorizationCredentials | None = Depends(_bearer)) -> Caller:
    """Any valid key (reader or admin)."""
    return _authenticate(credentials)


def admin_key(credentials: HTTPAuthorizationCredentials | None = Depends(_bearer)) -> Caller:
    caller = _authenticate(credentials)
    require_role(caller, "admin")
    return caller


def _overload_response() -> JSONResponse:
    retry = int(LIMITS["retry_after_s"])
    return _error(503, f"the decoder is busy (its queue is full); retry in {retry} s", {"Retry-After": str(retry)})


class _Guard:
    """ASGI middleware: refuses bodies over the size limit (413) and records request metrics.

    The limit is LIMITS["max_request_bytes"], set by ApiIngress from the settings."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = int(LIMITS["max_request_bytes"])
        too_big = f"request body over {limit} bytes (api_max_request_bytes)"
        status_seen: list[int] = []
        t0 = time.perf_counter()

        async def send_counted(message):
            if message["type"] == "http.response.start":
                status_seen.append(message["status"])
            await send(message)

        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            await _error(413, too_big)(scope, receive, send_counted)
        else:
            received = 0

            async def receive_limited():
                nonlocal received
                message = await receive()
                if message["type"] == "http.request":
                    received += len(message.get("body", b""))
                    if received > limit:     # a chunked body without Content-Length
                        raise HTTPException(413, too_big)
                return message

            await self.app(scope, receive_limited, send_counted)
        route = getattr(scope.get("route"), "path", None) or "unmatched"
        metrics.record_query(f'{scope["method"]} {route}', status_seen[0] if status_seen else 500,
                             time.perf_counter() - t0)


api.add_middleware(_Guard)


def _require_named_source(caller: Caller, source_id: str | None, how: str) -> None:
    """A source-limited key may only create feeds/jobs whose source it names, and that it may use."""
    if caller.sources is None:
        return
    if source_id is None:
        raise AuthError(403, f"this API key is limited to sources {list(caller.sources)}: {how}")
    require_sources(caller, [source_id])


# ---- helpers ----------------------------------------------------------------------------------------------------------
def _check_window(start: float | None, end: float | None, settings: Settings) -> None:
    if start is not None and end is not None:
        if end <= start:
            raise HTTPException(422, f"window end ({end}) must be after start ({start})")
        if end - start > settings.api_max_window_seconds:
            raise HTTPException(422, f"window of {end - start:g} s is longer than the limit "
                                     f"{settings.api_max_window_seconds:g} s (api_max_window_seconds)")


def _check_length(what: str, text: str, limit: int, setting: str) -> None:
    if len(text) > limit:
        raise HTTPException(422, f"{what} has {len(text)} characters; the limit is {limit} ({setting})")


def _public_feed(record: dict) -> dict:
    return {**record, "url": redact_url(record["url"])}


def _decoder_error(result: dict) -> None:
    if "error" in result:
        raise HTTPException(int(result.get("status", 500)), result["error"])


def _sse(event: str, data: Any) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, default=str)}\n\n".encode()


# ---- deployments --------------------------------------------------------------------------------------------------------
class DecoderServer:
    """One Decoder (one model load) per replica. Errors the caller caused come back as {"error", "status"}."""

    def __init__(self, settings: Settings, model_path: str, redis_url: str):
        from deploy.decoder import Decoder
        from pipeline.events import EventSink
        from pipeline.index import SegmentIndex

        replica = _replica_tag()
        self.events = EventSink(redis_url, settings.outbox_dir / "decoder" / replica, maxlen=settings.stream_maxlen,
                                outbox_max=settings.outbox_max_events)
        index = SegmentIndex(settings.index_root, create=False)
        self.decoder = Decoder(settings, model_path, index=index, events=self.events)

    @staticmethod
    def _call(fn, *args, **kwargs) -> dict:
        try:
            return {"result": fn(*args, **kwargs)}
        except LookupError as e:        # unknown source, nothing indexed in the window
            return {"error": str(e).strip("'\""), "status": 404}
        except IndexUnavailable as e:   # the index root vanished: not the caller's fault, and not "nothing indexed"
            return {"error": str(e), "status": 503}
        except ValueError as e:
            return {"error": str(e), "status": 422}

    def search(self, req: dict) -> dict:
        return self._call(self.decoder.search, req["query"], req["sources"], start=req.get("start"),
                          end=req.get("end"), limit=req["limit"])

    def ask(self, req: dict) -> dict:
        return self._call(self.decoder.ask, req["question"], req["sources"], start=req.get("start"),
                          end=req.get("end"), max_new_tokens=req["max_new_tokens"])

    def ask_stream(self, req: dict):
        """Yields {"token": text}... then {"result": answer}, or one {"error", "status"}. ask runs in a thread."""
        tokens: queue.Queue = queue.Queue()
        done = object()

        def work():
            try:
                out = self._call(self.decoder.ask, req["question"], req["sources"], start=req.get("start"),
                                 end=req.get("end"), max_new_tokens=req["max_new_tokens"],
                                 on_token=lambda t: tokens.put({"token": t if isinstance(t, str) else str(t)}))
            except Exception as e:  # noqa: BLE001 - the stream must end with an error event, never hang
                log.exception("streamed ask failed")
                out = {"error": f"internal error: {type(e).__name__}: {e}"[:1000], "status": 500}
            tokens.put(out)
            tokens.put(done)

        threading.Thread(target=work, name="ask-stream", daemon=True).start()
        while (item := tokens.get()) is not done:
            yield item

    def stats(self) -> dict:
        return self.decoder.stats()

    def __del__(self):
        events = getattr(self, "events", None)
        if events is not None:
            events.close()


class FeedService:
    """Runs FeedSupervisor.run in a thread (registry -> running FeedReaders) and, optionally, the LiveIndexer actor.

    It is a Serve deployment of one replica, so a restarted or redeployed app resumes every registered feed."""

    def __init__(self, settings: Settings, model_path: str, redis_url: str, live: bool = True):
        from actors.feeds import NAMESPACE, FeedSupervisor

        self.supervisor = FeedSupervisor(redis_url, settings)
        self.live = None
        if live:
            from actors.live import LiveIndexer

            self.live = LiveIndexer.options(name=LIVE_INDEXER_NAME, namespace=NAMESPACE).remote(
                settings, model_path, redis_url)
            self.live.start.remote()
        self._thread = threading.Thread(target=self.supervisor.run, args=(settings.feed_reconcile_seconds,),
                                        name="feed-supervisor", daemon=True)
        self._thread.start()

    def reconcile_now(self) -> bool:
        """Start the supervisor's next round now (a feed was added or removed) instead of after its interval."""
        self.supervisor.wake()
        return True

    def status(self) -> dict:
        feeds = self.supervisor.statuses(STATUS_TIMEOUT_S)
        live = None
        if self.live is not None:
            try:
                live = ray.get(self.live.status.remote(), timeout=STATUS_TIMEOUT_S)
            except Exception as e:  # noqa: BLE001 - reported, not raised
                live = {"running": False, "error": f"{type(e).__name__}: {e}"}
        return {"feeds": feeds, "live_indexer": live}

    def __del__(self):
        thread = getattr(self, "_thread", None)
        if thread is None:
            return
        self.supervisor.stop()
        thread.join(timeout=10)
        self.supervisor.stop_all()
        if self.live is not None:
            try:
                ray.get(self.live.stop.remote(), timeout=30)
                ray.kill(self.live, no_restart=True)
            except Exception:  # noqa: BLE001 - shutting down anyway
                pass


@serve.ingress(api)
class ApiIngress:
    def __init__(self, settings: Settings, decoder, feed_service=None):
        from pipeline.index import SegmentIndex

        self.settings = settings
        self.redis = as_client(settings.redis_url)
        self.index = SegmentIndex(settings.index_root, create=False)
        self.decoder = decoder
        self.feed_service = feed_service
        self.job_refs: dict[str, Any] = {}          # job id -> ObjectRef of its task (to notice a crashed worker)
        configure_app(settings)

    # ---- health and metrics (no key) ----------------------------------------------------------------------------------
    @api.get("/healthz")
    def healthz(self):
        try:
            self.redis.ping()
        except redis_lib.RedisError as e:
            return JSONResponse({"status": "degraded", "redis": False, "error": str(e)}, status_code=503)
        try:
            self.index.check_root()
        except IndexUnavailable as e:
            return JSONResponse({"status": "degraded", "redis": True, "index": False, "error": str(e)},
                                status_code=503)
        return {"status": "ok", "redis": True, "index": True}

    @api.get("/metrics", response_class=PlainTextResponse)
    def metrics_text(self):
        """This node's tubescope_* metrics (from every actor and replica on it, via Ray's metrics export) followed by
        this replica's process metrics. A Prometheus server should scrape Ray's export port on every node instead
        (dashboards/prometheus.yml); this endpoint is for a quick look without one."""
        return PlainTextResponse(metrics.node_exposition() + generate_latest().decode(),
                                 media_type=CONTENT_TYPE_LATEST)

    # ---- feeds --------------------------------------------------------------------------------------------------------
    @api.post("/v1/feeds", status_code=201)
    def create_feed(self, body: FeedCreate, caller: Caller = Depends(admin_key)):
        from actors.feeds import add_feed

        _require_named_source(caller, body.id, "give the feed an id among them")
        schemes = list(self.settings.feed_schemes) + (["file"] if self.settings.file_roots else [])
        try:
            record = add_feed(self.redis, body.url, body.name, body.fps, body.max_pixels, feed_id=body.id,
                              schemes=schemes, file_roots=list(self.settings.file_roots), settings=self.settings)
        except ValueError as e:
            status = 409 if "already exists" in str(e) else 422
            raise HTTPException(status, str(e)) from None
        self._nudge_feeds()
        return _public_feed(record)

    @api.get("/v1/feeds")
    def list_feeds(self, caller: Caller = Depends(reader_key)):
        from actors.feeds import list_feeds

        return {"feeds": [_public_feed(f) for f in list_feeds(self.redis) if caller.may_see(f["id"])]}

    @api.get("/v1/feeds/{feed_id}")
    def get_feed(self, feed_id: str, caller: Caller = Depends(reader_key)):
        from actors.feeds import NAMESPACE, get_feed, reader_name

        require_sources(caller, [feed_id])
        try:
            record = get_feed(self.redis, feed_id)
        except KeyError:
            raise HTTPException(404, f"no feed with id {feed_id!r}") from None
        try:
            reader = ray.get_actor(reader_name(feed_id), namespace=NAMESPACE)
            status = ray.get(reader.status.remote(), timeout=STATUS_TIMEOUT_S)
            status = {"state": "running" if status.get("running") else "stopped", **status}
        except ValueError:               # no reader yet: the supervisor starts it on its next round
            status = {"state": "pending", "running": False, "connected": False}
        except Exception as e:  # noqa: BLE001 - a dead or stuck reader is a status, not a server error
            status = {"state": "unreachable", "running": False, "connected": False,
                      "error": f"{type(e).__name__}: {e}"[:500]}
        return {**_public_feed(record), "status": status}

    @api.delete("/v1/feeds/{feed_id}")
    def delete_feed(self, feed_id: str, caller: Caller = Depends(admin_key)):
        from actors.feeds import remove_feed

        require_sources(caller, [feed_id])
        try:
            record = remove_feed(self.redis, feed_id)
        except KeyError:
            raise HTTPException(404, f"no feed with id {feed_id!r}") from None
        self._nudge_feeds()
        return {"deleted": _public_feed(record)}

    def _nudge_feeds(self) -> None:
        if self.feed_service is not None:
            self.feed_service.reconcile_now.remote()

    # ---- jobs ---------------------------------------------------------------------------------------------------------
    @api.post("/v1/jobs", status_code=202)
    def create_job(self, body: JobCreate, caller: Caller = Depends(admin_key)):
        from deploy.jobs import submit_job

        _require_named_source(caller, body.source_id, "give the job a source_id among them")
        self.index.check_root()                     # 503 now rather than a job that can only fail
        try:
            record, ref = submit_job(self.settings.redis_url, self.settings, body.paths, body.source_id)
        except ValueError as e:
            raise HTTPException(422, str(e)) from None
        self.job_refs[record["id"]] = ref
        return record

    @api.get("/v1/jobs/{job_id}")
    def get_job(self, job_id: str, _caller: Caller = Depends(admin_key)):
        from deploy.jobs import ACTIVE_STATES, get_job, mark_lost

        job = self._job(job_id, get_job)
        ref = self.job_refs.get(job_id)
        if job["state"] in ACTIVE_STATES and ref is not None and ray.wait([ref], timeout=0)[0]:
            try:
                ray.get(ref)
            except Exception as e:  # noqa: BLE001 - the task died before writing its final state
                mark_lost(self.redis, job_id, f"job task died: {type(e).__name__}: {e}"[:2000])
            job = self._job(job_id, get_job)
        return job

    @api.delete("/v1/jobs/{job_id}", status_code=202)
    def cancel_job(self, job_id: str, _caller: Caller = Depends(admin_key)):
        from deploy.jobs import request_cancel

        try:
            return request_cancel(self.redis, job_id)
        except KeyError:
            raise HTTPException(404, f"no job with id {job_id!r}") from None
        except ValueError as e:
            raise HTTPException(409, str(e)) from None

    def _job(self, job_id: str, get_job) -> dict:
        try:
            return get_job(self.redis, job_id)
        except KeyError:
            raise HTTPException(404, f"no job with id {job_id!r}") from None

    # ---- sources --------------------------------------------------------------------------------------------------------
    @api.get("/v1/sources")
    def list_sources(self, caller: Caller = Depends(reader_key)):
        return {"sources": [s for s in self.index.sources() if caller.may_see(s["source_id"])]}

    @api.get("/v1/sources/{source_id:path}/segments")
    def list_segments(self, source_id: str, start: float | None = None, end: float | None = None,
                      caller: Caller = Depends(reader_key)):
        require_sources(caller, [source_id])
        if start is not None and end is not None and end < start:
            raise HTTPException(422, f"window end ({end}) must be >= start ({start})")
        if source_id not in {s["source_id"] for s in self.index.sources()}:
            raise HTTPException(404, f"no indexed source {source_id!r}")
        rows = self.index.list(source_id, start=start, end=end)
        return {"source_id": source_id, "segments": [{**r, "grid_thw": list(r["grid_thw"])} for r in rows]}

    # ---- search and ask -----------------------------------------------------------------------------------------------
    def _sources_for(self, caller: Caller, sources: list[str] | None) -> list[str]:
        if sources is None:                     # every source this key may see
            return visible(caller, [s["source_id"] for s in self.index.sources()])
        if not sources or not all(isinstance(s, str) and s for s in sources):
            raise HTTPException(422, "sources must be a non-empty list of source ids")
        require_sources(caller, sources)
        return list(dict.fromkeys(sources))

    @api.post("/v1/search")
    async def search(self, body: SearchRequest, caller: Caller = Depends(reader_key)):
        s = self.settings
        sources = await asyncio.to_thread(self._sources_for, caller, body.sources)    # index I/O off the loop
        _check_length("query", body.query, s.api_max_query_chars, "api_max_query_chars")
        _check_window(body.start, body.end, s)
        if body.limit > s.api_max_search_results:
            raise HTTPException(422, f"limit {body.limit} is over the maximum {s.api_max_search_results} "
                                     "(api_max_search_results)")
        if not sources:
            return {"results": []}
        try:
            out = await self.decoder.search.remote({"query": body.query, "sources": sources, "start": body.start,
                                                    "end": body.end, "limit": body.limit})
        except BackPressureError:
            return _overload_response()
        _decoder_error(out)
        return {"results": out["result"]}

    @api.post("/v1/ask")
    async def ask(self, body: AskRequest, caller: Caller = Depends(reader_key)):
        s = self.settings
        if body.source is not None and body.sources is not None:
            raise HTTPException(422, "give either source or sources, not both")
        if body.source is None and body.sources is None:
            raise HTTPException(422, "give the footage to ask about: source (one id) or sources (a list of ids)")
        sources = await asyncio.to_thread(self._sources_for, caller,
                                          [body.source] if body.source is not None else body.sources)
        _check_length("question", body.question, s.api_max_question_chars, "api_max_question_chars")
        _check_window(body.start, body.end, s)
        max_new = body.max_new_tokens
        if max_new is None:
            max_new = min(s.api_default_new_tokens, s.api_max_new_tokens)
        if max_new > s.api_max_new_tokens:
            raise HTTPException(422, f"max_new_tokens {max_new} is over the maximum {s.api_max_new_tokens} "
                                     "(api_max_new_tokens)")
        req = {"question": body.question, "sources": sources, "start": body.start, "end": body.end,
               "max_new_tokens": max_new}
        # Caught here, not by an exception handler: Serve installs its own handler for BackPressureError (a 503
        # without our message or Retry-After) over any the app registers.
        if not body.stream:
            try:
                out = await self.decoder.ask.remote(req)
            except BackPressureError:
                return _overload_response()
            _decoder_error(out)
            return out["result"]
        stream = self.decoder.options(stream=True).ask_stream.remote(req)
        try:
            first = await stream.__anext__()     # a full queue or a bad request fails here, as plain HTTP
        except BackPressureError:
            return _overload_response()
        _decoder_error(first)

        async def events():
            item = first
            while True:
                if "token" in item:
                    yield _sse("token", {"text": item["token"]})
                elif "error" in item:
                    yield _sse("error", item)
                    return
                else:
                    yield _sse("result", item["result"])
                    return
                try:
                    item = await stream.__anext__()
                except StopAsyncIteration:
                    return

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    # ---- service status (admin) ---------------------------------------------------------------------------------------
    @api.get("/v1/status")
    async def status(self, _caller: Caller = Depends(admin_key)):
        out: dict[str, Any] = {"index": await asyncio.to_thread(self.index.stats)}
        out["decoder"] = await self.decoder.stats.remote()
        if self.feed_service is not None:
            out.update(await self.feed_service.status.remote())
        return out


def _replica_tag() -> str:
    """A name for this replica's event outbox that a restarted replica reuses (Serve's rank is stable), so events
    parked while Redis was away are still delivered after a restart."""
    try:
        return f"rank-{serve.get_replica_context().rank.rank}"
    except Exception:  # noqa: BLE001 - outside Serve (a plain instance), or no rank in this Serve version
        return f"pid-{uuid.uuid4().hex[:8]}"


# ---- building and running the app ---------------------------------------------------------------------------------------
def _gpus() -> float:
    return float(ray.cluster_resources().get("GPU", 0)) if ray.is_initialized() else 0.0


def build_app(settings: Settings, *, model_path: str | None = None, feeds: bool = True, live: bool = True):
    """The Serve application: ApiIngress bound to DecoderServer and (feeds=True) FeedService.

    settings.redis_url must name the running Redis (the embedded one's URL once started) and settings.api_keys
    must hold at least one key. model_path defaults to the configured checkpoint (the tiny model is written
    when none is configured). live=False leaves out the LiveIndexer (feeds are read but not indexed)."""
    if not settings.redis_url:
        raise ValueError("build_app needs settings.redis_url: start Redis first (pipeline.redis_server) "
                         "and pass its URL")
    Authorizer(settings.api_keys)              # ValueError now, not in a replica, when no key is configured
    # the one place the service makes its index: replicas, jobs and the live indexer open it with create=False, so
    # an index volume that goes away later is reported (503, /healthz degraded), never silently started afresh
    from pipeline.index import SegmentIndex

    SegmentIndex(settings.index_root)
    if model_path is None:
        from deploy.runtime import ensure_model

        model_path = str(ensure_model(settings))
    decoder_opts: dict[str, Any] = dict(
        num_replicas=settings.decoder_replicas, max_ongoing_requests=settings.decoder_max_ongoing_requests,
        max_queued_requests=settings.decoder_max_queued_requests,
        ray_actor_options={"num_cpus": settings.decoder_cpus, **({"num_gpus": 1} if _gpus() >= 1 else {})})
    decoder = serve.deployment(DecoderServer).options(name=DECODER, **decoder_opts).bind(
        settings, str(model_path), settings.redis_url)
    feed_service = None
    if feeds:
        feed_service = serve.deployment(FeedService).options(
            name=FEEDS, num_replicas=1, max_ongoing_requests=16, ray_actor_options={"num_cpus": 0}).bind(
            settings, str(model_path), settings.redis_url, live)
    return serve.deployment(ApiIngress).options(
        name=API, num_replicas=1, max_ongoing_requests=256, ray_actor_options={"num_cpus": 0}).bind(
        settings, decoder, feed_service)


def app_from_env(args: dict | None = None):
    """Application builder for `serve deploy deploy/serve.yaml`: settings from the environment / TUBESCOPE_CONFIG.

    A cluster must name an external Redis (REDIS_URL) and API keys (TUBESCOPE_API_KEYS)."""
    from pipeline.settings import load_settings

    settings = load_settings(**(args or {}))
    return build_app(settings)


def run_app(settings: Settings, *, host: str | None = None, port: int | None = None, feeds: bool = True,
            live: bool = True, model_path: str | None = None, ready_timeout_s: float = 120.0,
            quiet: bool = False) -> str:
    """Start Serve's HTTP proxy on host:port, deploy the app at "/", wait until /healthz answers; returns the URL.

    Ray must be initialised (deploy.runtime.init_ray or a test fixture). quiet: Serve logs warnings only."""
    import httpx

    host = host or settings.host
    port = port or settings.port
    logging_config = {"log_level": "WARNING"} if quiet else None
    if quiet:
        logging.getLogger("ray.serve").setLevel(logging.WARNING)
    serve.start(http_options={"host": host, "port": port}, logging_config=logging_config)
    serve.run(build_app(settings, model_path=model_path, feeds=feeds, live=live), name=APP_NAME,
              route_prefix="/", blocking=False, logging_config=logging_config)
    url = f"http://{host}:{port}"
    deadline = time.monotonic() + ready_timeout_s
    last = ""
    while time.monotonic() < deadline:
        try:
            r = httpx.get(url + "/healthz", timeout=5.0)
            if r.status_code == 200:
                return url
            last = f"HTTP {r.status_code}: {r.text[:200]}"
        except httpx.HTTPError as e:
            last = f"{type(e).__name__}: {e}"
        time.sleep(0.25)
    raise TimeoutError(f"the tubescope app did not answer {url}/healthz within {ready_timeout_s:g} s ({last})")


def stop_app() -> None:
    """Shut Serve down (every deployment; FeedService stops its readers and the LiveIndexer first)."""
    serve.shutdown()


__all__ = ["APP_NAME", "AskRequest", "ApiIngress", "DecoderServer", "FeedCreate", "FeedService", "JobCreate",
           "SearchRequest", "api", "app_from_env", "build_app", "run_app", "stop_app"]
