"""tubescope on Ray Serve: the REST API ingress and the two deployments behind it, and how to build and run them.

    ApiIngress   (the FastAPI app of deploy.api; OpenAPI at /docs)  -- auth, limits, feeds, jobs, sources
       |-- DecoderServer  (deploy/decoder_server.py: one Decoder, one model load, per replica; search and ask)
       `-- FeedService    (FeedSupervisor.run in a thread + the live encoder pool: feeds resume after a restart)

`build_app(settings)` returns the bound Serve application; `run_app` starts it on a local Ray and waits until
/healthz answers; `stop_app` shuts Serve down. deploy/serve.yaml names `deploy.app:app_from_env` for clusters.
Errors are JSON {"error": message}. Overload of the decoder is a 503 with Retry-After (Serve's max_queued_requests).
"""
import logging
import threading
import time
from typing import Any

import ray
from ray import serve

from deploy.api.deps import ServiceContext
from deploy.api.main import create_api
from deploy.auth import Authorizer
from deploy.decoder_server import DecoderServer
from deploy.http_deadlines import proxy_env
from pipeline.settings import Settings

log = logging.getLogger(__name__)

APP_NAME = "tubescope"
API, DECODER, FEEDS, RETENTION, CAPTIONS, ALERTS = "Api", "Decoder", "Feeds", "Retention", "Captions", "Alerts"   # deployment names (serve.yaml overrides them by name)
STATUS_TIMEOUT_S = 5.0


# ---- deployments -----------------------------------------------------------------------------------------------------
class FeedService:
    """Runs FeedSupervisor.run in a thread (registry -> running FeedReaders) and, optionally, the LiveIndexer actors
    (actors/live.py LiveEncoderPool), as many as the feeds need.

    It is a Serve deployment of one replica, so a restarted or redeployed app resumes every registered feed."""

    def __init__(self, settings: Settings, model_path: str, redis_url: str, live: bool = True):
        from actors.feeds import NAMESPACE, FeedSupervisor

        self.supervisor = FeedSupervisor(redis_url, settings)
        self.live = None
        self._stop, self._wake = threading.Event(), threading.Event()
        if live:
            from actors.live import LiveEncoderPool

            self.live = LiveEncoderPool(settings, model_path, redis_url, NAMESPACE)
            threading.Thread(target=self._scale_live, args=(settings.feed_reconcile_seconds,), name="live-scale",
                             daemon=True).start()
        self._thread = threading.Thread(target=self.supervisor.run, args=(settings.feed_reconcile_seconds,),
                                        name="feed-supervisor", daemon=True)
        self._thread.start()

    def _scale_live(self, interval_s: float) -> None:
        """The live encoders follow the feeds that have a reader, in a thread of their own: starting or draining
        an actor takes seconds that the readers' reconcile should not wait for."""
        while not self._stop.is_set():
            try:
                self.live.scale(len(self.supervisor.readers()))
            except Exception:  # noqa: BLE001 - Ray hiccup: the pool keeps its size, the next round retries
                log.exception("live encoder scaling failed")
            self._wake.wait(interval_s)
            self._wake.clear()

    def reconcile_now(self) -> bool:
        """Start the supervisor's next round now (a feed was added or removed) instead of after its interval."""
        self.supervisor.wake()
        self._wake.set()
        return True

    def status(self) -> dict:
        feeds = self.supervisor.statuses(STATUS_TIMEOUT_S)
        live = None if self.live is None else self.live.status(STATUS_TIMEOUT_S)
        return {"feeds": feeds, "live_indexer": live}

    def __del__(self):
        thread = getattr(self, "_thread", None)
        if thread is None:
            return
        self.supervisor.stop()
        thread.join(timeout=10)
        self.supervisor.stop_all()
        self._stop.set()
        self._wake.set()
        if self.live is not None:
            self.live.stop()


class RetentionService:
    """Applies the retention settings on their own schedule (pipeline.retention), with or without feeds. One replica,
    so one sweep at a time whatever the number of API replicas."""

    def __init__(self, settings: Settings):
        from pipeline.index import SegmentIndex
        from pipeline.retention import RetentionSchedule

        self.schedule = RetentionSchedule(SegmentIndex(settings.index_root, create=False), settings).start()

    def status(self) -> dict:
        return self.schedule.status()

    def __del__(self):
        schedule = getattr(self, "schedule", None)
        if schedule is not None:
            schedule.stop()


