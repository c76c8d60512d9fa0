"""Captions live in the footage index: idempotent writes, what is missing, read back, and gone with their segment."""
from __future__ import annotations

import numpy as np
import pytest

from pipeline.captions import Caption, CaptionStore
from pipeline.index import SegmentIndex
from pipeline.records import IndexedSegment

TOKENS_MODEL, CAPTION_MODEL = "tiny@1", "tiny@1"


def _segment(source: str, t0: float) -> IndexedSegment:
    return IndexedSegment(segment_id="", source_id=source, t0=t0, t1=t0 + 8.0, grid_thw=(1, 4, 4), tube_ts=[t0],
                          tokens=np.zeros((4, 8), np.float16), model_id=TOKENS_MODEL)


def _caption(seg: IndexedSegment, text: str, model: str = CAPTION_MODEL) -> Caption:
    v = np.ones(8, np.float32) / np.sqrt(8)
    return Caption(seg.segment_id, seg.source_id, seg.t0, seg.t1, text, v, model)


def test_captions_are_written_once_listed_as_missing_and_read_back(tmp_path):
    index = SegmentIndex(tmp_path / "index")
    segs = [_segment("cam", 8.0 * k) for k in range(4)]
    index.add(segs, indexed_at=1000.0)
    store = CaptionStore(index)
    assert [r["segment_id"] for r in store.missing("cam", CAPTION_MODEL)] == [s.segment_id for s in segs]
    assert len(store.add([_caption(segs[0], "a truck"), _caption(segs[2], "rain")])) == 2
    assert store.add([_caption(segs[0], "a second try")]) == []                 # one caption per segment and model
    assert [r["segment_id"] for r in store.missing("cam", CAPTION_MODEL)] == [segs[1].segment_id, segs[3].segment_id]
    assert len(store.missing("cam", "other@2")) == 4                            # another model has captioned nothing
    got = {c.segment_id: c for c in store.read("cam")}
    assert got[segs[0].segment_id].caption == "a truck" and got[segs[2].segment_id].caption == "rain"
    assert np.allclose(np.linalg.norm(got[segs[0].segment_id].vector), 1.0)
    # footage listings and counts never see caption files
    assert len(index.list("cam")) == 4 and index.stats()["segments"] == 4
    with pytest.raises(ValueError, match="vector"):
        Caption(segs[1].segment_id, "cam", 8.0, 16.0, "x", np.array([np.nan], np.float32), CAPTION_MODEL)


def test_captions_go_with_their_segments(tmp_path):
    index = SegmentIndex(tmp_path / "index")
    segs = [_segment("cam", 8.0 * k) for k in range(4)]
    for k, s in enumerate(segs):
        index.add([s], indexed_at=1000.0 + k)
    store = CaptionStore(index)
    store.add([_caption(s, f"seg {k}") for k, s in enumerate(segs)])
    assert store.count("cam") == 4
    index.delete("cam", before=16.0)                                            # the first two segments end by then
    assert sorted(c.caption for c in store.read("cam")) == ["seg 2", "seg 3"]
    assert index.sweep(max_age_s=10.0, now=1012.5) == 1                          # indexed_at 1002 is older than 10 s
    assert [c.caption for c in store.read("cam")] == ["seg 3"]
    index.delete("cam")
    assert store.count("cam") == 0 and index.sources() == []
