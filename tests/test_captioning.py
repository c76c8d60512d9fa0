"""Captioning indexed footage (pipeline.captioning) with the tiny model, a real index, LanceDB and Redis.

Every segment gets exactly one caption, one vector, one retrieval row and one event; the in-memory backlog stays
bounded while footage keeps arriving; a captioner that fails mid-batch loses nothing and duplicates nothing; the
retrieval index is rebuilt from the footage index when it is missing or corrupt, and retention prunes it.
"""
from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import qwen2vl
from pipeline.captioner import Captioner
from pipeline.captioning import (CaptionFollower, CaptionWriter, LocalCaptioning, find_backlog, open_retrieval,
                                 prune_retrieval)
from pipeline.captions import CaptionStore
from pipeline.events import CAPTIONS_STREAM, ERRORS_STREAM, EventSink
from pipeline.index import SegmentIndex
from pipeline.records import IndexedSegment
from pipeline.retention import sweep_retention
from pipeline.retrieval import RetrievalIndex, RetrievalUnavailable
from pipeline.settings import Settings

pytestmark = pytest.mark.timeout(240)
WIDTH = 64                         # the tiny model's hidden size: stored tokens are that wide


@pytest.fixture(scope="module")
def captioner(tmp_path_factory):
    ckpt = qwen2vl.write_tiny_checkpoint(tmp_path_factory.mktemp("captioning") / "tiny")
    return Captioner(ckpt, device="cpu", max_new_tokens=6, batch_size=4)


def _segments(source: str, n: int, model_id: str, start: float = 0.0, seed: int = 0) -> list[IndexedSegment]:
    gen = torch.Generator().manual_seed(seed)
    return [IndexedSegment(segment_id="", source_id=source, t0=start + 8.0 * k, t1=start + 8.0 * k + 8.0,
                           grid_thw=(2, 4, 4), tube_ts=[start + 8.0 * k, start + 8.0 * k + 1.0],
                           tokens=(torch.randn(8, WIDTH, generator=gen) * 2).half().numpy(), model_id=model_id)
            for k in range(n)]


def _setup(tmp_path, captioner, redis_url=None):
    index = SegmentIndex(tmp_path / "index")
    store = CaptionStore(index)
    retrieval = open_retrieval(store, tmp_path / "index", captioner.model_id, captioner.hidden_size)
    events = EventSink(redis_url, tmp_path / "outbox") if redis_url else None
    return index, store, retrieval, events


def _caption_files(store, source) -> int:
    return store.count(source)


def test_every_segment_gets_one_caption_vector_row_and_event(tmp_path, captioner, redis_server):
    index, store, retrieval, events = _setup(tmp_path, captioner, redis_server.url)
    index.add(_segments("cam", 10, captioner.model_id), indexed_at=100.0)
    index.add(_segments("door", 5, captioner.model_id, seed=1), indexed_at=200.0)
    index.add(_segments("cam", 2, "other-model@1", start=1000.0), indexed_at=50.0)   # tokens of another checkpoint
    backlog = find_backlog(store, captioner.model_id, now=260.0)
    assert backlog.segments == 15 and backlog.lag_s == pytest.approx(160.0)            # the oldest waits since 100

    follower = CaptionFollower(store, LocalCaptioning(index, captioner), CaptionWriter(store, retrieval, events),
                               batch_size=4, queue_segments=6)
    assert follower.catch_up() == 15
    assert follower.queued_max <= 6 and follower.backlog.segments == 0
    assert store.count("cam") == 10 and store.count("door") == 5
    captions = {c.segment_id: c for s in ("cam", "door") for c in store.read(s)}
    assert len(captions) == 15 and {c.model_id for c in captions.values()} == {captioner.model_id}
    for c in captions.values():
        assert c.vector.shape == (WIDTH,) and abs(float(np.linalg.norm(c.vector)) - 1.0) < 1e-5
    assert retrieval.count() == 15
    assert retrieval.captions(["cam", "door"]) == {k: c.caption for k, c in captions.items()}
    events.flush()
    entries = redis_server.client().xrange(CAPTIONS_STREAM)
    assert sorted(e[b"segment_id"].decode() for _, e in entries) == sorted(captions)
    first = entries[0][1]
    assert first[b"caption"].decode() == captions[first[b"segment_id"].decode()].caption
    assert first[b"model_id"].decode() == captioner.model_id

    # batched captions equal one-at-a-time ones (the captioner's own guarantee, through the follower's batches)
    seg = index.get(sorted(captions)[3])
    assert captioner.describe([seg])[0][0] == captions[seg.segment_id].caption
    # nothing is redone: a second run writes nothing and announces nothing
    assert follower.catch_up() == 0
    events.flush()
    assert redis_server.client().xlen(CAPTIONS_STREAM) == 15
    events.close()


