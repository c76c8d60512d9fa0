"""The one way encoded footage enters the index: write the segments, count them, announce each new one.

Archive jobs and the live indexer both end here, so a segment event has the same fields whichever path made it:
segment_id, source_id, t0, t1 (seconds, 3 decimals), tokens, model_id, live ("1" or "0"), padded ("1" or "0"), plus
what only one path knows (an archive's file path, a live segment's latency). Only segments newly written are
announced: re-running a job, or two writers racing on one segment, never duplicates an event.
"""
from __future__ import annotations

from typing import Any, Mapping

from pipeline import metrics
from pipeline.events import SEGMENTS_STREAM
from pipeline.records import IndexedSegment


def segment_event(segment: IndexedSegment, live: bool, padded: bool = False, **extra: Any) -> dict:
    """The `tubescope:segments` entry of one indexed segment."""
    return {"segment_id": segment.segment_id, "source_id": segment.source_id, "t0": f"{segment.t0:.3f}",
            "t1": f"{segment.t1:.3f}", "tokens": str(segment.n_tokens), "model_id": segment.model_id,
            "live": "1" if live else "0", "padded": "1" if padded else "0", **extra}


def write_segments(index, segments: list[IndexedSegment], *, pipeline: str, events=None,
                   details: dict[str, dict] | None = None, long: list[IndexedSegment] = (),
                   long_pixels: int = 0, thumbnails: Mapping[str, bytes] | None = None,
                   ) -> tuple[list[IndexedSegment], list[IndexedSegment]]:
    """Add `segments` to the index and `long` (their long-tier records, pipeline/long_tier.py) and `thumbnails`
    (segment id -> JPEG, pipeline/thumbnails.py) beside them; return (segments newly written, long-tier records newly
    written). Each new segment is counted and announced on the events sink. The companions are written first: a
    segment that is listed has its long tier and thumbnail whenever it has them at all.

    pipeline: "archive" or "live" (the metrics label). details: segment id -> {"padded": bool, other event fields}.
    """
    if thumbnails:
        from pipeline.thumbnails import ThumbnailStore

        ThumbnailStore(index).add(thumbnails)
    written_long = []
    if long:
        from pipeline.long_tier import LongTier

        written_long = LongTier(index, long_pixels).add(long)
    written = index.add_new(segments)
    metrics.record_segments_indexed(len(written), pipeline)
    if events is not None:
        details = details or {}
        for segment in written:
            events.emit(SEGMENTS_STREAM, segment_event(segment, pipeline == "live",
                                                       **details.get(segment.segment_id, {})))
    return written, written_long
