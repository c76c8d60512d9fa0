"""Retention has its own schedule: the service sweeps with or without live feeds, and every archive job sweeps once."""
from __future__ import annotations

import shutil
import time

import numpy as np

from pipeline.index import SegmentIndex
from pipeline.records import IndexedSegment
from pipeline.retention import RetentionSchedule, sweep_retention
from pipeline.settings import load_settings

MODEL = "m@1"


def _six_segments(root) -> SegmentIndex:
    index = SegmentIndex(root)
    tokens = np.zeros((4, 8), dtype=np.float16)
    for k in range(6):                                    # oldest first: indexed_at 1000, 1001, ...
        index.add([IndexedSegment(segment_id="", source_id=("a", "b")[k % 2], t0=10.0 * k, t1=10.0 * k + 8,
                                  grid_thw=(1, 4, 4), tube_ts=[10.0 * k], tokens=tokens, model_id=MODEL)],
                  indexed_at=1000.0 + k)
    return index


def test_sweep_retention_applies_the_settings_once(tmp_path):
    index = _six_segments(tmp_path / "index")
    assert sweep_retention(index, load_settings(data_dir=tmp_path)) == 0          # nothing set: nothing deleted
    settings = load_settings(data_dir=tmp_path, retention_max_bytes=int(index.stats()["bytes"] / 6 * 2.5))
    assert sweep_retention(index, settings) == 4
    assert [r["t0"] for r in index.list("a")] == [40.0] and [r["t0"] for r in index.list("b")] == [50.0]
    aged = load_settings(data_dir=tmp_path, retention_max_age_hours=1.0)          # indexed in 1970: all too old
    assert sweep_retention(index, aged) == 2 and index.sources() == []


def test_schedule_sweeps_at_start_then_on_its_interval_and_survives_errors(tmp_path):
    index = _six_segments(tmp_path / "index")
    per_segment = index.stats()["bytes"] / 6
    settings = load_settings(data_dir=tmp_path, retention_max_bytes=int(per_segment * 4.5),
                             retention_sweep_seconds=0.2)
    schedule = RetentionSchedule(index, settings).start()
    try:
        deadline = time.monotonic() + 10
        while schedule.swept < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert schedule.swept == 2 and schedule.status()["running"]
        # footage written later is swept by a later round, without a restart
        index.add([IndexedSegment(segment_id="", source_id="a", t0=100.0, t1=108.0, grid_thw=(1, 4, 4),
                                  tube_ts=[100.0], tokens=np.zeros((4, 8), np.float16), model_id=MODEL)])
        deadline = time.monotonic() + 10
        while schedule.swept < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert schedule.swept == 3 and len(index.list("a")) + len(index.list("b")) == 4
        # an index volume that went away is an error in status, and the schedule keeps running
        shutil.rmtree(tmp_path / "index")
        deadline = time.monotonic() + 10
        while not schedule.status()["last_error"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert schedule.status()["last_error"] and schedule.status()["running"]
    finally:
        schedule.stop()
    assert not schedule.status()["running"]


def test_recordings_share_the_byte_budget_oldest_first_and_age_out(tmp_path):
    from pipeline.recordings import list_recordings, source_folder
    from pipeline.video.recording import recording_name

    index = _six_segments(tmp_path / "index")                   # indexed at 1000 ... 1005, p bytes each
    p = index.stats()["bytes"] // 6
    settings = load_settings(data_dir=tmp_path, retention_max_bytes=int(p * 4.5))
    folder = source_folder(settings, "a")
    folder.mkdir(parents=True)
    for start, end in ((1001.5, 1002.5), (1009.0, 1010.0)):     # recordings of p bytes that end at 1002.5, 1010
        (folder / recording_name(start, end)).write_bytes(b"\0" * p)
    assert sweep_retention(index, settings) == 3                # 8 p -> 4 p: 3 segments and 1 recording, oldest
    assert [r["t0"] for r in index.list("a")] == [40.0] and [r["t0"] for r in index.list("b")] == [30.0, 50.0]
    assert [f.end for f in list_recordings(settings, "a")] == [1010.0]
    sweep_retention(index, load_settings(data_dir=tmp_path, retention_max_age_hours=1.0))
    assert list_recordings(settings, "a") == []                 # ended in 1970: too old, like the segments