def test_the_backlog_stays_bounded_while_footage_keeps_arriving(tmp_path, captioner):
    index, store, retrieval, _ = _setup(tmp_path, captioner)
    follower = CaptionFollower(store, LocalCaptioning(index, captioner), CaptionWriter(store, retrieval),
                               batch_size=2, queue_segments=4, poll_s=0.05).start()
    try:
        for k in range(6):                                    # ingest keeps going, never waiting for captions
            index.add(_segments("lane", 5, captioner.model_id, start=40.0 * k, seed=k))
            time.sleep(0.02)
        deadline = time.monotonic() + 120
        while find_backlog(store, captioner.model_id).segments and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        follower.stop()
    assert find_backlog(store, captioner.model_id).segments == 0
    assert follower.queued_max <= 4                           # never more rows than the bound in memory
    assert follower.captioned == 30 == store.count("lane") == retrieval.count()


class FailsOn:
    """The tiny Captioner, made to fail whenever a batch holds one planted segment (a crash mid-batch)."""

    def __init__(self, captioner, bad_id: str):
        self.captioner, self.bad_id = captioner, bad_id
        self.model_id, self.hidden_size = captioner.model_id, captioner.hidden_size

    def describe(self, segments):
        if any(s.segment_id == self.bad_id for s in segments):
            raise RuntimeError("captioner crashed")
        return self.captioner.describe(segments)


def test_a_failing_batch_loses_nothing_and_duplicates_nothing(tmp_path, captioner, redis_server):
    index, store, retrieval, events = _setup(tmp_path, captioner, redis_server.url)
    segs = _segments("cam", 9, captioner.model_id)
    index.add(segs)
    bad = segs[4].segment_id
    flaky = CaptionFollower(store, LocalCaptioning(index, FailsOn(captioner, bad)),
                            CaptionWriter(store, retrieval, events), batch_size=4, queue_segments=100)
    assert flaky.catch_up() == 8                              # the other three of its batch were retried alone
    assert set(flaky.failed) == {bad} and bad in flaky.status()["last_error"]
    assert [r["segment_id"] for r in find_backlog(store, captioner.model_id).rows] == [bad]
    events.flush()
    errors = redis_server.client().xrange(ERRORS_STREAM)
    assert [e[b"segment_id"].decode() for _, e in errors if e[b"kind"] == b"caption_failed"] == [bad]
    # a later run (backfill) with a working captioner fills in just the missing one
    fixed = CaptionFollower(store, LocalCaptioning(index, captioner), CaptionWriter(store, retrieval, events))
    assert fixed.catch_up() == 1
    assert store.count("cam") == 9 == retrieval.count()
    events.flush()
    ids = [e[b"segment_id"].decode() for _, e in redis_server.client().xrange(CAPTIONS_STREAM)]
    assert len(ids) == len(set(ids)) == 9
    events.close()


def test_a_missing_or_corrupt_retrieval_index_is_rebuilt_from_the_footage_index(tmp_path, captioner):
    index, store, retrieval, _ = _setup(tmp_path, captioner)
    index.add(_segments("cam", 6, captioner.model_id))
    CaptionFollower(store, LocalCaptioning(index, captioner), CaptionWriter(store, retrieval)).catch_up()
    want = retrieval.captions(["cam"])
    folder = Path(retrieval.uri)
    shutil.rmtree(folder)
    with pytest.raises(RetrievalUnavailable):
        RetrievalIndex(tmp_path / "index").count()
    rebuilt = open_retrieval(store, tmp_path / "index", captioner.model_id, captioner.hidden_size)
    assert rebuilt.captions(["cam"]) == want
    for f in folder.rglob("*.manifest"):                      # a corrupt table: its manifests are garbage
        f.write_bytes(b"not a manifest")
    with pytest.raises(RetrievalUnavailable):
        RetrievalIndex(tmp_path / "index").count()
    again = open_retrieval(store, tmp_path / "index", captioner.model_id, captioner.hidden_size)
    assert again.captions(["cam"]) == want
    assert store.count("cam") == 6                           # the truth was never touched


