"""LiveIndexer: pulls segments from every running FeedReader, encodes them in one packed batch, indexes and emits them.

Ray Data has no unbounded source, so the live path runs the archive path's stages (tubes, VisionEncoder packing,
SegmentIndex, events) in small rounds: whatever the readers have queued is taken at once, so several feeds share one
encoder call, and a segment is indexed within about one round of its last frame.

One round asks every reader at once and waits for all of them together, up to ROUND_DEADLINE_S. A reader that is
slow, stuck or not scheduled yet keeps its one pull outstanding and gets no new one; its reply is taken whenever it
comes, in a later round, so neither its segments nor the other feeds' latency are lost to it. The feed list is the
last one read from Redis: a Redis outage, or a Redis that lost its data, changes nothing here (docs/architecture.md,
"Live indexing").
"""
from __future__ import annotations

import logging
import threading

import ray
import redis as redis_lib

from pipeline.live import LiveIndexing
from pipeline.records import Segment
from pipeline.redis_server import as_client

log = logging.getLogger(__name__)

PULL_TIMEOUT_S = 0.25          # how long a reader holds a pull while it has nothing queued
ROUND_DEADLINE_S = 1.0         # how long a round waits for this round's replies
MAX_SEGMENTS_PER_FEED = 8      # per pull; the rest stays in the reader's bounded queue
LIVE_INDEXER_CPUS = 0.5        # the live encoder's claim (deploy/capacity.py counts it)


@ray.remote(num_cpus=LIVE_INDEXER_CPUS, max_concurrency=4)
class LiveIndexer:
    """One per service. `start()` runs the pull/encode/index loop in a thread; `stop()` ends it."""

    def __init__(self, settings, model_path: str, redis_url: str, namespace: str = "tubescope"):
        from actors.encoder import VisionEncoder
        from pipeline.events import EventSink
        from pipeline.index import SegmentIndex

        from pipeline import metrics

        metrics.configure(settings)
        self.settings = settings
        self.namespace = namespace
        self.redis = as_client(redis_url)
        self.events = EventSink(redis_url, settings.outbox_dir / "live", maxlen=settings.stream_maxlen,
                                outbox_max=settings.outbox_max_events)
        encoder = VisionEncoder(str(model_path), token_budget=settings.encoder_token_budget,
                                dtype=settings.encoder_dtype, pipeline="live", long_pixels=settings.long_pixels)
        self.core = LiveIndexing(encoder, SegmentIndex(settings.index_root, create=False), self.events,
                                 max_held_per_feed=settings.feed_queue_segments)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._feeds: list[str] = []                 # the last registry read from Redis (feed ids)
        self._handles: dict[str, object] = {}       # feed id -> its reader actor
        self._pulls: dict[ray.ObjectRef, str] = {}  # outstanding pulls, at most one per feed
        self.rounds = 0
        self.last_error = ""
        self.registry_error = ""

    def start(self) -> bool:
        if self._thread is None or not self._thread.is_alive():
            self._stop.clear()
            self._thread = threading.Thread(target=self._loop, name="live-indexer", daemon=True)
            self._thread.start()
        return True

    def stop(self) -> bool:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        self.events.close()
        return True

    def status(self) -> dict:
        return {"running": bool(self._thread and self._thread.is_alive()), "rounds": self.rounds,
                "segments": self.core.segments, "errors": self.core.errors, **self.core.status(),
                "last_error": self.last_error, "registry_error": self.registry_error,
                "pending_pulls": sorted(self._pulls.values()), "events": self.events.stats(),
                "last_latency_s": self.core.last_latency_s, "encoder_batches": self.core.encoder.stats.batches,
                "encoder_fill": self.core.encoder.stats.mean_fill}

    # ---- loop -------------------------------------------------------------------------------------------------------
    def _registry(self) -> list[str]:
        """Feed ids to pull from: Redis's registry, or the last one known while Redis is away or has lost it."""
        from pipeline.feeds import read_registry, registry_lost

        try:
            version, feeds = read_registry(self.redis)
        except redis_lib.RedisError as e:
            self.registry_error = f"Redis unavailable, using the last known feeds: {type(e).__name__}: {e}"
            return self._feeds
        if registry_lost(version, feeds) and self._feeds:     # the supervisor restores it from the durable copy
            self.registry_error = "Redis holds no feed registry, using the last known feeds"
            return self._feeds
        self._feeds, self.registry_error = [f["id"] for f in feeds], ""
        return self._feeds

    def _handle(self, feed_id: str):
        from actors.feeds import reader_name

        if feed_id not in self._handles:
            try:
                self._handles[feed_id] = ray.get_actor(reader_name(feed_id), namespace=self.namespace)
            except ValueError:            # not started yet (the supervisor starts it) or just removed
                return None
        return self._handles[feed_id]

    def _pull(self) -> list[Segment]:
        waiting = set(self._pulls.values())
        fresh = []
        for feed_id in self._registry():
            handle = None if feed_id in waiting else self._handle(feed_id)
            if handle is not None:
                ref = handle.next_segments.remote(MAX_SEGMENTS_PER_FEED, PULL_TIMEOUT_S)
                self._pulls[ref] = feed_id
                fresh.append(ref)
        ready = []
        if fresh:                         # this round's pulls, all together
            ready, _ = ray.wait(fresh, num_returns=len(fresh), timeout=ROUND_DEADLINE_S)
        fresh_set = set(fresh)
        older = [ref for ref in self._pulls if ref not in fresh_set]
        if older:                         # replies of earlier rounds that came since: taken, never dropped
            ready += ray.wait(older, num_returns=len(older), timeout=0)[0]
        segments: list[Segment] = []
        for ref in ready:
            feed_id = self._pulls.pop(ref)
            try:
                segments.extend(ray.get(ref))
            except Exception as e:  # noqa: BLE001 - a dead reader: look its name up again next round
                self._handles.pop(feed_id, None)
                self.last_error = f"feed {feed_id}: {type(e).__name__}: {e}"[:500]
        return segments

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                segments = self._pull()
                if segments or self.core.held_count:
                    self.core.process(segments)
                if not segments:
                    self._stop.wait(PULL_TIMEOUT_S)
            except Exception as e:  # noqa: BLE001 - keep the service alive; the error is visible in status()
                self.last_error = f"{type(e).__name__}: {e}"
                log.exception("live indexing round failed")
                self._stop.wait(1.0)
            self.rounds += 1
