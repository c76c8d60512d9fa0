"""LiveIndexer: pulls segments from every running FeedReader, encodes them in one packed batch, indexes and emits them.

Ray Data has no unbounded source, so the live path runs the archive path's stages (tubes, VisionEncoder packing,
SegmentIndex, events) in small rounds: whatever the readers have queued is taken at once, so several feeds share one
encoder call, and a segment is indexed within about one round of its last frame.
"""
from __future__ import annotations

import logging
import threading

import ray

from pipeline.live import LiveIndexing
from pipeline.records import Segment
from pipeline.redis_server import as_client

log = logging.getLogger(__name__)

PULL_TIMEOUT_S = 0.25          # how long one round waits for readers that have nothing queued
MAX_SEGMENTS_PER_FEED = 8      # per round; the rest stays in the reader's bounded queue
LIVE_INDEXER_CPUS = 0.5        # the live encoder's claim (deploy/capacity.py counts it)


@ray.remote(num_cpus=LIVE_INDEXER_CPUS, max_concurrency=4)
class LiveIndexer:
    """One per service. `start()` runs the pull/encode/index loop in a thread; `stop()` ends it."""

    def __init__(self, settings, model_path: str, redis_url: str, namespace: str = "tubescope"):
        from actors.encoder import VisionEncoder
        from pipeline.events import EventSink
        from pipeline.index import SegmentIndex

        self.settings = settings
        self.namespace = namespace
        self.redis = as_client(redis_url)
        self.events = EventSink(redis_url, settings.outbox_dir / "live", maxlen=settings.stream_maxlen,
                                outbox_max=settings.outbox_max_events)
        encoder = VisionEncoder(str(model_path), token_budget=settings.encoder_token_budget,
                                dtype=settings.encoder_dtype, pipeline="live")
        self.core = LiveIndexing(encoder, SegmentIndex(settings.index_root, create=False), self.events)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.rounds = 0
        self.last_error = ""

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
                "segments": self.core.segments, "errors": self.core.errors,
                "last_error": self.last_error,
                "last_latency_s": self.core.last_latency_s, "encoder_batches": self.core.encoder.stats.batches,
                "encoder_fill": self.core.encoder.stats.mean_fill}

    # ---- loop -------------------------------------------------------------------------------------------------------
    def _readers(self) -> list:
        from actors.feeds import reader_name
        from pipeline.feeds import list_feeds

        handles = []
        for feed in list_feeds(self.redis):
            try:
                handles.append(ray.get_actor(reader_name(feed["id"]), namespace=self.namespace))
            except ValueError:            # not started yet (the supervisor starts it) or just removed
                continue
        return handles

    def _pull(self) -> list[Segment]:
        refs = [h.next_segments.remote(MAX_SEGMENTS_PER_FEED, PULL_TIMEOUT_S) for h in self._readers()]
        segments: list[Segment] = []
        for ref in refs:
            try:
                segments.extend(ray.get(ref, timeout=PULL_TIMEOUT_S + 10))
            except Exception as e:  # noqa: BLE001 - a dead or slow reader never stops the other feeds
                self.last_error = f"{type(e).__name__}: {e}"
        return segments

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                segments = self._pull()
                if segments:
                    self.core.process(segments)
                else:
                    self._stop.wait(PULL_TIMEOUT_S)
            except Exception as e:  # noqa: BLE001 - keep the service alive; the error is visible in status()
                self.last_error = f"{type(e).__name__}: {e}"
                log.exception("live indexing round failed")
                self._stop.wait(1.0)
            self.rounds += 1