class CaptionService:
    """Captions every indexed segment, archive and live alike, by following the index (pipeline.captioning) with a
    pool of caption actors. One replica: one writer of the retrieval index. Setup (loading the actors, opening or
    rebuilding the retrieval index) runs in the follower's thread, so the app starts without waiting for it."""

    def __init__(self, settings: Settings, model_path: str, redis_url: str):
        from pipeline.events import EventSink

        self.settings, self.model_path = settings, model_path
        self.events = EventSink(redis_url, settings.outbox_dir / "captions", maxlen=settings.stream_maxlen,
                                outbox_max=settings.outbox_max_events)
        self.follower = None
        self.state, self.error = "starting", ""
        self._stop = threading.Event()
        threading.Thread(target=self._start, name="captions-setup", daemon=True).start()

    def _start(self) -> None:
        from actors.captioner import CaptionPool
        from pipeline.captioning import caption_follower
        from pipeline.index import SegmentIndex

        s = self.settings
        while not self._stop.is_set():
            try:
                index = SegmentIndex(s.index_root, create=False)
                pool = CaptionPool(s, self.model_path)
                self.state = "rebuilding"
                self.follower = caption_follower(s, index, pool, self.events,
                                                 on_unavailable=lambda e: self._rebuild(self.follower))
                self.follower.start()
                self.state, self.error = "running", ""
                return
            except Exception as e:  # noqa: BLE001 - e.g. the index volume is not mounted yet: retry
                self.state, self.error = "waiting", f"{type(e).__name__}: {e}"
                logging.getLogger(__name__).exception("caption service setup failed; retrying")
                self._stop.wait(max(5.0, s.caption_poll_seconds))

    def _rebuild(self, follower) -> None:
        """The retrieval index went missing or corrupt under the follower: rebuild it from the footage index."""
        from pipeline.captioning import rebuild_retrieval
        from pipeline.retrieval import RetrievalUnavailable

        retrieval = follower.writer.retrieval
        try:
            retrieval.count()
            return
        except RetrievalUnavailable:
            pass
        self.state = "rebuilding"
        rebuild_retrieval(follower.store, retrieval, follower.pool.model_id, dim=follower.pool.dim,
                          token_model_id=follower.pool.token_model_id)
        self.state = "running"

    def status(self) -> dict:
        out = {"state": self.state, "error": self.error}
        if self.follower is not None:
            out.update(self.follower.status())
        return out

    def __del__(self):
        stop = getattr(self, "_stop", None)
        if stop is not None:
            stop.set()
        follower = getattr(self, "follower", None)
        if follower is not None:
            follower.stop()


class AlertService:
    """Scores every new live segment against the standing alerts (deploy.alert_follower) through the Decoder
    deployment's handle: the decoder's model does the work, so alerts cost no second model in memory. One replica:
    one follower of the segments stream, one claimant of hits."""

    def __init__(self, settings: Settings, model_path: str, redis_url: str, decoder):
        from deploy.alert_follower import alert_follower, decoder_scorer
        from pipeline.events import EventSink
        from pipeline.redis_server import as_client

        self.events = EventSink(redis_url, settings.outbox_dir / "alerts", maxlen=settings.stream_maxlen,
                                outbox_max=settings.outbox_max_events)
        self.follower = alert_follower(settings, as_client(redis_url), decoder_scorer(decoder), self.events,
                                       model_path).start()

    def status(self) -> dict:
        return self.follower.status()

    def __del__(self):
        follower = getattr(self, "follower", None)
        if follower is not None:
            follower.stop()
            self.events.close()


# No app passed to serve.ingress: Serve calls __serve_build_asgi_app__ in the replica after __init__, so the app and
# the context its routes reach through app.state are this replica's own objects, not a pickled copy.
@serve.ingress()
class ApiIngress:
    """The REST API; it also owns the runners of the jobs it starts, and the reconciler that resumes (at start, then
    every job_reconcile_seconds) the jobs whose runner died with an earlier service."""

    def __init__(self, settings: Settings, decoder, feed_service=None, retention=None, captions=None,
                 model_path: str | None = None, alerts=None):
        from deploy.job_runner import JobReconciler

        self.context = ServiceContext.create(settings, decoder, feed_service, retention, captions, model_path)
        self.context.alerts = alerts
        self.reconciler = JobReconciler(settings, self.context.job_runners).start()

    def __serve_build_asgi_app__(self):
        return create_api(self.context)

    def __del__(self):
        reconciler = getattr(self, "reconciler", None)
        if reconciler is not None:
            reconciler.stop()


