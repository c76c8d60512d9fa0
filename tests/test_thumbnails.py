"""Segment thumbnails: the JPEG itself, its place in the index (written beside the segment, removed with it), and the
two paths that write it (the live round, an archive job with its fill pass for older footage)."""
from __future__ import annotations

import io

import numpy as np
import pyarrow.dataset as pads
import pytest
from PIL import Image

import qwen2vl
from pipeline.index import SegmentIndex
from pipeline.indexing import write_segments
from pipeline.records import IndexedSegment
from pipeline.thumbnails import (THUMBNAIL_MAX_WIDTH, ThumbnailStore, encode_jpeg, thumbnail_file_name,
                                 thumbnail_url)

COLOURS = [(230, 20, 20), (20, 200, 40), (30, 40, 220), (240, 220, 30)]      # one per second of footage


def jpeg_image(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    assert image.format == "JPEG"
    image.load()
    return image


def indexed(source_id: str, t0: float, dur: float = 2.0) -> IndexedSegment:
    return IndexedSegment(segment_id="", source_id=source_id, t0=t0, t1=t0 + dur, grid_thw=(1, 2, 2),
                          tube_ts=[t0], tokens=np.zeros((1, 8), np.float16), model_id="m@0")


def test_jpeg_is_at_most_320_wide_with_its_aspect_kept():
    for (w, h), expected in [((640, 360), (320, 180)), ((1000, 10), (320, 3)), ((200, 100), (200, 100)),
                             ((90, 160), (90, 160))]:
        frame = np.full((h, w, 3), (10, 120, 250), np.uint8)
        image = jpeg_image(encode_jpeg(frame))
        assert image.size == expected and image.width <= THUMBNAIL_MAX_WIDTH
        assert np.abs(np.asarray(image.convert("RGB"), np.float32).mean((0, 1)) - (10, 120, 250)).max() < 6
    assert thumbnail_url("cam/1 a:5000") == "/v1/segments/cam%2F1%20a%3A5000/thumbnail"


def test_thumbnails_live_beside_their_segment_and_go_with_it(tmp_path):
    index = SegmentIndex(tmp_path / "index")
    store = ThumbnailStore(index)
    segs = [indexed("cam/1", t0) for t0 in (0.0, 2.0, 4.0)]
    jpegs = {s.segment_id: encode_jpeg(np.full((8, 8, 3), 40 * i, np.uint8)) for i, s in enumerate(segs)}
    written, _ = write_segments(index, segs, pipeline="archive", thumbnails=jpegs)
    assert len(written) == 3 and store.present(jpegs) == set(jpegs)
    assert store.read("cam/1:2000") == jpegs["cam/1:2000"] and store.exists("cam/1:0")
    assert store.add(jpegs) == []                                    # idempotent by name
    with pytest.raises(KeyError, match="no thumbnail"):
        store.read("cam/1:6000")
    rows = store.with_urls([{"segment_id": "cam/1:0"}, {"segment_id": "cam/1:6000"}, {"segment_id": "cam2:0"}])
    assert [r.get("thumbnail_url") for r in rows] == ["/v1/segments/cam%2F1%3A0/thumbnail", None, None]
    # the JPEGs stay out of a pyarrow.dataset read of the index
    assert pads.dataset(index.root, format="parquet", partitioning="hive").count_rows() >= 3
    # retention takes the oldest segment's thumbnail with it; deleting the source takes the rest
    index.sweep(max_bytes=sum(r["bytes"] for r in index.list("cam/1")) - 1)
    assert [r["segment_id"] for r in index.list("cam/1")] == ["cam/1:2000", "cam/1:4000"]
    assert store.present(jpegs) == {"cam/1:2000", "cam/1:4000"}
    folder = tmp_path / "index" / "source=cam%2F1"
    assert not (folder / thumbnail_file_name("cam/1:0")).exists()
    index.delete("cam/1")
    assert store.present(jpegs) == set() and not folder.exists()


def test_the_live_round_writes_each_segments_middle_frame(tmp_path):
    from actors.encoder import VisionEncoder
    from pipeline.live import LiveIndexing
    from pipeline.video.segments import segment_frames

    model = qwen2vl.write_tiny_checkpoint(tmp_path / "tiny")
    index = SegmentIndex(tmp_path / "index")
    live = LiveIndexing(VisionEncoder(str(model), token_budget=4096, pipeline="live"), index)
    # 4 s at 2 fps, one colour per second, 364x196 (a model size, wider than a thumbnail): the middle of [0, 2) is
    # the frame at 1.0 s, of [2, 4) the one at 3.0 s
    start = 1_700_000_000.0
    frames = [(start + k / 2, np.full((196, 364, 3), COLOURS[k // 2], np.uint8)) for k in range(8)]
    assert live.process(segment_frames("door", frames, segment_seconds=2.0, fps=2.0)) == 2
    store = ThumbnailStore(index)
    for row, colour in zip(index.list("door"), (COLOURS[1], COLOURS[3])):
        image = jpeg_image(store.read(row["segment_id"]))
        assert image.size == (320, 172)
        assert np.abs(np.asarray(image.convert("RGB"), np.float32).mean((0, 1)) - colour).max() < 8, row


@pytest.mark.timeout(240)
def test_archive_jobs_write_thumbnails_and_fill_older_footage_once(tmp_path, video_factory, ray_local):
    from actors.encoder import VisionEncoder
    from pipeline.archive import index_archive
    from pipeline.settings import load_settings
    from videos import read_frame_index

    clip = video_factory("clip.mp4", width=320, height=180, fps=30, seconds=4.0)      # frames carry their index
    settings = load_settings(data_dir=tmp_path / "data", model_path=qwen2vl.write_tiny_checkpoint(tmp_path / "tiny"),
                             segment_seconds=2.0, min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 40,
                             encoder_token_budget=300)
    index = SegmentIndex(settings.index_root)
    store = ThumbnailStore(index)
    report = index_archive([str(clip)], settings, VisionEncoder, index=index, progress=False)
    assert report.segments == 2 and report.exit_code == 0
    ids = [r["segment_id"] for r in index.list("clip")]
    assert ids == ["clip:0", "clip:2000"]
    for segment_id, middle_frame in zip(ids, (30, 90)):           # the frames at 1.0 s and 3.0 s
        image = jpeg_image(store.read(segment_id))
        assert image.width <= THUMBNAIL_MAX_WIDTH
        assert read_frame_index(np.asarray(image.convert("RGB"))) == middle_frame
    # footage indexed before thumbnails: a plain re-run leaves it alone, --thumbnails fills it, once
    folder = index._dir("clip")
    for segment_id in ids:
        index._remove(f"{folder}/{thumbnail_file_name(segment_id)}")
    tokens = {i.base_name: i.mtime_ns for i in index._ls(folder) if i.base_name.startswith("seg-")}
    again = index_archive([str(clip)], settings, VisionEncoder, index=index, progress=False)
    assert again.skipped == 2 and store.present(ids) == set()
    filled = index_archive([str(clip)], settings, VisionEncoder, index=index, progress=False, thumbnails=True)
    assert filled.segments == 0 and filled.skipped == 0 and store.present(ids) == set(ids)
    assert {i.base_name: i.mtime_ns for i in index._ls(folder) if i.base_name.startswith("seg-")} == tokens
    once = index_archive([str(clip)], settings, VisionEncoder, index=index, progress=False, thumbnails=True)
    assert once.skipped == 2
