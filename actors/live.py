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
import time

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

    def __init__(self, settings, model_path: str, redis_url: str, namespace: str = "tubescope",
                 shard: tuple[int, int] = (0, 1)):
        """shard: (index, count): this actor pulls the feeds pipeline.live.shard_feeds gives index of count."""
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
        self._shard = shard
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

    def set_shard(self, index: int, count: int) -> bool:
        """Pull the feeds of live encoder `index` of `count` from the next round on (the pool changed size)."""
        from pipeline.live import shard_feeds

        shard_feeds([], index, count)               # ValueError for a shard that does not exist
        self._shard = (index, count)
        return True

    def drain(self, timeout_s: float = 30.0) -> dict:
        """End the loop, then finish what this actor holds: the replies of its outstanding pulls are encoded and
        every held segment written, retried until `timeout_s`; what still waits then is counted lost (writes
        failing all that time). The actor is then stopped; returns its status."""
        from pipeline.live import RETRY_MAX_S

        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=timeout_s)
        deadline = time.monotonic() + timeout_s
        while (self._pulls or self.core.held_count) and time.monotonic() < deadline:
            segments = []
            if self._pulls:
                ready, _ = ray.wait(list(self._pulls), num_returns=len(self._pulls),
                                    timeout=max(0.0, min(ROUND_DEADLINE_S, deadline - time.monotonic())))
                segments = self._take(ready)
            self.core.process(segments)
            if self.core.held_count and not self._pulls:
                time.sleep(min(RETRY_MAX_S, max(0.0, deadline - time.monotonic()), 0.5))
        for ref in self._pulls:                     # a reader that never answered keeps those segments queued
            ray.cancel(ref)
        self._pulls.clear()
        self.core.give_up("live encoder removed while index writes fail")
        self.stop()
        return self.status()

    def status(self) -> dict:
        return {"running": bool(self._thread and self._thread.is_alive()), "rounds": self.rounds,
                "segments": self.core.segments, "errors": self.core.errors, **self.core.status(),
                "shard": list(self._shard), "last_error": self.last_error, "registry_error": self.registry_error,
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
        from pipeline.live import shard_feeds

        waiting = set(self._pulls.values())
        fresh = []
        for feed_id in shard_feeds(self._registry(), *self._shard):
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
        return self._take(ready)

    def _take(self, ready: list) -> list[Segment]:
        """The segments of answered pulls; a dead reader's handle is looked up again next round."""
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


def live_encoder_options(gpus_per_encoder: float, cluster_gpus: float) -> dict:
    """What one live encoder actor reserves: a GPU share (gpus_per_encoder) when the cluster has GPUs, as the
    archive encoders do (pipeline/archive.py), and its CPU claim."""
    return {"num_cpus": LIVE_INDEXER_CPUS, "num_gpus": float(gpus_per_encoder) if cluster_gpus >= 1 else 0.0}


class LiveEncoderPool:
    """The service's LiveIndexer actors: `scale(feeds)` keeps one per `feeds_per_live_encoder` registered feeds, as
    many as the cluster's free GPUs (or CPUs, without GPUs) allow, and at least one. Actors are added before the
    others hand feeds over and removed after the others took them, and a removed one drains (LiveIndexer.drain)
    before it ends, so resizing loses no segment (docs/architecture.md, "Live indexing")."""

    def __init__(self, settings, model_path: str, redis_url: str, namespace: str = "tubescope",
                 start_timeout_s: float = 300.0, drain_timeout_s: float = 30.0):
        self.settings, self.model_path, self.redis_url, self.namespace = settings, model_path, redis_url, namespace
        self.start_timeout_s, self.drain_timeout_s = start_timeout_s, drain_timeout_s
        self.options = live_encoder_options(settings.gpus_per_encoder, ray.cluster_resources().get("GPU", 0.0))
        self.actors: list = []
        self.last_error = ""
        self._lock = threading.Lock()

    def scale(self, feeds: int) -> int:
        """Resize the pool for `feeds` registered feeds; returns the number of actors."""
        from pipeline.live import live_encoder_count

        with self._lock:
            target = live_encoder_count(feeds, self.settings.feeds_per_live_encoder, self._most())
            if target > len(self.actors):
                self._grow(target)
            elif target < len(self.actors):
                self._shrink(target)
            return len(self.actors)

    def _most(self) -> int:
        """Actors the cluster holds: these plus what its free resources start (Ray's view at this moment)."""
        free = ray.available_resources()
        most = []
        for resource, key in (("num_gpus", "GPU"), ("num_cpus", "CPU")):
            if self.options[resource] > 0:
                most.append(len(self.actors) + int(free.get(key, 0.0) / self.options[resource] + 1e-9))
        return max(1, min(most)) if most else max(1, len(self.actors))

    def _grow(self, target: int) -> None:
        started = []
        for i in range(len(self.actors), target):
            actor = LiveIndexer.options(**self.options).remote(self.settings, self.model_path, self.redis_url,
                                                               self.namespace, (i, target))
            try:
                ray.get(actor.start.remote(), timeout=self.start_timeout_s)     # its tower is loaded
            except Exception as e:  # noqa: BLE001 - not schedulable or failed to load: fewer actors, said so
                self.last_error = f"live encoder {i} did not start: {type(e).__name__}: {e}"[:500]
                log.error("%s", self.last_error)
                ray.kill(actor, no_restart=True)
                break
            started.append(actor)
        self.actors += started
        self._reshard()

    def _shrink(self, target: int) -> None:
        leaving, self.actors = self.actors[target:], self.actors[:target]
        self._reshard()                             # the others pull the leavers' feeds before they drain
        for actor in leaving:
            try:
                ray.get(actor.drain.remote(self.drain_timeout_s), timeout=self.drain_timeout_s + 30)
            except Exception as e:  # noqa: BLE001 - a dead actor had nothing left to drain
                self.last_error = f"live encoder did not drain: {type(e).__name__}: {e}"[:500]
            ray.kill(actor, no_restart=True)

    def _reshard(self) -> None:
        count = len(self.actors)
        ray.get([a.set_shard.remote(i, count) for i, a in enumerate(self.actors)], timeout=60)

    def status(self, timeout_s: float = 5.0) -> dict:
        """The actors' statuses summed up, and each one's."""
        statuses = []
        for actor in list(self.actors):
            try:
                statuses.append(ray.get(actor.status.remote(), timeout=timeout_s))
            except Exception as e:  # noqa: BLE001 - reported, not raised
                statuses.append({"running": False, "error": f"{type(e).__name__}: {e}"})
        return {"running": bool(statuses) and all(st["running"] for st in statuses), "encoders": len(statuses),
                "segments": sum(st.get("segments", 0) for st in statuses),
                "errors": sum(st.get("errors", 0) for st in statuses), "reserves": dict(self.options),
                "last_error": self.last_error, "actors": statuses}

    def stop(self) -> None:
        with self._lock:
            for actor in self.actors:
                try:
                    ray.get(actor.stop.remote(), timeout=30)
                except Exception:  # noqa: BLE001 - shutting down anyway
                    pass
                ray.kill(actor, no_restart=True)
            self.actors = []