def test_retention_removes_deleted_segments_from_the_retrieval_index(tmp_path, captioner):
    index, store, retrieval, _ = _setup(tmp_path, captioner)
    now = time.time()
    index.add(_segments("old", 3, captioner.model_id), indexed_at=now - 7200)
    index.add(_segments("cam", 4, captioner.model_id, seed=2), indexed_at=now - 7200)
    index.add(_segments("cam", 2, captioner.model_id, start=500.0, seed=3), indexed_at=now)
    CaptionFollower(store, LocalCaptioning(index, captioner), CaptionWriter(store, retrieval)).catch_up()
    assert retrieval.count() == 9
    settings = Settings(data_dir=tmp_path, index_dir=str(tmp_path / "index"), retention_max_age_hours=1.0)
    assert sweep_retention(index, settings) == 7
    assert sorted(retrieval.captions(["cam", "old"])) == sorted(r["segment_id"] for r in index.list("cam"))
    assert retrieval.source_ids() == ["cam"]
    assert prune_retrieval(index, retrieval) == 0            # nothing left to prune


def test_concurrent_writers_of_one_caption_write_it_once(tmp_path, captioner):
    """Two followers racing over the same backlog (a service and a backfill): one caption file per segment and
    one retrieval row per segment, whoever wins."""
    index, store, retrieval, _ = _setup(tmp_path, captioner)
    index.add(_segments("cam", 8, captioner.model_id))
    other = Captioner(captioner.model_path, device="cpu", max_new_tokens=6, batch_size=4)
    followers = [CaptionFollower(store, LocalCaptioning(index, c), CaptionWriter(store, retrieval), batch_size=2)
                 for c in (captioner, other)]
    threads = [threading.Thread(target=f.catch_up) for f in followers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert store.count("cam") == 8 == retrieval.count()


def test_a_separate_captioning_checkpoint_reads_the_main_ones_tokens(tmp_path, captioner):
    """caption_model_path: another checkpoint of the same width writes captions and vectors from the tokens the
    main checkpoint stored; its captions carry its own model id, and a search embeds queries with it."""
    from deploy.decoder import Decoder
    from pipeline.settings import load_settings

    other_ckpt = qwen2vl.write_tiny_checkpoint(tmp_path / "other", seed=11)
    other = Captioner(other_ckpt, device="cpu", max_new_tokens=6, batch_size=4)
    assert other.model_id != captioner.model_id and other.hidden_size == captioner.hidden_size
    index, store, _, _ = _setup(tmp_path, captioner)
    retrieval = open_retrieval(store, tmp_path / "index", other.model_id, other.hidden_size)
    index.add(_segments("cam", 5, captioner.model_id))              # tokens of the main checkpoint
    pool = LocalCaptioning(index, other, token_model_id=captioner.model_id)
    assert find_backlog(store, other.model_id, token_model_id=captioner.model_id).segments == 5
    assert find_backlog(store, other.model_id).segments == 0         # no tokens of its own in the index
    assert CaptionFollower(store, pool, CaptionWriter(store, retrieval)).catch_up() == 5
    assert {c.model_id for c in store.read("cam")} == {other.model_id}
    settings = load_settings(data_dir=tmp_path / "data", index_dir=str(tmp_path / "index"),
                             model_path=captioner.model_path, caption_model_path=other_ckpt)
    dec = Decoder(settings, captioner.model_path, index=index)
    assert dec.caption_model_id == other.model_id
    out = dec.search_window("a truck", ["cam"], limit=5)
    assert out["coverage"]["captioned"] == 5 and out["coverage"]["retrieval"] is True
    assert {r["caption"] for r in out["results"]} <= {c.caption for c in store.read("cam")}
