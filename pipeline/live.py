"""One round of the live path, without Ray: encode the segments the feed readers had queued in one packed call, then
write them like any other footage (pipeline.indexing). actors/live.py runs the rounds in a Ray actor.

A failed index write loses nothing at once: each feed's encoded segments wait here and are written again with
capped backoff, while other feeds go on. Each feed holds at most `max_held_per_feed` segments (its reader's queue
size); past that the oldest are dropped, counted per feed (`lost`, tubescope_live_lost_segments_total) and reported
on the errors stream with the feed's source id and the real cause (docs/architecture.md, "Live indexing").
"""
from __future__ import annotations

import collections
import logging
import time
from dataclasses import dataclass

from pipeline import metrics
from pipeline.records import IndexedSegment, Segment
from pipeline.video.clock import Backoff

log = logging.getLogger(__name__)

RETRY_INITIAL_S = 0.5          # first retry of a failed write; doubles per failure
RETRY_MAX_S = 8.0              # and never waits longer than this, so a volume that comes back is used soon


@dataclass
class HeldSegment:
    """An encoded live segment waiting to be written, with what its event needs."""
    record: IndexedSegment
    padded: bool
    last_frame_t: float        # epoch time of its last sampled frame (latency is measured from it)
    long: IndexedSegment | None = None     # its long-tier record, when it needs one (pipeline/long_tier.py)
    thumbnail: bytes = b""                 # its JPEG (pipeline/thumbnails.py): frames are not kept past encoding


@dataclass
class WriteFailure:
    """A feed whose index writes are failing: why, and when to try again."""
    error: str
    backoff: Backoff
    retry_at: float
    since: float


