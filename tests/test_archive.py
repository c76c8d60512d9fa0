"""Archive jobs end to end: real Ray Data, real encoder actors, real videos, real Redis; bad input loses nothing else."""
from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

import qwen2vl
from actors.encoder import VisionEncoder
from pipeline.archive import index_archive, upright_size
from pipeline.archive_sources import expand_sources
from pipeline.events import ERRORS_STREAM, SEGMENTS_STREAM, EventSink
from pipeline.index import SegmentIndex
from pipeline.settings import load_settings
from pipeline.tubes import tubes_from_segment
from pipeline.video.files import decode_window
from pipeline.video.segments import segment_frames

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return qwen2vl.write_tiny_checkpoint(tmp_path_factory.mktemp("model") / "tiny")


def _settings(tmp_path, model, **kw):
    return load_settings(data_dir=tmp_path / "data", model_path=model, segment_seconds=2.0,
                         min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 40, encoder_token_budget=300, **kw)


def test_expand_sources(tmp_path, video_factory):
    a = video_factory("a.mp4", seconds=0.5)
    b = video_factory("sub/b.mkv", seconds=0.5)
    (tmp_path / "videos" / "notes.txt").write_text("x")
    files, failed = expand_sources([str(tmp_path / "videos"), str(tmp_path / "videos" / "*.mp4"),
                                    str(tmp_path / "nope.mp4"), str(tmp_path / "empty*.mp4")])
    assert files == [str(a), str(b)]                      # folder recursion, video extensions only, no duplicates
    assert [f["error"] for f in failed] == ["no such file or directory", "glob matched no files"]
    files, failed = expand_sources([f"file://{a}"])
    assert files == [str(a)] and not failed


def test_archive_job_indexes_good_files_and_reports_bad_ones(tmp_path, video_factory, redis_server, ray_local,
                                                             tiny_model):
    good = [video_factory("wide.mp4", width=256, height=96, fps=30, seconds=5.0),
            video_factory("portrait.mp4", width=90, height=160, fps=25, frames=61),
            video_factory("one.mp4", width=64, height=48, fps=25, frames=1),
            video_factory("huge.mp4", width=1920, height=1080, fps=25, frames=3)]
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    text = tmp_path / "text.mp4"
    text.write_text("this is not a video\n" * 50)
    truncated = tmp_path / "truncated.mp4"
    truncated.write_bytes(good[0].read_bytes()[:3000])
    missing = tmp_path / "missing.mp4"
    s = _settings(tmp_path, tiny_model)
    index = SegmentIndex(s.index_root)
    sink = EventSink(redis_server.url, tmp_path / "outbox")
    paths = [str(p) for p in [good[0], empty, good[1], text, good[2], truncated, missing, good[3]]]

    report = index_archive(paths, s, VisionEncoder, index=index, events=sink, progress=False)

    assert sorted(report.indexed) == sorted(str(p) for p in good)
    assert sorted(f["path"] for f in report.failed) == sorted(str(p) for p in [empty, text, truncated, missing])
    assert all(f["error"] for f in report.failed)
    assert report.exit_code == 2
    # wide: 5 s at 2 fps -> 3 segments of 2 s (the last holds 2 frames); portrait 61 frames at 25 fps -> 2.44 s -> 2
    expected = {"wide": 3, "portrait": 2, "one": 1, "huge": 1}
    assert report.segments == sum(expected.values())
    for source, n in expected.items():
        rows = index.list(source)
        assert len(rows) == n, (source, rows)
        for r in rows:
            t, h, w = r["grid_thw"]
            assert h * w * 14 * 14 <= s.max_pixels and r["n_tokens"] == t * h * w // 4
    assert index.list("one")[0]["grid_thw"][0] == 1                 # 1 frame -> padded to a single tube
    huge = index.list("huge")[0]
    assert huge["grid_thw"][1] * huge["grid_thw"][2] * 196 <= s.max_pixels   # capped by max_pixels
    assert huge["source_size"] == [1920, 1080] and index.list("portrait")[0]["source_size"] == [90, 160]

    client = redis_server.client()
    seg_events = client.xrange(SEGMENTS_STREAM)
    assert len(seg_events) == report.segments
    assert {e[1][b"segment_id"].decode() for e in seg_events} == {
        r["segment_id"] for src in expected for r in index.list(src)}
    # archive and live events share one shape (pipeline.indexing); an archive's names the file it came from
    fields = [{k.decode(): v.decode() for k, v in e[1].items()} for e in seg_events]
    assert all(f["live"] == "0" and f["model_id"] and int(f["tokens"]) > 0 for f in fields)
    by_id = {f["segment_id"]: f for f in fields}
    assert by_id["wide:0"]["path"] == str(good[0]) and by_id["wide:0"]["padded"] == "0"
    assert by_id["wide:0"]["thumbnail_url"] == "/v1/segments/wide%3A0/thumbnail"
    assert by_id["one:0"]["padded"] == "1"                          # one frame, repeated to make a tube
    err_events = client.xrange(ERRORS_STREAM)
    assert sorted(e[1][b"path"].decode() for e in err_events) == sorted(f["path"] for f in report.failed)

    # the stored tokens are the vision tower's output for exactly those frames (packing changed nothing)
    model = qwen2vl.load_pretrained(tiny_model)
    seg = segment_frames("wide", decode_window(str(good[0]), 2.0, 4.0, fps=s.fps, min_pixels=s.min_pixels,
                                               max_pixels=s.max_pixels), segment_seconds=2.0, fps=s.fps)[0]
    tubes = tubes_from_segment(seg)
    with torch.no_grad():
        direct = model.visual(torch.as_tensor(tubes.pixel_rows), torch.tensor([tubes.grid_thw]))
    stored = index.tokens(seg.segment_id)
    assert seg.segment_id == "wide:2000"
    assert stored.dtype == torch.float16 and stored.shape == direct.shape
    # the index stores fp16: the encoder normalises uint8 rows with one fused multiply-add, so its inputs
    # differ in the last fp32 bits, and an output can round to the neighbouring fp16 value (1 ulp = 2e-3 at |x| < 4)
    torch.testing.assert_close(stored.float(), direct.half().float(), atol=2e-3, rtol=0)

    # re-running is idempotent: nothing decoded or written again, everything counted as already indexed
    again = index_archive([str(p) for p in good], s, VisionEncoder, index=index, events=sink, progress=False)
    assert again.segments == 0 and again.skipped == report.segments and again.exit_code == 0
    sink.close()


