"""SegmentIndex on real Parquet files: round trips, idempotence, windows, odd source ids, concurrency, crashes,
retention; and the records it stores."""
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from pipeline import index_files
from pipeline.index import SegmentIndex
from pipeline.index_files import COMPACT_AFTER, data_file_name, escape_source
from pipeline.records import IndexedSegment, Segment, Tubes, segment_id_for, source_of

REPO = Path(__file__).resolve().parents[1]
MODEL = "tiny-qwen2vl@0123abcd"


def make_segment(source_id: str, t0: float, model_id: str = MODEL, dim: int = 16, grid=(2, 4, 6),
                 dur: float = 8.0) -> IndexedSegment:
    """Tokens are a pure function of (source, t0, model): tests and subprocesses can recompute them."""
    t, h, w = grid
    seed = int.from_bytes(f"{source_id}|{t0}|{model_id}".encode(), "little") % 2**32   # stable across processes
    bits = np.random.default_rng(seed).integers(0, 2**16, size=(t * h * w // 4, dim), dtype=np.uint16)
    bits[0, :4] = [0x7C00, 0xFC00, 0x8000, 0x0001]    # +inf, -inf, -0.0, smallest subnormal: must survive as bits
    return IndexedSegment(segment_id="", source_id=source_id, t0=t0, t1=t0 + dur, grid_thw=grid,
                          tube_ts=[t0 + i for i in range(t)], tokens=bits.view(np.float16), model_id=model_id)


def same_bits(a, b) -> bool:
    a = a.numpy() if hasattr(a, "numpy") else a
    return a.dtype == np.float16 and a.shape == b.shape and np.array_equal(a.view(np.uint16), b.view(np.uint16))


def data_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("seg-*.parquet"))


# ---- round trip and idempotence -----------------------------------------------------------------------------------
def test_files_written_before_source_sizes_still_read(tmp_path):
    """Data files and manifests of the schema without `source_size` list and load with it null; new ones keep it."""
    import pyarrow as pa

    ix = SegmentIndex(tmp_path)
    old_meta = pa.schema([f for f in index_files.META_SCHEMA if f.name != "source_size"])
    old = make_segment("cam1", 0.0)
    row = {k: v for k, v in old.to_row().items() if k != "source_size"}
    folder = tmp_path / escape_source("cam1")
    folder.mkdir()
    pq.write_table(pa.Table.from_pylist([{**row, "indexed_at": 1.0}],
                                        schema=old_meta.append(pa.field("tokens", pa.binary()))),
                   folder / data_file_name(old.segment_id, MODEL))
    pq.write_table(pa.Table.from_pylist([{**{k: v for k, v in row.items() if k != "tokens"}, "indexed_at": 1.0,
                                          "file": data_file_name(old.segment_id, MODEL)}],
                                        schema=old_meta.append(pa.field("file", pa.string()))),
                   folder / "_manifest-00000000000000000001-old.parquet")
    new = make_segment("cam1", 8.0)
    new.source_size = (1920, 1080)
    ix.add([new])
    assert [r["source_size"] for r in ix.list("cam1")] == [None, [1920, 1080]]
    assert ix.get("cam1:0").source_size is None and ix.get("cam1:8000").source_size == (1920, 1080)
    assert same_bits(ix.tokens("cam1:0"), old.tokens)


def test_add_list_tokens_round_trip_is_bit_exact(tmp_path):
    import torch   # here, not at module level: the writer subprocesses import this module
    ix = SegmentIndex(tmp_path)
    segs = [make_segment("cam1", t0) for t0 in (16.0, 0.0, 8.0)]
    assert ix.add(segs) == 3
    rows = ix.list("cam1")
    assert [r["t0"] for r in rows] == [0.0, 8.0, 16.0]                # sorted by t0 whatever the add order
    r = rows[1]
    assert "tokens" not in r
    assert r["segment_id"] == "cam1:8000" == segment_id_for("cam1", 8.0)
    assert (r["source_id"], r["t1"], r["grid_thw"], r["tube_ts"], r["model_id"]) == \
           ("cam1", 16.0, (2, 4, 6), [8.0, 9.0], MODEL)
    assert (r["n_tokens"], r["token_dim"]) == (12, 16) and r["bytes"] > 12 * 16 * 2
    for s in segs:
        tok = ix.tokens(s.segment_id)
        assert isinstance(tok, torch.Tensor) and tok.dtype == torch.float16
        assert same_bits(tok, s.tokens)
        assert same_bits(ix.tokens(s.segment_id, model_id=MODEL, as_numpy=True), s.tokens)
        got = ix.get(s.segment_id)
        assert (got.segment_id, got.t0, got.t1, got.grid_thw, got.tube_ts, got.model_id) == \
               (s.segment_id, s.t0, s.t1, s.grid_thw, s.tube_ts, s.model_id)
        assert same_bits(got.tokens, s.tokens)
    # a second SegmentIndex on the same root (another process, later) sees the same
    assert [r["segment_id"] for r in SegmentIndex(str(tmp_path)).list("cam1")] == [r["segment_id"] for r in rows]


def test_re_adding_writes_nothing_and_models_are_kept_apart(tmp_path):
    ix = SegmentIndex(tmp_path)
    segs = [make_segment("cam1", 8.0 * k) for k in range(3)]
    assert ix.add(segs) == 3
    files = {p: p.stat().st_mtime_ns for p in data_files(tmp_path)}
    assert ix.add(segs) == 0
    assert ix.add(segs + [make_segment("cam1", 24.0)]) == 1
    assert ix.add([make_segment("cam1", 32.0)] * 2) == 1               # a repeat inside one call is written once
    assert {p: p.stat().st_mtime_ns for p in data_files(tmp_path) if p in files} == files   # untouched
    assert len(ix.list("cam1")) == 5

    other = make_segment("cam1", 8.0, model_id="other-model@ffff", dim=8)
    assert ix.add([other]) == 1                                         # same segment, another model: a new entry
    assert [r["model_id"] for r in ix.list("cam1", 8.0, 16.0)] == ["other-model@ffff", MODEL]   # t0, then model_id
    assert len(ix.list("cam1", model_id=MODEL)) == 5
    with pytest.raises(ValueError, match="several models"):
        ix.tokens("cam1:8000")
    assert same_bits(ix.tokens("cam1:8000", model_id="other-model@ffff"), other.tokens)
    assert same_bits(ix.tokens("cam1:8000", model_id=MODEL), segs[1].tokens)
    with pytest.raises(KeyError):
        ix.tokens("cam1:8000", model_id="never-indexed")
    with pytest.raises(KeyError):
        ix.get("cam1:999")


def test_window_overlap_semantics(tmp_path):
    ix = SegmentIndex(tmp_path)
    ix.add([make_segment("cam1", t0) for t0 in (0.0, 8.0, 16.0)])      # [0,8) [8,16) [16,24)

    def t0s(start=None, end=None):
        return [r["t0"] for r in ix.list("cam1", start, end)]

    assert t0s() == [0.0, 8.0, 16.0]
    assert t0s(8.0, 16.0) == [8.0]                      # half-open: touching at an end is not overlap
    assert t0s(7.9, 8.1) == [0.0, 8.0]
    assert t0s(16.0, None) == [16.0]
    assert t0s(None, 8.0) == [0.0]
    assert t0s(8.0, 8.0) == [8.0]                       # a point: the segment containing it
    assert t0s(23.999, 23.999) == [16.0]
    assert t0s(24.0, 30.0) == [] and t0s(-5.0, 0.0) == []
    assert ix.list("no-such-source") == []
    with pytest.raises(ValueError, match="end"):
        ix.list("cam1", 10.0, 5.0)
    with pytest.raises(ValueError, match="start"):
        ix.list("cam1", "yesterday")


# ---- partitioning --------------------------------------------------------------------------------------------
ODD_IDS = ["cams/lobby/1", "front door cam", "カメラ:東", "../escape", "a%2Fb", "a/b", ".", "rtsp://10.0.0.7:554/s"]


def test_partitioned_by_source_with_odd_ids(tmp_path):
    root = tmp_path / "index"
    ix = SegmentIndex(root)
    for k, sid in enumerate(ODD_IDS):
        assert ix.add([make_segment(sid, 8.0 * j) for j in range(k % 3 + 1)]) == k % 3 + 1
    # one folder per source, all directly under root: nothing escaped the index, no two ids share a folder
    folders = sorted(p.name for p in root.iterdir() if p.name != index_files.MARKER)
    assert folders == sorted(escape_source(s) for s in ODD_IDS) and len(set(folders)) == len(ODD_IDS)
    assert all(p.parent.parent == root for p in data_files(root))
    assert not (tmp_path / "escape").exists()
    assert [(s["source_id"], s["segments"]) for s in ix.sources()] == \
           sorted((sid, k % 3 + 1) for k, sid in enumerate(ODD_IDS))
    for k, sid in enumerate(ODD_IDS):
        rows = ix.list(sid)
        assert [r["source_id"] for r in rows] == [sid] * (k % 3 + 1)
        assert source_of(rows[-1]["segment_id"]) == sid
        assert same_bits(ix.tokens(rows[-1]["segment_id"]), make_segment(sid, rows[-1]["t0"]).tokens)
    sizes = ix.sizes()
    assert set(sizes) == set(ODD_IDS) and all(v > 0 for v in sizes.values())
    assert ix.stats() == {"sources": len(ODD_IDS), "segments": sum(k % 3 + 1 for k in range(len(ODD_IDS))),
                          "bytes": sum(sizes.values())}
    # plain pyarrow reads it as a hive-partitioned dataset and decodes the folder names back to the ids
    table = pads.dataset(root, format="parquet", partitioning="hive").to_table(columns=["source", "source_id"])
    assert all(a == b for a, b in zip(table.column("source").to_pylist(), table.column("source_id").to_pylist()))
    with pytest.raises(ValueError, match="too long"):
        ix.add([make_segment("x" * 300, 0.0)])
    with pytest.raises(ValueError, match="source_id"):
        ix.list("")


def test_pyarrow_fs_uri_roots(tmp_path):
    ix = SegmentIndex(f"file://{tmp_path}/by-uri")
    seg = make_segment("cam 1", 4.0)
    assert ix.add([seg]) == 1 and ix.add([seg]) == 0
    assert (tmp_path / "by-uri" / escape_source("cam 1")).is_dir()
    assert same_bits(ix.tokens(seg.segment_id), seg.tokens)
    mem = SegmentIndex("mock:///idx")                    # pyarrow's in-memory filesystem: the non-local code path
    assert mem.add([seg, make_segment("cam 1", 12.0)]) == 2
    assert [r["t0"] for r in mem.list("cam 1", 10.0, 11.0)] == [4.0]
    assert mem.delete("cam 1", before=12.0) == 1 and [r["t0"] for r in mem.list("cam 1")] == [12.0]
    assert mem.delete("cam 1") == 1 and mem.sources() == []
    with pytest.raises(ValueError, match="URI"):
        SegmentIndex("nosuchscheme://bucket/x")


# ---- listing cost ----------------------------------------------------------------------------------------------
def test_listing_does_not_read_token_bytes(tmp_path):
    ix = SegmentIndex(tmp_path)
    segs = [make_segment("cam1", 8.0 * k, dim=64) for k in range(3)]
    ix.add(segs)
    assert len(segs) < COMPACT_AFTER                   # no manifest yet: listing reads the data files themselves
    for path in data_files(tmp_path):                  # wreck the tokens column chunk of every data file
        meta = pq.ParquetFile(path).metadata.row_group(0)
        col = next(meta.column(i) for i in range(meta.num_columns) if meta.column(i).path_in_schema == "tokens")
        start = min(o for o in (col.dictionary_page_offset, col.data_page_offset) if o is not None)
        with open(path, "r+b") as f:
            f.seek(start)
            f.write(b"\xff" * col.total_compressed_size)
    rows = ix.list("cam1")                             # metadata columns only: still fine
    assert [r["t0"] for r in rows] == [0.0, 8.0, 16.0] and rows[0]["n_tokens"] == 12
    with pytest.raises(Exception):                     # while the token bytes really are unreadable
        ix.tokens(segs[0].segment_id)


class CountingFS(pafs.FileSystemHandler):
    """A real local filesystem behind pyarrow's PyFileSystem, counting opened files."""

    def __init__(self):
        self.local, self.opened = pafs.LocalFileSystem(), []

    def get_type_name(self): return "counting"
    def normalize_path(self, path): return path
    def get_file_info(self, paths): return self.local.get_file_info(paths)
    def get_file_info_selector(self, selector): return self.local.get_file_info(selector)
    def create_dir(self, path, recursive): self.local.create_dir(path, recursive=recursive)
    def delete_dir(self, path): self.local.delete_dir(path)
    def delete_dir_contents(self, path, missing_dir_ok=False): self.local.delete_dir_contents(path, missing_dir_ok)
    def delete_root_dir_contents(self): raise OSError("not here")
    def delete_file(self, path): self.local.delete_file(path)
    def move(self, src, dest): self.local.move(src, dest)
    def copy_file(self, src, dest): self.local.copy_file(src, dest)
    def open_output_stream(self, path, metadata): return self.local.open_output_stream(path)
    def open_append_stream(self, path, metadata): return self.local.open_append_stream(path)

    def open_input_stream(self, path):
        self.opened.append(path)
        return self.local.open_input_stream(path)

    def open_input_file(self, path):
        self.opened.append(path)
        return self.local.open_input_file(path)


def test_listing_thousands_reads_manifests_not_segment_files(tmp_path):
    handler = CountingFS()
    ix = SegmentIndex(str(tmp_path), filesystem=pafs.PyFileSystem(handler))
    n = 1200
    segs = [make_segment("cam1", 8.0 * k, dim=4, grid=(2, 2, 2)) for k in range(n)]
    assert ix.add(segs[:1000]) == 1000 and ix.add(segs[1000:]) == n - 1000
    handler.opened.clear()
    t = time.perf_counter()
    rows = ix.list("cam1", 800.0, 1600.0)
    elapsed = time.perf_counter() - t
    assert [r["t0"] for r in rows] == [8.0 * k for k in range(100, 200)]
    assert all("_manifest-" in Path(p).name for p in handler.opened), handler.opened[:5]
    assert 1 <= len(handler.opened) <= 2
    assert elapsed < 1.0, elapsed                       # ~0.05 s here; reading 1200 files is ~1 s or more
    ix.add([make_segment("cam1", 8.0 * n + 8.0 * k, dim=4, grid=(2, 2, 2)) for k in range(3)])
    handler.opened.clear()
    assert len(ix.list("cam1")) == n + 3
    assert sum("seg-" in Path(p).name for p in handler.opened) == 3   # only the files no manifest covers yet


# ---- concurrency and crashes --------------------------------------------------------------------------------------
WRITER = textwrap.dedent("""
    import os, sys, time
    sys.path.insert(0, {repo!r}); sys.path.insert(0, {tests!r})
    from test_index import make_segment
    from pipeline.index import SegmentIndex
    root, first, go = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    ix = SegmentIndex(root)
    while not os.path.exists(go):
        time.sleep(0.005)
    ks = list(range(first, first + 60)) + list(range(1000, 1010))   # 60 own segments + 10 both writers add
    for i in range(0, len(ks), 5):
        ix.add([make_segment("shared cam", 8.0 * k) for k in ks[i:i + 5]])
""")


def test_two_processes_adding_concurrently_lose_nothing(tmp_path):
    root, go = tmp_path / "index", tmp_path / "go"
    code = WRITER.format(repo=str(REPO), tests=str(REPO / "tests"))
    procs = [subprocess.Popen([sys.executable, "-c", code, str(root), str(first), str(go)])
             for first in (0, 100)]
    time.sleep(0.5)
    go.touch()
    assert [p.wait(timeout=60) for p in procs] == [0, 0]
    ix = SegmentIndex(root)
    want = sorted([8.0 * k for k in range(60)] + [8.0 * k for k in range(100, 160)] +
                  [8.0 * k for k in range(1000, 1010)])
    rows = ix.list("shared cam")
    assert [r["t0"] for r in rows] == want                          # every segment once: none lost, none doubled
    for r in rows[::7]:
        assert same_bits(ix.tokens(r["segment_id"]), make_segment("shared cam", r["t0"]).tokens)
    assert ix.stats()["segments"] == len(want)


CRASHER = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, {repo!r}); sys.path.insert(0, {tests!r})
    from test_index import make_segment
    from pipeline.index import SegmentIndex
    ix = SegmentIndex(sys.argv[1])
    ix.add([make_segment("cam1", 0.0)])
    def die(src, dst):                      # the worst moment: bytes on disk, not yet renamed into place
        os.kill(os.getpid(), signal.SIGKILL)
    os.replace = die
    ix.add([make_segment("cam1", 8.0)])
