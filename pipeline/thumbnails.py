"""Segment thumbnails: one small JPEG per segment, kept in the footage index beside the segment (docs/architecture.md,
"Thumbnails").

The picture is the segment's middle frame (the sampled frame nearest the middle of [t0, t1)) as the encoder saw it,
at the index resolution, scaled down to at most THUMBNAIL_MAX_WIDTH pixels wide with its aspect kept. It is made where
the frames are at hand (an archive job's decode task, the live round) and written before the segment's data file,
so a listed segment has its thumbnail whenever it has one at all. One file per segment, whatever the model:
`_thm-<h(segment_id)>.jpg` in the segment's source folder, written atomically and idempotent by name, removed with the
segment's last data file (SegmentIndex's companion files). The content of a name never changes, so it is cached
for long by HTTP clients.
"""
from __future__ import annotations

import io
from typing import Iterable, Mapping
from urllib.parse import quote

import numpy as np

from pipeline.index import SegmentIndex
from pipeline.index_files import THUMBNAIL_PREFIX, _h
from pipeline.records import Segment, source_of

THUMBNAIL_MAX_WIDTH = 320
JPEG_QUALITY = 80                 # small (a 320x180 frame is ~10 KB) with no visible blocking at this size
THUMBNAIL_SUFFIX = ".jpg"


def thumbnail_file_name(segment_id: str) -> str:
    return f"{THUMBNAIL_PREFIX}{_h(segment_id)}{THUMBNAIL_SUFFIX}"


def thumbnail_url(segment_id: str) -> str:
    """The API path of a segment's thumbnail (the id URL-quoted: source ids may hold '/', ':' or spaces)."""
    return f"/v1/segments/{quote(segment_id, safe='')}/thumbnail"


def middle_frame(segment: Segment) -> np.ndarray:
    """The sampled frame nearest the middle of the segment's span: [H, W, 3] uint8."""
    middle = (segment.t0 + segment.t1) / 2
    return segment.frames[int(np.argmin([abs(t - middle) for t in segment.frame_ts]))]


def encode_jpeg(frame: np.ndarray, max_width: int = THUMBNAIL_MAX_WIDTH, quality: int = JPEG_QUALITY) -> bytes:
    """An RGB uint8 frame as JPEG bytes, scaled down (never up) to at most max_width pixels wide, aspect kept."""
    from PIL import Image

    image = Image.fromarray(np.ascontiguousarray(frame), "RGB")
    if image.width > max_width:
        image = image.resize((max_width, max(1, round(image.height * max_width / image.width))),
                             Image.Resampling.BICUBIC, reducing_gap=2.0)
    out = io.BytesIO()
    image.save(out, "JPEG", quality=quality, optimize=True)
    return out.getvalue()


def segment_thumbnail(segment: Segment) -> bytes:
    """The thumbnail JPEG of a decoded segment."""
    return encode_jpeg(middle_frame(segment))


class ThumbnailStore:
    """Thumbnails of one SegmentIndex: write, read, and which segments have one (one folder listing per source)."""

    def __init__(self, index: SegmentIndex):
        self.index = index

    def add(self, thumbnails: Mapping[str, bytes]) -> list[str]:
        """Store JPEGs by segment id; returns the ids newly written (a segment that has one already is skipped)."""
        written, present = [], {}
        for segment_id, jpeg in thumbnails.items():
            if not jpeg:
                continue
            folder = self.index._dir(source_of(segment_id))
            if folder not in present:                       # one listing per folder, not one per thumbnail
                present[folder] = {i.base_name for i in self.index._ls(folder)}
            name = thumbnail_file_name(segment_id)
            if name in present[folder]:
                continue
            self.index._write_bytes(folder, name, bytes(jpeg))
            present[folder].add(name)
            written.append(segment_id)
        return written

    def read(self, segment_id: str) -> bytes:
        """The JPEG of a segment. KeyError when it has none (indexed before thumbnails, or not indexed)."""
        path = f"{self.index._dir(source_of(segment_id))}/{thumbnail_file_name(segment_id)}"
        try:
            with self.index.fs.open_input_file(path) as f:
                return f.read()
        except FileNotFoundError:
            self.index.check_root()
            raise KeyError(f"segment {segment_id!r} has no thumbnail") from None

    def exists(self, segment_id: str) -> bool:
        return bool(self.present([segment_id]))

    def present(self, segment_ids: Iterable[str]) -> set[str]:
        """The ids among `segment_ids` that have a thumbnail: one folder listing per source, no stat per id."""
        names: dict[str, set[str]] = {}
        out = set()
        for segment_id in segment_ids:
            source = source_of(segment_id)
            if source not in names:
                names[source] = {i.base_name for i in self.index._ls(self.index._dir(source))
                                 if i.base_name.startswith(THUMBNAIL_PREFIX)}
            if thumbnail_file_name(segment_id) in names[source]:
                out.add(segment_id)
        return out

    def with_urls(self, entries: list[dict]) -> list[dict]:
        """`entries` (dicts with a segment_id) with `thumbnail_url` added to those whose thumbnail exists."""
        present = self.present(e["segment_id"] for e in entries)
        return [{**e, "thumbnail_url": thumbnail_url(e["segment_id"])} if e["segment_id"] in present else e
                for e in entries]