class LiveIndexing:
    """The Ray-free core: encode a list of segments in packed batches, then write them like any other footage."""

    def __init__(self, encoder, index, events=None, max_held_per_feed: int = 4):
        if isinstance(max_held_per_feed, bool) or not isinstance(max_held_per_feed, int) or max_held_per_feed < 1:
            raise ValueError(f"max_held_per_feed must be an int >= 1, got {max_held_per_feed!r}")
        self.encoder, self.index, self.events = encoder, index, events
        self.max_held_per_feed = max_held_per_feed
        self.held: dict[str, collections.deque[HeldSegment]] = {}
        self.failures: dict[str, WriteFailure] = {}
        self.lost: dict[str, int] = {}             # feed -> segments dropped here (never indexed)
        self.segments = 0
        self.errors = 0                            # failed write attempts
        self.last_latency_s: float | None = None

    @property
    def held_count(self) -> int:
        return sum(len(q) for q in self.held.values())

    def process(self, segments: list[Segment], now: float | None = None) -> int:
        """Encode `segments`, then write every feed's waiting segments that are due; returns how many were newly
        written. Called with [] it only retries what waits."""
        if segments:
            self._encode(segments)
        return self.write_due(now)

    def write_due(self, now: float | None = None) -> int:
        """Write each feed's waiting segments unless the feed is backing off; trim what a failing feed holds."""
        now = time.time() if now is None else now
        written = 0
        for source_id in list(self.held):
            failure = self.failures.get(source_id)
            if failure is not None and now < failure.retry_at:
                continue
            written += self._write(source_id, now)
        for source_id in list(self.failures):
            self._trim(source_id)
        return written

    def give_up(self, error: str) -> int:
        """Count everything still waiting as lost, with `error` as the cause (an actor that ends while writes fail);
        returns how many segments that was."""
        lost = 0
        for source_id, held in list(self.held.items()):
            if held:
                self._count_lost(source_id, len(held), error)
                lost += len(held)
        self.held.clear()
        return lost

    def status(self) -> dict:
        return {"held": {s: len(q) for s, q in self.held.items() if q}, "lost": dict(self.lost),
                "write_errors": {s: f.error for s, f in self.failures.items()}}

    # ---- stages -------------------------------------------------------------------------------------------------
    def _encode(self, segments: list[Segment]) -> None:
        import torch

        from pipeline.thumbnails import segment_thumbnail
        from pipeline.tubes import tubes_from_segment

        try:
            tubes = [tubes_from_segment(s, as_uint8=True) for s in segments]
            tokens, long_tokens, long_grids = self.encoder.encode_tiers(
                [torch.from_numpy(t.pixel_rows) for t in tubes], [tuple(t.grid_thw) for t in tubes])
        except Exception as e:  # noqa: BLE001 - never lose segments uncounted; the next round goes on
            log.exception("live encoding failed")
            for source_id, n in collections.Counter(s.source_id for s in segments).items():
                self._count_lost(source_id, n, f"encoding failed: {type(e).__name__}: {e}")
            return
        for seg, t, tok, long_grid, long_tok in zip(segments, tubes, tokens, long_grids, long_tokens):
            record = _record(t, t.grid_thw, tok, self.encoder.model_id)
            long = None if long_tok is None else _record(t, long_grid, long_tok, self.encoder.model_id)
            self.held.setdefault(seg.source_id, collections.deque()).append(
                HeldSegment(record, seg.padded, float(seg.frame_ts[-1]), long, segment_thumbnail(seg)))

    def _write(self, source_id: str, now: float) -> int:
        from pipeline.index_health import write_error_text
        from pipeline.indexing import write_segments

        held = list(self.held[source_id])
        latency = {h.record.segment_id: now - h.last_frame_t for h in held}   # since the segment's last frame
        details = {h.record.segment_id: {"padded": h.padded, "latency_s": f"{latency[h.record.segment_id]:.3f}"}
                   for h in held}
        try:
            written, _ = write_segments(self.index, [h.record for h in held], pipeline="live", events=self.events,
                                        details=details, long=[h.long for h in held if h.long is not None],
                                        long_pixels=self.encoder.long_pixels,
                                        thumbnails={h.record.segment_id: h.thumbnail for h in held})
        except Exception as e:  # noqa: BLE001 - the segments wait for the next try; other feeds go on
            self.errors += 1
            self._failed(source_id, write_error_text(e), now, len(held))
            return 0
        del self.held[source_id]
        failure = self.failures.pop(source_id, None)
        if failure is not None:
            log.warning("feed %s: index writes work again after %.1f s (%s)", source_id, now - failure.since,
                        failure.error)
        for h in held:
            self.last_latency_s = latency[h.record.segment_id]
            metrics.record_live_latency(source_id, self.last_latency_s)
        self.segments += len(written)
        return len(written)

    def _failed(self, source_id: str, error: str, now: float, waiting: int) -> None:
        failure = self.failures.get(source_id)
        if failure is None:
            failure = self.failures[source_id] = WriteFailure(error, Backoff(RETRY_INITIAL_S, RETRY_MAX_S), now, now)
            log.error("feed %s: live index write failed (%s); %d segments wait for a retry", source_id, error, waiting)
            self._report(source_id, "live_index_write_failed", waiting, error)
        failure.error = error
        failure.retry_at = now + failure.backoff.next_delay()

    def _trim(self, source_id: str) -> None:
        held = self.held.get(source_id)
        extra = len(held) - self.max_held_per_feed if held else 0
        if extra > 0:
            for _ in range(extra):
                held.popleft()                     # the oldest go first, as in the readers' queues
            self._count_lost(source_id, extra, self.failures[source_id].error)

    def _count_lost(self, source_id: str, count: int, error: str) -> None:
        self.lost[source_id] = self.lost.get(source_id, 0) + count
        metrics.record_live_lost(source_id, count)
        log.error("feed %s: %d live segments lost (%s); %d so far", source_id, count, error, self.lost[source_id])
        self._report(source_id, "live_segments_lost", count, error)

    def _report(self, source_id: str, kind: str, segments: int, error: str) -> None:
        from pipeline.events import ERRORS_STREAM

        if self.events is not None:
            self.events.emit(ERRORS_STREAM, {"stage": "live-index", "kind": kind, "source_id": source_id,
                                             "segments": str(segments), "error": error, "time": time.time()})


def live_encoder_count(feeds: int, feeds_per_encoder: int, most: int) -> int:
    """Live encoder actors for `feeds` registered feeds: one per `feeds_per_encoder` begun, at most `most`, and at
    least one, so a new feed is encoded without waiting for a tower to load."""
    return max(1, min(most, -(-feeds // feeds_per_encoder)))


def shard_feeds(feed_ids: list[str], index: int, count: int) -> list[str]:
    """The feeds live encoder `index` of `count` pulls: every count-th of the sorted ids. Each actor reads the
    registry itself and they agree without talking; while they disagree (a count or a registry changing) a feed may
    have two pullers or none for a round, which loses nothing: a reader hands each segment out once and keeps it
    queued until asked (docs/architecture.md, "Live indexing")."""
    if not 0 <= index < count:
        raise ValueError(f"live encoder {index} of {count} does not exist")
    return sorted(feed_ids)[index::count]


def _record(tubes, grid_thw, tokens, model_id: str) -> IndexedSegment:
    return IndexedSegment(segment_id=tubes.segment_id, source_id=tubes.source_id, t0=tubes.t0, t1=tubes.t1,
                          grid_thw=tuple(grid_thw), tube_ts=list(tubes.tube_ts), tokens=tokens, model_id=model_id,
                          source_size=tubes.source_size)
