"""Live feeds on Ray: one FeedReader actor per feed of the registry (pipeline/feeds.py), and the FeedSupervisor.

FeedReader: a threaded Ray actor (small CPU claim, so several fit on 2 CPUs beside Ray Data tasks) around one
StreamSampler (pipeline/video/stream.py). Its reading thread never blocks a call: the live indexer pulls
segments with next_segments() while status() stays answerable.

FeedSupervisor: a plain class, not an actor. The process that serves the app owns it and runs run() in a
thread (wake() starts the next round at once); readers() hands the reader handles to the live indexer in the
same process. Readers are named actors ("tubescope-feed-<id>" in namespace "tubescope"), so a new supervisor
adopts readers that are still alive, and starts the others: after a service restart every registered feed resumes.
With detached=True the readers outlive the supervisor's process (a Ray cluster that keeps running); by default
they die with it, and the next supervisor starts them afresh.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayActorError

from pipeline import metrics
from pipeline.feeds import sampler_config
from pipeline.recordings import recorder_for
from pipeline.records import Segment
from pipeline.redis_server import as_client
from pipeline.registry_copy import RegistryCopy, RegistryUnknown
from pipeline.settings import Settings, load_settings
from pipeline.video.protocols import redact_url
from pipeline.video.stream import StreamSampler

log = logging.getLogger(__name__)

READER_NAME_PREFIX = "tubescope-feed-"
NAMESPACE = "tubescope"
READER_CPUS = 0.25                  # a reader decodes one stream; 2 CPUs hold several beside Ray Data tasks
READER_CONCURRENCY = 4              # threaded actor: pulls and status calls never wait for the reading thread
METRICS_INTERVAL_S = 1.0            # how often a reader exports its feed's status as metrics


# ---------------------------------------------------------------- the reader actor

class _FeedReader:
    """One feed: start(), stop(), status(), next_segments(). Wrapped by ray.remote as FeedReader below.

    Reading starts in the constructor (autostart), so a status() call can never overtake start() on the
    threaded actor and see a reader that merely has not started yet.
    """

    def __init__(self, feed: dict, settings: Settings | None = None, sampler_options: dict | None = None,
                 events_redis_url: str | None = None, autostart: bool = True):
        self.feed = dict(feed)
        settings = settings or load_settings()
        metrics.configure(settings)
        self.sampler = StreamSampler(sampler_config(self.feed, settings, **(sampler_options or {})),
                                     on_event=self._on_event, recorder=recorder_for(self.feed, settings))
        self.sink = None
        if events_redis_url:                         # feed failures go to tubescope:errors
            from pipeline.events import EventSink
            self.sink = EventSink(events_redis_url, settings.outbox_dir / "feeds" / self.feed["id"],
                                  maxlen=settings.stream_maxlen)
        self._metrics_stop = threading.Event()
        self._metrics_thread: threading.Thread | None = None
        if autostart:
            self.start()

    def start(self) -> dict:
        self.sampler.start()
        if self._metrics_thread is None or not self._metrics_thread.is_alive():
            self._metrics_stop.clear()
            self._metrics_thread = threading.Thread(target=self._report_metrics, daemon=True,
                                                    name=f"feed-metrics-{self.feed['id']}")
            self._metrics_thread.start()
        return self.status()

    def stop(self, timeout_s: float = 15.0) -> bool:
        stopped = self.sampler.stop(timeout_s)
        self._metrics_stop.set()
        if self._metrics_thread is not None:
            self._metrics_thread.join(timeout=5.0)
        metrics.record_feed_stopped(self.feed["id"])
        if self.sink is not None:
            self.sink.close()
        return stopped

    def _report_metrics(self) -> None:
        """Export the sampler's status every METRICS_INTERVAL_S (lag keeps growing while no frame comes)."""
        while True:
            try:
                metrics.record_feed_status(self.feed["id"], self.sampler.status())
            except Exception:                          # never let metrics end the reader
                log.exception("feed %s: exporting metrics failed", self.feed["id"])
            if self._metrics_stop.wait(METRICS_INTERVAL_S):
                return

    def status(self) -> dict:
        return {**self.sampler.status(), "feed_id": self.feed["id"], "name": self.feed.get("name"),
                "pid": os.getpid()}

    def next_segments(self, max_n: int = 8, timeout_s: float = 1.0) -> list[Segment]:
        return self.sampler.next_segments(max_n, timeout_s)

    def get_feed(self) -> dict:
        return self.feed

    def _on_event(self, kind: str, fields: dict) -> None:
        if self.sink is None or kind not in ("disconnected", "open_failed"):
            return
        error = fields.get("reason") or fields.get("error")
        from pipeline.events import ERRORS_STREAM
        self.sink.emit(ERRORS_STREAM, {"kind": f"feed_{kind}", "source_id": self.feed["id"],
                                       "url": redact_url(self.feed["url"]), "error": error, "time": time.time()})


