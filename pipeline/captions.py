"""Captions and embedding vectors of indexed segments, kept in the footage index itself.

The Parquet index is the truth that the retrieval index (pipeline/retrieval.py) is rebuilt from, so captions live
beside the tokens they describe: one file per (segment_id, captioning model) in the segment's source folder,
`cap-<h(segment_id)>-<h(model_id)>.parquet`, written atomically like data files. Writing is idempotent (a name check),
a segment deleted by retention or by deleting its source takes its captions with it (SegmentIndex removes them), and
listings of footage never read them.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.index import SegmentIndex
from pipeline.index_files import CAPTION_PREFIX, SUFFIX, _h

CAPTION_SCHEMA = pa.schema([
    pa.field("segment_id", pa.string()), pa.field("source_id", pa.string()),
    pa.field("t0", pa.float64()), pa.field("t1", pa.float64()),
    pa.field("caption", pa.string()), pa.field("vector", pa.list_(pa.float32())),
    pa.field("model_id", pa.string()), pa.field("captioned_at", pa.float64()),
    pa.field("visual", pa.list_(pa.float32())),     # null in files written before pooled vectors were kept
])


def pooled_visual(tokens) -> np.ndarray:
    """The L2-normalised mean of visual tokens (n, D) (a torch tensor or an array, any float dtype, any device), as
    float32 [D]: the vector search by image compares, for segments and uploaded images alike."""
    import torch         # here: readers of caption files (listings, the CLI) need no torch

    if not isinstance(tokens, torch.Tensor):
        tokens = torch.from_numpy(np.array(tokens, dtype=np.float32))     # a copy: stored tokens are read-only
    mean = tokens.float().mean(dim=0).cpu()
    return (mean / mean.norm().clamp_min(1e-12)).numpy()


def caption_file_name(segment_id: str, model_id: str) -> str:
    return f"{CAPTION_PREFIX}{_h(segment_id)}-{_h(model_id)}{SUFFIX}"


@dataclass
class Caption:
    """What the captioner wrote for one segment: a sentence, a unit vector, and the checkpoint that wrote them; with
    the segment's pooled visual tokens (`pooled_visual`), which search by image compares."""
    segment_id: str
    source_id: str
    t0: float
    t1: float
    caption: str
    vector: np.ndarray              # float32 [D], L2-normalised
    model_id: str
    visual: np.ndarray | None = None   # float32 [D], L2-normalised; None when read from a file written without it

    def __post_init__(self):
        if not isinstance(self.caption, str):
            raise ValueError(f"caption must be a str, got {type(self.caption).__name__}")
        v = np.asarray(self.vector, dtype=np.float32)
        if v.ndim != 1 or v.size == 0:
            raise ValueError(f"vector must be a 1-d float array, got shape {v.shape}")
        if not np.all(np.isfinite(v)):
            raise ValueError("vector has NaN or infinite values (a model whose final hidden state is zero cannot "
                             "embed)")
        if not isinstance(self.model_id, str) or not self.model_id:
            raise ValueError(f"model_id must be a non-empty str, got {self.model_id!r}")
        self.vector = v
        if self.visual is not None:
            visual = np.asarray(self.visual, dtype=np.float32)
            if visual.ndim != 1 or visual.size == 0 or not np.all(np.isfinite(visual)):
                raise ValueError(f"visual must be a finite 1-d float array, got shape {visual.shape}")
            self.visual = visual

    def to_row(self, captioned_at: float) -> dict:
        return {"segment_id": self.segment_id, "source_id": self.source_id, "t0": float(self.t0),
                "t1": float(self.t1), "caption": self.caption, "vector": self.vector.tolist(),
                "model_id": self.model_id, "captioned_at": float(captioned_at),
                "visual": None if self.visual is None else self.visual.tolist()}

    @classmethod
    def from_row(cls, row: dict) -> "Caption":
        return cls(segment_id=row["segment_id"], source_id=row["source_id"], t0=row["t0"], t1=row["t1"],
                   caption=row["caption"], vector=np.asarray(row["vector"], np.float32), model_id=row["model_id"],
                   visual=None if row.get("visual") is None else np.asarray(row["visual"], np.float32))


class CaptionStore:
    """Captions of one SegmentIndex: add, find what is missing, read back."""

    def __init__(self, index: SegmentIndex):
        self.index = index

    def add(self, captions: Iterable[Caption], captioned_at: float | None = None) -> list[Caption]:
        """Store captions; returns those newly written (a segment already captioned by that model is skipped)."""
        stamp = time.time() if captioned_at is None else float(captioned_at)
        written = []
        present: dict[str, set[str]] = {}
        for c in captions:
            folder = self.index._dir(c.source_id)
            if folder not in present:                       # one listing per folder, not one per record
                present[folder] = {i.base_name for i in self.index._ls(folder)}
            names = present[folder]
            name = caption_file_name(c.segment_id, c.model_id)
            if name in names:
                continue
            self.index._write_atomic(folder, name, pa.Table.from_pylist([c.to_row(stamp)], schema=CAPTION_SCHEMA))
            names.add(name)
            written.append(c)
        return written

    def missing(self, source_id: str, model_id: str, start: float | None = None,
                end: float | None = None) -> list[dict]:
        """Footage rows (SegmentIndex.list) of the source that `model_id` has not captioned yet, in time order."""
        return self.uncaptioned(self.index.list(source_id, start, end), model_id)

    def uncaptioned(self, rows: list[dict], model_id: str) -> list[dict]:
        """The footage rows among `rows` that `model_id` has not captioned yet (one listing per source)."""
        names: dict[str, set[str]] = {}
        out = []
        for r in rows:
            source = r["source_id"]
            if source not in names:
                names[source] = {i.base_name for i in self.index._ls(self.index._dir(source))}
            if caption_file_name(r["segment_id"], model_id) not in names[source]:
                out.append(r)
        return out

    def texts(self, rows: list[dict], model_id: str) -> dict[str, str]:
        """segment_id -> caption text, for the rows of `rows` that `model_id` has captioned."""
        out = {}
        for r in rows:
            path = f"{self.index._dir(r['source_id'])}/{caption_file_name(r['segment_id'], model_id)}"
            try:
                with self.index.fs.open_input_file(path) as f:
                    out[r["segment_id"]] = pq.read_table(f, columns=["caption"]).column(0)[0].as_py()
            except FileNotFoundError:
                continue
        return out

    def read(self, source_id: str, model_id: str | None = None) -> Iterator[Caption]:
        """Every caption of the source (of one model when given), in no particular order."""
        for info in self.index._ls(self.index._dir(source_id)):
            if not info.base_name.startswith(CAPTION_PREFIX):
                continue
            if model_id is not None and not info.base_name.endswith(f"-{_h(model_id)}{SUFFIX}"):
                continue
            try:
                with self.index.fs.open_input_file(info.path) as f:
                    table = pq.read_table(f, schema=CAPTION_SCHEMA)
            except FileNotFoundError:                   # deleted since the listing
                continue
            for row in table.to_pylist():
                yield Caption.from_row(row)

    def count(self, source_id: str) -> int:
        return sum(1 for i in self.index._ls(self.index._dir(source_id)) if i.base_name.startswith(CAPTION_PREFIX))