""")


def test_crash_mid_write_leaves_nothing_visible(tmp_path):
    root = tmp_path / "index"
    code = CRASHER.format(repo=str(REPO), tests=str(REPO / "tests"))
    proc = subprocess.run([sys.executable, "-c", code, str(root)], timeout=60)
    assert proc.returncode == -9                                       # it really died mid-write
    folder = root / escape_source("cam1")
    leftovers = [p for p in folder.iterdir() if p.name.startswith(".tmp-")]
    assert len(leftovers) == 1 and leftovers[0].stat().st_size > 0
    ix = SegmentIndex(root)
    assert [r["t0"] for r in ix.list("cam1")] == [0.0]                 # the half-done segment is not there
    assert ix.stats()["segments"] == 1
    with pytest.raises(KeyError):
        ix.tokens("cam1:8000")
    assert ix.add([make_segment("cam1", 0.0), make_segment("cam1", 8.0)]) == 1   # the re-run does what is missing
    assert same_bits(ix.tokens("cam1:8000"), make_segment("cam1", 8.0).tokens)
    assert ix.sweep(now=time.time()) == 0 and leftovers[0].exists()   # a fresh temp may be a live write
    assert ix.sweep(now=time.time() + 2 * index_files.STALE_TMP_S) == 0
    assert not leftovers[0].exists()                                   # an old one is a crash leftover


# ---- deletion and retention --------------------------------------------------------------------------------------
def test_delete_and_retention_sweep(tmp_path):
    ix = SegmentIndex(tmp_path)
    ix.add([make_segment("old", 8.0 * k) for k in range(4)], indexed_at=1000.0)
    ix.add([make_segment("new", 8.0 * k) for k in range(4)], indexed_at=2000.0)
    ix.add([make_segment("keep", 8.0 * k) for k in range(2)], indexed_at=1000.0)

    # age: one limit for all sources
    assert ix.sweep(max_age_s=500.0, now=2100.0) == 6                  # old and keep were indexed at 1000 < 1600
    assert [s["source_id"] for s in ix.sources()] == ["new"]
    ix.add([make_segment("keep", 8.0 * k) for k in range(2)], indexed_at=1000.0)
    ix.add([make_segment("old", 8.0 * k) for k in range(2)], indexed_at=1000.0)
    # age per source: unmapped sources keep everything
    assert ix.sweep(max_age_s={"old": 500.0}, now=2100.0) == 2
    assert [s["source_id"] for s in ix.sources()] == ["keep", "new"]

    # size: the oldest-indexed go first until the data fits
    ix.add([make_segment("later", 8.0 * k) for k in range(3)], indexed_at=3000.0)
    sizes = ix.sizes()
    budget = sizes["later"] + sizes["new"] // 2 + 1
    n_before = ix.stats()["segments"]
    deleted = ix.sweep(max_bytes=budget, now=3100.0)
    assert ix.stats()["bytes"] <= budget
    assert ix.stats()["segments"] == n_before - deleted
    assert "keep" not in ix.sizes()                                     # indexed at 1000: first to go
    assert len(ix.list("later")) == 3                                   # the newest are kept
    assert [r["t0"] for r in ix.list("new")] == [8.0 * k for k in range(4)][-len(ix.list("new")):]
    left = ix.stats()["segments"]
    assert left > 0 and ix.sweep(max_bytes=0) == left and ix.stats()["segments"] == 0

    ix.add([make_segment("cam", 8.0 * k) for k in range(5)])
    assert ix.delete("cam", before=16.0) == 2                           # [0,8) and [8,16) end by 16
    assert [r["t0"] for r in ix.list("cam")] == [16.0, 24.0, 32.0]
    assert ix.delete("cam") == 3 and ix.list("cam") == [] and ix.sources() == []
    assert not (tmp_path / escape_source("cam")).exists()
    assert ix.add([make_segment("cam", 0.0)]) == 1                      # deleted segments can be indexed again
    with pytest.raises(ValueError, match="max_bytes"):
        ix.sweep(max_bytes=-1)
    with pytest.raises(ValueError, match="max_age_s"):
        ix.sweep(max_age_s="a week")


# ---- records -----------------------------------------------------------------------------------------------------
def test_records_validate_and_round_trip(tmp_path):
    import torch
    assert segment_id_for("cam:1", 1.0049) == "cam:1:1005" and source_of("cam:1:1005") == "cam:1"
    frames = np.zeros((4, 28, 56, 3), np.uint8)
    seg = Segment("cam", "", 2.0, 4.0, [2.0, 2.5, 3.0, 3.5], frames, padded=True)
    assert seg.segment_id == "cam:2000" and seg.padded
    tubes = Tubes("cam:2000", "cam", 2.0, 4.0, np.zeros((2 * 2 * 4, 1176), np.float32), (2, 2, 4), [2.0, 3.0])
    back = Tubes.from_row(tubes.to_row())
    assert back.grid_thw == (2, 2, 4) and back.tube_ts == [2.0, 3.0] and np.array_equal(back.pixel_rows,
                                                                                        tubes.pixel_rows)
    ix_seg = make_segment("cam", 2.0)
    again = IndexedSegment.from_row(ix_seg.to_row())
    assert again.segment_id == ix_seg.segment_id and same_bits(again.tokens, ix_seg.tokens)
    as_torch = IndexedSegment("", "cam", 2.0, 10.0, (2, 4, 6), [2.0, 3.0], torch.from_numpy(ix_seg.tokens), MODEL)
    assert same_bits(as_torch.tokens, ix_seg.tokens)

    with pytest.raises(ValueError, match="even"):
        Segment("cam", "", 0.0, 1.0, [0.0, 0.5, 1.0], frames[:3])
    with pytest.raises(ValueError, match="frame_ts"):
        Segment("cam", "", 0.0, 1.0, [0.0], frames[:2])
    with pytest.raises(ValueError, match="uint8"):
        Segment("cam", "", 0.0, 1.0, [0.0, 0.5], frames[:2].astype(np.float32))
    with pytest.raises(ValueError, match="does not match"):
        Segment("cam", "cam:1", 0.0, 1.0, [0.0, 0.5], frames[:2])
    with pytest.raises(ValueError, match="t1"):
        Segment("cam", "", 5.0, 1.0, [0.0, 0.5], frames[:2])
    with pytest.raises(ValueError, match="pixel_rows"):
        Tubes("", "cam", 2.0, 4.0, np.zeros((10, 1176), np.float32), (2, 2, 4), [2.0, 3.0])
    with pytest.raises(ValueError, match="tube_ts"):
        Tubes("", "cam", 2.0, 4.0, np.zeros((16, 1176), np.float32), (2, 2, 4), [2.0])
    with pytest.raises(ValueError, match="even"):
        Tubes("", "cam", 2.0, 4.0, np.zeros((6, 1176), np.float32), (2, 1, 3), [2.0, 3.0])
    with pytest.raises(ValueError, match="float16"):
        IndexedSegment("", "cam", 2.0, 10.0, (2, 4, 6), [2.0, 3.0], ix_seg.tokens.astype(np.float32), MODEL)
    with pytest.raises(ValueError, match=r"\[12, D>0\]"):
        IndexedSegment("", "cam", 2.0, 10.0, (2, 4, 6), [2.0, 3.0], ix_seg.tokens[:5], MODEL)
    with pytest.raises(ValueError, match="model_id"):
        IndexedSegment("", "cam", 2.0, 10.0, (2, 4, 6), [2.0, 3.0], ix_seg.tokens, "")
    with pytest.raises(ValueError, match="source_id"):
        segment_id_for("", 0.0)
    with pytest.raises(ValueError, match="segment_id"):
        source_of("no-colon")
    with pytest.raises(ValueError, match="IndexedSegment"):
        SegmentIndex(tmp_path).add([{"segment_id": "cam:0"}])
    assert data_file_name("cam:0", "m") != data_file_name("cam:0", "n") != data_file_name("cam:8000", "m")
