"""The index on a volume that misbehaves: a folder where a volume was not mounted is not an index, a vanished root
is an error rather than an empty index, a long-lived index sees other writers' adds, deletes and compactions, and a
read-only volume reports the failed write with its cause."""
from __future__ import annotations

import pytest

from pipeline import index_files
from pipeline.index import SegmentIndex
from test_index import MODEL, make_segment, same_bits


def test_an_unmounted_volume_leaves_an_empty_folder_that_is_not_an_index(tmp_path):
    """Unmounting leaves the bare mount point: it must not read as an empty index, nor take new writes."""
    mount = tmp_path / "mnt"
    ix = SegmentIndex(mount)
    assert (mount / index_files.MARKER).is_file() and ix.list("cam1") == []
    ix.add([make_segment("cam1", 0.0)])
    away = tmp_path / "volume-contents"
    mount.rename(away)
    mount.mkdir()                                               # what the host shows once the volume is unmounted
    (mount / "lost+found").mkdir()                              # a bare mount point is not always empty
    for index in (ix, SegmentIndex(mount, create=False)):
        for call in (lambda: index.list("cam1"), index.sources, index.stats, index.sweep,
                     lambda: index.add([make_segment("cam2", 8.0)]), lambda: index.delete("cam1")):
            with pytest.raises(index_files.IndexUnavailable):
                call()
    assert [p.name for p in mount.iterdir()] == ["lost+found"]   # nothing was written beneath the mount point
    (mount / "lost+found").rmdir()
    mount.rmdir()
    away.rename(mount)                                          # remounted
    assert [r["t0"] for r in SegmentIndex(mount, create=False).list("cam1")] == [0.0]


def test_a_long_lived_index_sees_other_writers_adds_deletes_and_compactions(tmp_path):
    """Listings reuse parsed metadata files, but never miss what another SegmentIndex did in between."""
    reader, writer = SegmentIndex(tmp_path), SegmentIndex(tmp_path)
    writer.add([make_segment("cam", 8.0 * k) for k in range(3)])
    assert [r["t0"] for r in reader.list("cam")] == [0.0, 8.0, 16.0]
    writer.add([make_segment("cam", 8.0 * k) for k in range(3, 40)])        # enough files to compact
    assert len(reader.list("cam")) == 40
    assert writer.delete("cam", before=80.0) == 10
    assert [r["t0"] for r in reader.list("cam")][:2] == [80.0, 88.0] and len(reader.list("cam")) == 30
    assert reader.list("cam") == SegmentIndex(tmp_path).list("cam")          # same as a fresh reader


def test_a_vanished_root_is_an_error_not_an_empty_index(tmp_path):
    root = tmp_path / "volume" / "index"
    ix = SegmentIndex(root)
    segs = [make_segment("cam1", t0) for t0 in (0.0, 8.0)]
    ix.add(segs)
    assert SegmentIndex(tmp_path / "fresh").list("cam1") == [] == SegmentIndex(tmp_path / "fresh").sources()
    away = tmp_path / "volume-unmounted"
    (tmp_path / "volume").rename(away)                          # the volume goes away under a running index
    for call in (lambda: ix.list("cam1"), lambda: ix.list("other"), ix.sources, ix.stats,
                 lambda: ix.tokens(segs[0].segment_id), lambda: ix.get(segs[0].segment_id),
                 lambda: ix.tokens(segs[0].segment_id, model_id=MODEL), lambda: ix.delete("cam1"),
                 lambda: ix.add([make_segment("cam1", 16.0)])):
        with pytest.raises(index_files.IndexUnavailable, match="index root .* is missing"):
            call()
    assert not (tmp_path / "volume").exists()                  # the failed add recreated nothing
    late = SegmentIndex(root, create=False)                     # a worker or replica started while it is away
    for call in (lambda: late.list("cam1"), lambda: late.add([make_segment("cam1", 16.0)]),
                 lambda: ix.delete("cam1", before=100.0), ix.sweep):
        with pytest.raises(index_files.IndexUnavailable, match="index root .* is missing"):
            call()
    assert not (tmp_path / "volume").exists()
    away.rename(tmp_path / "volume")                            # it comes back: everything indexed is still there
    assert [r["t0"] for r in ix.list("cam1")] == [0.0, 8.0]
    assert same_bits(ix.tokens(segs[1].segment_id), segs[1].tokens)
    with pytest.raises(KeyError):                               # a plain miss is still a KeyError
        ix.tokens("cam1:99000")


def test_a_read_only_index_reports_the_failed_write_and_its_cause(tmp_path):
    """The failed write is what surfaces, not the temp-file cleanup after it; /healthz's probe names it too."""
    from pipeline.index_health import IndexNotWritable, check_writable, write_error_text
    from services import read_only

    index = SegmentIndex(tmp_path / "ix")
    index.add([make_segment("cam", 0.0)])
    check_writable(index)
    with read_only(tmp_path / "ix") as cause:
        with pytest.raises(OSError) as info:
            index.add([make_segment("cam", 2.0)])
        assert "Cannot delete" not in str(info.value) and cause in str(info.value)
        assert write_error_text(info.value) == f"index not writable: {cause}"
        with pytest.raises(IndexNotWritable, match=f"index not writable: {cause}"):
            check_writable(index)
        assert len(index.list("cam")) == 1                       # reads go on
    index.add([make_segment("cam", 2.0)])
    assert len(index.list("cam")) == 2 and not [p for p in (tmp_path / "ix").rglob(".tmp-*")]