FeedReader = ray.remote(num_cpus=READER_CPUS, max_concurrency=READER_CONCURRENCY)(_FeedReader)


def reader_name(feed_id: str) -> str:
    return READER_NAME_PREFIX + feed_id


# ---------------------------------------------------------------- the supervisor

class FeedSupervisor:
    """Keeps one running FeedReader per registered feed: reconcile() starts new ones, stops removed ones and
    restarts dead or stuck ones; run() repeats it. Each round of run() holds `lock`, and statuses() and stop_all()
    take it too, so other threads may call them while run() goes; call reconcile() itself from one thread at a time.
    """

    def __init__(self, redis: Any, settings: Settings | None = None, *, namespace: str = NAMESPACE,
                 detached: bool = False, reader_cpus: float = READER_CPUS, sampler_options: dict | None = None,
                 call_timeout_s: float = 10.0, max_unresponsive: int = 3, events: bool = True):
        self.redis = as_client(redis)
        self.settings = settings or load_settings()
        self.namespace, self.detached = namespace, detached
        self.reader_cpus = reader_cpus
        self.sampler_options = dict(sampler_options or {})
        self.call_timeout_s, self.max_unresponsive = call_timeout_s, max_unresponsive
        url = redis if isinstance(redis, str) else self.settings.redis_url
        self.events_redis_url = url if events else None
        self.registry_copy = RegistryCopy(self.settings.index_root)   # restores a registry Redis lost
        self._readers: dict[str, Any] = {}
        self._feeds: dict[str, dict] = {}
        self._unresponsive: dict[str, int] = {}
        self.restarts: dict[str, int] = {}
        self.lock = threading.RLock()
        self._stop = threading.Event()
        self._wake = threading.Event()

    # ---- reconcile ------------------------------------------------------------------------------------------
    def reconcile(self) -> dict[str, list[str]]:
        """Make the running readers equal to the registry (restored from its durable copy first when Redis lost it);
        returns the feed ids started/adopted/stopped/restarted."""
        try:
            listed = self.registry_copy.sync(self.redis)
        except RegistryUnknown:
            if self._readers:
                raise                                  # keep the readers: an unknown registry is not an empty one
            listed = []
        feeds = {f["id"]: f for f in listed}
        done: dict[str, list[str]] = {"started": [], "adopted": [], "stopped": [], "restarted": []}
        for fid in [f for f in self._readers if f not in feeds or feeds[f] != self._feeds[f]]:
            self._stop_reader(fid)
            done["stopped"].append(fid)
        for fid in self._unhealthy():
            self._stop_reader(fid)
            if self._start_reader(feeds[fid], fresh=True):
                self.restarts[fid] = self.restarts.get(fid, 0) + 1
                done["restarted"].append(fid)
        for fid, feed in feeds.items():
            if fid not in self._readers:
                how = self._start_reader(feed)
                if how:
                    done[how].append(fid)
        if any(done.values()):
            log.info("feeds reconciled: %s", {k: v for k, v in done.items() if v})
        return done

    def run(self, interval_s: float = 5.0) -> None:
        """reconcile() every interval_s, or at once after wake(), until stop(). A failed round is logged and the next
        one retries."""
        if not interval_s > 0:
            raise ValueError(f"interval_s must be > 0, got {interval_s}")
        while not self._stop.is_set():
            try:
                with self.lock:
                    self.reconcile()
            except Exception:                          # Redis down, Ray hiccup: keep the readers, try again later
                log.exception("feed reconcile failed; retrying in %s s", interval_s)
            self._wake.wait(interval_s)
            self._wake.clear()

    def wake(self) -> None:
        """Start run()'s next round now (a feed was added or removed) instead of after interval_s."""
        self._wake.set()

    def stop(self) -> None:
        """End run() without waiting out its interval; the readers keep running (stop_all() stops them too)."""
        self._stop.set()
        self._wake.set()

    def stop_all(self) -> None:
        """Stop run() and every reader this supervisor holds (service shutdown)."""
        self.stop()
        with self.lock:
            for fid in list(self._readers):
                self._stop_reader(fid)

    # ---- views ----------------------------------------------------------------------------------------------
    def readers(self) -> dict[str, Any]:
        """feed id -> FeedReader actor handle, for the live indexer to pull segments from."""
        return dict(self._readers)

    def statuses(self, timeout_s: float | None = None) -> dict[str, dict]:
        """feed id -> the reader's status (plus restarts), or {"error": ...} for a reader that did not answer."""
        with self.lock:
            refs = {fid: h.status.remote() for fid, h in self._readers.items()}
            ray.wait(list(refs.values()), num_returns=len(refs), timeout=timeout_s or self.call_timeout_s)
            out = {}
            for fid, ref in refs.items():
                try:
                    out[fid] = {**ray.get(ref, timeout=0), "restarts": self.restarts.get(fid, 0)}
                except (RayActorError, GetTimeoutError) as e:
                    out[fid] = {"feed_id": fid, "running": False, "error": f"{type(e).__name__}: {e}"[:500],
                                "restarts": self.restarts.get(fid, 0)}
            return out

    # ---- internals ------------------------------------------------------------------------------------------
    def _unhealthy(self) -> list[str]:
        """Readers whose actor died, whose reading thread ended, or that missed max_unresponsive status calls."""
        refs = {fid: h.status.remote() for fid, h in self._readers.items()}
        if not refs:
            return []
        ray.wait(list(refs.values()), num_returns=len(refs), timeout=self.call_timeout_s)
        bad = []
        for fid, ref in refs.items():
            try:
                st = ray.get(ref, timeout=0)
            except RayActorError:
                log.warning("feed %s: reader actor died; restarting it", fid)
                bad.append(fid)
                continue
            except GetTimeoutError:
                self._unresponsive[fid] = self._unresponsive.get(fid, 0) + 1
                if self._unresponsive[fid] >= self.max_unresponsive:
                    log.warning("feed %s: reader missed %d status calls; restarting it", fid, self._unresponsive[fid])
                    bad.append(fid)
                continue
            self._unresponsive[fid] = 0
            if not st["running"]:
                log.warning("feed %s: reader thread ended (%s); restarting it", fid, st.get("last_error_detail"))
                bad.append(fid)
        return bad

    def _start_reader(self, feed: dict, fresh: bool = False) -> str | None:
        """Create this feed's reader, or adopt its live named actor: "started", "adopted" or None (not now)."""
        fid = feed["id"]
        handle, adopted = None, False
        if not fresh:
            try:
                handle = ray.get_actor(reader_name(fid), namespace=self.namespace)
                if ray.get(handle.get_feed.remote(), timeout=self.call_timeout_s) != feed:
                    self._kill(handle)                 # same id, different registration: replace it
                    handle = None
                else:
                    adopted = True
            except ValueError:                         # no actor by that name
                handle = None
            except (RayActorError, GetTimeoutError):
                self._kill(handle)
                handle = None
        if handle is None:
            options = dict(name=reader_name(fid), namespace=self.namespace, num_cpus=self.reader_cpus,
                           max_concurrency=READER_CONCURRENCY, scheduling_strategy="SPREAD")
            if self.detached:
                options["lifetime"] = "detached"
            try:
                handle = FeedReader.options(**options).remote(feed, self.settings, self.sampler_options,
                                                              self.events_redis_url)
            except ValueError as e:                    # the name of a just-killed actor is not free yet
                log.warning("feed %s: cannot create its reader yet (%s); next reconcile retries", fid, e)
                return None
        self._readers[fid], self._feeds[fid] = handle, feed
        self._unresponsive[fid] = 0
        return "adopted" if adopted else "started"

    def _stop_reader(self, fid: str) -> None:
        handle = self._readers.pop(fid, None)
        self._feeds.pop(fid, None)
        self._unresponsive.pop(fid, None)
        if handle is None:
            return
        try:
            ray.get(handle.stop.remote(5.0), timeout=self.call_timeout_s)
        except Exception:                              # already dead or stuck: the kill below settles it
            pass
        self._kill(handle)

    def _kill(self, handle) -> None:
        """Kill an actor and wait until Ray has released its name (so it can be created again)."""
        if handle is None:
            return
        try:
            ray.kill(handle, no_restart=True)
        except Exception:
            return
        deadline = time.monotonic() + self.call_timeout_s
        while time.monotonic() < deadline:
            try:
                ray.get(handle.get_feed.remote(), timeout=1.0)
            except RayActorError:
                return
            except GetTimeoutError:
                pass
            time.sleep(0.05)


__all__ = ["FeedReader", "FeedSupervisor", "NAMESPACE", "READER_CPUS", "reader_name"]
