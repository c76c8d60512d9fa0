"""One round of the live path, without Ray: encode the segments the feed readers had queued in one packed call, then
write them like any other footage (pipeline.indexing). actors/live.py runs the rounds in a Ray actor.

A failed index write is reported on the errors stream and the next round goes on; latency (wall clock since a
segment's last sampled frame) is recorded per feed.
"""
from __future__ import annotations

import logging
import time
from typing import Callable

from pipeline import metrics
from pipeline.records import IndexedSegment, Segment

log = logging.getLogger(__name__)


class LiveIndexing:
    """The Ray-free core: encode a list of segments in packed batches, then write them like any other footage."""

    def __init__(self, encoder, index, events=None, on_indexed: Callable[[Segment, float], None] | None = None):
        self.encoder, self.index, self.events = encoder, index, events
        self.on_indexed = on_indexed
        self.segments = 0
        self.errors = 0
        self.last_latency_s: float | None = None

    def process(self, segments: list[Segment]) -> int:
        from pipeline.events import ERRORS_STREAM
        from pipeline.indexing import write_segments
        from pipeline.tubes import tubes_from_segment

        if not segments:
            return 0
        import torch

        tubes = [tubes_from_segment(s, as_uint8=True) for s in segments]
        tokens, long_tokens, long_grids = self.encoder.encode_tiers([torch.from_numpy(t.pixel_rows) for t in tubes],
                                                                    [tuple(t.grid_thw) for t in tubes])
        records = [_record(t, t.grid_thw, tok, self.encoder.model_id) for t, tok in zip(tubes, tokens)]
        long = [_record(t, g, tok, self.encoder.model_id)
                for t, g, tok in zip(tubes, long_grids, long_tokens) if tok is not None]
        now = time.time()
        latency = {s.segment_id: now - s.frame_ts[-1] for s in segments}   # since the segment's last sampled frame
        details = {s.segment_id: {"padded": s.padded, "latency_s": f"{latency[s.segment_id]:.3f}"} for s in segments}
        try:
            written, _ = write_segments(self.index, records, pipeline="live", events=self.events, details=details,
                                        long=long, long_pixels=self.encoder.long_pixels)
        except Exception as e:  # noqa: BLE001 - a failed write is reported; the next round goes on
            self.errors += 1
            log.exception("live index write failed")
            if self.events is not None:
                self.events.emit(ERRORS_STREAM, {"stage": "live-index", "error": f"{type(e).__name__}: {e}"})
            return 0
        for seg in segments:
            self.last_latency_s = latency[seg.segment_id]
            metrics.record_live_latency(seg.source_id, latency[seg.segment_id])
            if self.on_indexed is not None:
                self.on_indexed(seg, latency[seg.segment_id])
        self.segments += len(written)
        return len(written)


def _record(tubes, grid_thw, tokens, model_id: str) -> IndexedSegment:
    return IndexedSegment(segment_id=tubes.segment_id, source_id=tubes.source_id, t0=tubes.t0, t1=tubes.t1,
                          grid_thw=tuple(grid_thw), tube_ts=list(tubes.tube_ts), tokens=tokens, model_id=model_id)