# ---- building and running the app ------------------------------------------------------------------------------------
def _gpus() -> float:
    return float(ray.cluster_resources().get("GPU", 0)) if ray.is_initialized() else 0.0


def decoder_actor_options(settings: Settings, cluster_gpus: float) -> dict[str, Any]:
    """A decoder replica's reservation: decoder_gpus GPUs (its layers split over them) when the cluster has GPUs."""
    return {"num_cpus": settings.decoder_cpus, **({"num_gpus": settings.decoder_gpus} if cluster_gpus >= 1 else {})}


def build_app(settings: Settings, *, model_path: str | None = None, feeds: bool = True, live: bool = True):
    """The Serve application: ApiIngress bound to DecoderServer, RetentionService, (feeds=True) FeedService and
    (settings.captions) CaptionService.

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
        ray_actor_options=decoder_actor_options(settings, _gpus()))
    decoder = serve.deployment(DecoderServer).options(name=DECODER, **decoder_opts).bind(
        settings, str(model_path), settings.redis_url)
    feed_service = None
    if feeds:
        feed_service = serve.deployment(FeedService).options(
            name=FEEDS, num_replicas=1, max_ongoing_requests=16, ray_actor_options={"num_cpus": 0}).bind(
            settings, str(model_path), settings.redis_url, live)
    retention = serve.deployment(RetentionService).options(
        name=RETENTION, num_replicas=1, ray_actor_options={"num_cpus": 0}).bind(settings)
    captions = None
    if settings.captions:
        captions = serve.deployment(CaptionService).options(
            name=CAPTIONS, num_replicas=1, ray_actor_options={"num_cpus": 0}).bind(
            settings, str(model_path), settings.redis_url)
    alerts = None
    if settings.alerts and feeds and live:          # alerts score live segments: none come without the live indexer
        alerts = serve.deployment(AlertService).options(
            name=ALERTS, num_replicas=1, ray_actor_options={"num_cpus": 0}).bind(
            settings, str(model_path), settings.redis_url, decoder)
    return serve.deployment(ApiIngress).options(
        name=API, num_replicas=1, max_ongoing_requests=256, ray_actor_options={"num_cpus": 0}).bind(
        settings, decoder, feed_service, retention, captions, str(model_path), alerts)


def app_from_env(args: dict | None = None):
    """Application builder for `serve deploy deploy/serve.yaml`: settings from the environment / TUBESCOPE_CONFIG.

    A cluster must name an external Redis (REDIS_URL) and API keys (TUBESCOPE_API_KEYS)."""
    from pipeline.settings import load_settings

    settings = load_settings(**(args or {}))
    return build_app(settings)


def http_options(settings: Settings, host: str, port: int) -> dict:
    """Serve's HTTP proxy options. The request-head deadline is not among them: see controller_options."""
    return {"host": host, "port": port, "keep_alive_timeout_s": settings.api_keep_alive_seconds,
            "request_timeout_s": settings.api_request_timeout_seconds}


def controller_options(settings: Settings) -> dict:
    """The Serve controller's runtime_env, which the proxies it starts inherit: it makes each proxy install the
    request-head deadline (api_header_timeout_seconds, deploy/http_deadlines.py) before its uvicorn starts."""
    return {"runtime_env": {"env_vars": proxy_env(settings.api_header_timeout_seconds)}}


def run_app(settings: Settings, *, host: str | None = None, port: int | None = None, feeds: bool = True,
            live: bool = True, model_path: str | None = None, ready_timeout_s: float = 120.0,
            quiet: bool = False) -> str:
    """Start Serve's HTTP proxy on host:port, deploy the app at "/", wait until /healthz answers; returns the URL.

    Ray must be initialised (deploy.runtime.init_ray or a test fixture). quiet: Serve logs warnings only."""
    import httpx

    host = host or settings.host
    port = port or settings.port
    # the deployments' settings name where the API really listens: its port is one feeds may never point at
    settings = settings.model_copy(update={"host": host, "port": port})
    logging_config = {"log_level": "WARNING"} if quiet else None
    if quiet:
        logging.getLogger("ray.serve").setLevel(logging.WARNING)
    serve.start(http_options=http_options(settings, host, port), controller_options=controller_options(settings),
                logging_config=logging_config)
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


__all__ = ["ALERTS", "API", "APP_NAME", "AlertService", "ApiIngress", "CAPTIONS", "CaptionService", "DECODER", "DecoderServer", "FEEDS", "FeedService", "RETENTION",
           "RetentionService", "app_from_env", "build_app", "run_app", "stop_app"]
