"""The long-video tier of the index: every segment's tubes again at a low resolution (docs/architecture.md, "Plans").

A question over hours cannot see every tube at the index resolution (a 720p tube is ~720 visual tokens), so the
encoder also writes each segment's tubes resized to `long_pixels` per frame (the video minimum by default, ~128 tokens
per tube). They are stored beside the segment's data file, one file per (segment, model, long_pixels):
`low-<h(segment_id)>-<h(model_id)>-<long_pixels>.parquet`, with the data files' schema (the record is an
IndexedSegment with the long grid), written atomically, idempotent by name, and removed with the segment.

A segment whose frames are already no larger than `long_pixels` has no file: its long tier is its own tokens.
"""
from __future__ import annotations

from typing import Iterable

import pyarrow as pa

from pipeline.index import SegmentIndex
from pipeline.index_files import DATA_SCHEMA, LONG_PREFIX, SUFFIX, _h
from pipeline.records import IndexedSegment
from pipeline.tubes import long_grid


def long_file_name(segment_id: str, model_id: str, long_pixels: int) -> str:
    return f"{LONG_PREFIX}{_h(segment_id)}-{_h(model_id)}-{int(long_pixels)}{SUFFIX}"


def needs_long_file(grid_thw, long_pixels: int) -> bool:
    """Whether a segment of this grid has long-tier tokens of its own (else its full tokens serve)."""
    return bool(long_pixels) and tuple(long_grid(grid_thw, long_pixels)) != tuple(int(x) for x in grid_thw)


class LongTier:
    """Long-tier tokens of one SegmentIndex at one `long_pixels`: add, find which segments have them, read."""

    def __init__(self, index: SegmentIndex, long_pixels: int):
        if not long_pixels:
            raise ValueError("long_pixels is 0: the long tier is off")
        self.index, self.long_pixels = index, int(long_pixels)

    def add(self, records: Iterable[IndexedSegment]) -> list[IndexedSegment]:
        """Store long-tier records (IndexedSegments with the long grid); returns those newly written."""
        written, present = [], {}
        for r in records:
            folder = self.index._dir(r.source_id)
            if folder not in present:                       # one listing per folder, not one per record
                present[folder] = {i.base_name for i in self.index._ls(folder)}
            names = present[folder]
            name = long_file_name(r.segment_id, r.model_id, self.long_pixels)
            if name in names:
                continue
            row = {**r.to_row(), "indexed_at": 0.0}
            self.index._write_atomic(folder, name, pa.Table.from_pylist([row], schema=DATA_SCHEMA))
            names.add(name)
            written.append(r)
        return written

    def present(self, rows: list[dict], model_id: str) -> set[str]:
        """Segment ids among footage rows (SegmentIndex.list) whose long tier exists: a file of their own, or none
        needed (frames already small)."""
        names: dict[str, set[str]] = {}
        out = set()
        for r in rows:
            if not needs_long_file(r["grid_thw"], self.long_pixels):
                out.add(r["segment_id"])
                continue
            source = r["source_id"]
            if source not in names:
                names[source] = {i.base_name for i in self.index._ls(self.index._dir(source))}
            if long_file_name(r["segment_id"], model_id, self.long_pixels) in names[source]:
                out.add(r["segment_id"])
        return out

    def tokens(self, row: dict, model_id: str):
        """Long-tier tokens of one footage row: torch fp16 [t * h' * w' / 4, D] (the row's own when no file is
        needed). KeyError when the segment has no long tier yet."""
        import torch

        if not needs_long_file(row["grid_thw"], self.long_pixels):
            return self.index.tokens(row["segment_id"], model_id)
        path = f"{self.index._dir(row['source_id'])}/{long_file_name(row['segment_id'], model_id, self.long_pixels)}"
        try:
            return torch.from_numpy(self.index.read_tokens(path))
        except FileNotFoundError:
            raise KeyError(f"segment {row['segment_id']!r} has no long-tier tokens at long_pixels="
                           f"{self.long_pixels} (tubescope index --reencode-long fills them)") from None