def test_source_size_stands_like_the_decoded_frames():
    """A file marked as rotated decodes upright: its probed (stored) size is turned to match; no probe, no size."""
    import numpy as np

    portrait = [(0.0, np.zeros((308, 168, 3), np.uint8))]
    assert upright_size(320, 180, portrait) == (180, 320)
    assert upright_size(180, 320, portrait) == (180, 320)
    assert upright_size(100, 100, portrait) == (100, 100)
    assert upright_size(0, 0, portrait) is None and upright_size(320, 180, []) is None


def test_job_with_only_bad_input_exits_1(tmp_path, ray_local, tiny_model):
    s = _settings(tmp_path, tiny_model)
    report = index_archive([str(tmp_path / "nothing.mp4")], s, VisionEncoder, progress=False)
    assert report.exit_code == 1 and report.indexed == [] and report.segments == 0


def test_cli_index_json_and_segments(tmp_path, video_factory, redis_server, tiny_model):
    import os
    import subprocess
    import sys
    from pathlib import Path

    clip = video_factory("cam.mp4", width=160, height=90, fps=30, seconds=3.0)
    env = {k: v for k, v in os.environ.items() if not k.startswith("TUBESCOPE_")}
    env.update(TUBESCOPE_DATA_DIR=str(tmp_path / "data"), TUBESCOPE_MODEL_PATH=str(tiny_model),
               TUBESCOPE_SEGMENT_SECONDS="2", REDIS_URL=redis_server.url,
               TUBESCOPE_MAX_PIXELS=str(28 * 28 * 20), TUBESCOPE_MIN_PIXELS=str(28 * 28 * 4))
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-m", "deploy", "index", str(clip), str(tmp_path / "gone.mp4"),
                          "--source-id", "lobby", "--json"], cwd=root, env=env, capture_output=True, text=True,
                         timeout=200)
    assert out.returncode == 2, out.stderr[-3000:]
    assert out.stdout.lstrip().startswith("{"), (out.stdout[-2000:], out.stderr[-3000:])
    report = json.loads(out.stdout)
    assert report["indexed"] == [str(clip)] and report["segments"] == 2
    assert report["failed"] == [{"path": str(tmp_path / "gone.mp4"), "error": "no such file or directory"}]
    seg = subprocess.run([sys.executable, "-m", "deploy", "segments", "lobby", "--start", "1", "--end", "2.5",
                          "--json"], cwd=root, env=env, capture_output=True, text=True, timeout=60)
    assert seg.returncode == 0, seg.stderr
    rows = json.loads(seg.stdout)
    assert [r["segment_id"] for r in rows] == ["lobby:0", "lobby:2000"]
    # --reencode-long fills a smaller long tier for what is indexed, once (the default tier is the clip's own size)
    low = subprocess.run([sys.executable, "-m", "deploy", "index", str(clip), "--source-id", "lobby",
                          "--reencode-long"], cwd=root, env={**env, "TUBESCOPE_LONG_PIXELS": str(28 * 28 * 4)},
                         capture_output=True, text=True, timeout=200)
    assert low.returncode == 0 and "0 new segment(s)" in low.stdout and "2 long-tier file(s)" in low.stdout, \
        (low.stdout, low.stderr[-2000:])
    # the job's caption actor captioned every segment it wrote before the command exited: once each
    assert all(isinstance(r["caption"], str) for r in rows)
    captions = redis_server.client().xrange("tubescope:captions")
    assert sorted(e[b"segment_id"].decode() for _, e in captions) == ["lobby:0", "lobby:2000"]
    # backfill has nothing left to do; reindex rebuilds the retrieval index from the footage index
    back = subprocess.run([sys.executable, "-m", "deploy", "captions", "backfill", "lobby"], cwd=root, env=env,
                          capture_output=True, text=True, timeout=120)
    assert back.returncode == 0 and "captioned 0 segment(s); 0 still missing" in back.stdout, back.stderr[-2000:]
    shutil.rmtree(tmp_path / "data" / "index" / "_retrieval")
    again = subprocess.run([sys.executable, "-m", "deploy", "captions", "reindex"], cwd=root, env=env,
                           capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "retrieval index rebuilt: 2 caption(s)" in again.stdout, again.stderr[-2000:]
    seg = subprocess.run([sys.executable, "-m", "deploy", "segments", "lobby", "--json"], cwd=root, env=env,
                         capture_output=True, text=True, timeout=60)
    assert [r["caption"] for r in json.loads(seg.stdout)] == [r["caption"] for r in rows]
    env["TUBESCOPE_DATA_DIR"] = str(tmp_path / "typo")                 # a query never makes an index
    miss = subprocess.run([sys.executable, "-m", "deploy", "segments", "lobby", "--json"], cwd=root, env=env,
                          capture_output=True, text=True, timeout=60)
    assert miss.returncode == 1 and "index root" in miss.stderr and "Traceback" not in miss.stderr, miss.stderr
    assert not (tmp_path / "typo" / "index").exists()


def test_a_finished_job_applies_retention(tmp_path, video_factory, ray_local, tiny_model):
    clip = video_factory("kept.mp4", width=64, height=48, fps=10, seconds=4.0)
    s = _settings(tmp_path, tiny_model, retention_max_bytes=1)      # no segment fits: the sweep removes them all
    index = SegmentIndex(s.index_root)
    report = index_archive([str(clip)], s, VisionEncoder, index=index, progress=False)
    assert report.segments == 2 and report.exit_code == 0
    assert index.list("kept") == []


def test_expanded_paths_are_checked_against_the_roots_after_resolving_links(tmp_path):
    """A REST job's globs, folders and files may not reach outside file_roots through links; the failure names only
    the path as given, never what lies outside."""
    root, outside = tmp_path / "root", tmp_path / "secret"
    root.mkdir()
    outside.mkdir()
    (root / "a.mp4").write_bytes(b"x")
    (outside / "hidden-name.mp4").write_bytes(b"x")
    (root / "b.mp4").symlink_to(outside / "hidden-name.mp4")
    (root / "sub").symlink_to(outside, target_is_directory=True)
    for given in (str(root / "*.mp4"), str(root), str(root / "b.mp4"), str(root / "sub" / "*.mp4")):
        files, failed = expand_sources([given], file_roots=[root])
        assert all(f.startswith(str(root)) and "hidden" not in f for f in files), (given, files)
        assert [f["path"] for f in failed] == [given] and "outside the allowed roots" in failed[0]["error"]
        assert "hidden-name" not in json.dumps(failed)
    files, failed = expand_sources([str(root / "a.mp4")], file_roots=[root])
    assert files == [str(root / "a.mp4")] and failed == []
    files, _ = expand_sources([str(root / "*.mp4")])                        # trusted callers (the CLI): no roots
    assert len(files) == 2


def test_fifos_and_devices_are_failed_files_never_opened(tmp_path):
    """A FIFO (opening it blocks until a writer comes) or a device (/dev/zero never ends) among a job's paths is a
    failed path with the reason; the regular files beside it are indexed."""
    root = tmp_path / "root"
    root.mkdir()
    (root / "a.mp4").write_bytes(b"x")
    os.mkfifo(root / "cam.mp4")
    (root / "zero.mp4").symlink_to("/dev/zero")
    files, failed = expand_sources([str(root / "cam.mp4"), "/dev/zero"])
    assert files == [] and failed == [{"path": str(root / "cam.mp4"), "error": "a FIFO, not a regular file"},
                                      {"path": "/dev/zero", "error": "a character device, not a regular file"}]
    for given in (str(root), str(root / "*.mp4")):
        files, failed = expand_sources([given])
        assert files == [str(root / "a.mp4")], given
        assert failed == [{"path": given, "error": "2 of the entries it names are not regular files (FIFOs, "
                                                   "devices or sockets)"}], given
    files, failed = expand_sources([str(root)], file_roots=[root])      # the link to /dev/zero: outside the roots
    assert files == [str(root / "a.mp4")] and {f["path"] for f in failed} == {str(root)}
    assert any("outside the allowed roots" in f["error"] for f in failed)


def test_long_tier_written_by_jobs_and_filled_for_older_footage_once(tmp_path, video_factory, ray_local, tiny_model):
    from pipeline.long_tier import LongTier, long_file_name

    old = video_factory("old.mp4", width=160, height=90, fps=10, seconds=4.0)
    new = video_factory("new.mp4", width=160, height=90, fps=10, seconds=4.0)
    index = SegmentIndex(tmp_path / "data" / "index")
    before = index_archive([str(old)], _settings(tmp_path, tiny_model, long_pixels=0), VisionEncoder, index=index,
                           progress=False)
    assert before.segments == 2 and before.long_tier == 0
    s = _settings(tmp_path, tiny_model, long_pixels=28 * 28 * 4)
    rows = index.list("old")
    folder = index._dir("old")
    stamps = {i.base_name: i.mtime_ns for i in index._ls(folder)}
    tier = LongTier(index, s.long_pixels)
    assert tier.present(rows, rows[0]["model_id"]) == set()
    # a job with the tier on writes both tiers of new footage; a plain re-run leaves older footage alone
    both = index_archive([str(new), str(old)], s, VisionEncoder, index=index, progress=False)
    assert both.segments == 2 and both.long_tier == 2 and both.skipped == 2
    assert tier.present(rows, rows[0]["model_id"]) == set()
    # --reencode-long: the older footage gets its tier, its tokens stay as they were, and once is enough
    filled = index_archive([str(old)], s, VisionEncoder, index=index, progress=False, reencode_long=True)
    assert filled.segments == 0 and filled.long_tier == 2
    assert tier.present(rows, rows[0]["model_id"]) == {r["segment_id"] for r in rows}
    assert {n: m for n, m in ((i.base_name, i.mtime_ns) for i in index._ls(folder)) if n in stamps} == stamps
    again = index_archive([str(old)], s, VisionEncoder, index=index, progress=False, reencode_long=True)
    assert again.segments == 0 and again.long_tier == 0 and again.skipped == 2
    # the tier holds the job's frames resized: equal (to fp16 rounding) to encoding the resized rows directly
    from pipeline.tubes import long_grid, resize_rows

    frames = decode_window(str(old), 0.0, None, fps=s.fps, min_pixels=s.min_pixels, max_pixels=s.max_pixels)
    seg = segment_frames("old", frames, segment_seconds=2.0, fps=s.fps)[0]
    tubes = tubes_from_segment(seg, as_uint8=True)
    small = long_grid(tubes.grid_thw, s.long_pixels)
    enc = VisionEncoder(str(tiny_model), token_budget=300)
    direct = enc.encode([resize_rows(torch.from_numpy(tubes.pixel_rows), tubes.grid_thw, small)], [small])[0]
    stored = tier.tokens(rows[0], rows[0]["model_id"])
    torch.testing.assert_close(stored.float(), direct.float(), atol=2e-3, rtol=0)
    assert long_file_name(rows[0]["segment_id"], rows[0]["model_id"], s.long_pixels) in \
        {i.base_name for i in index._ls(folder)}
