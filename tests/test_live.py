"""Live feeds through the same tubes/encoder/index code as archives: real Ray, real Redis, real streams."""
from __future__ import annotations

import time

import pytest
import ray
import torch

import qwen2vl
from actors.feeds import FeedSupervisor
from pipeline.feeds import add_feed, remove_feed
from actors.live import LiveIndexer
from pipeline.events import SEGMENTS_STREAM
from pipeline.index import SegmentIndex
from pipeline.settings import load_settings
from pipeline.tubes import tubes_from_segment
from streams import free_tcp_port, make_stream_video, wait_for

SMALL_FEEDS = dict(segment_seconds=1.0, min_pixels=4 * 784, max_pixels=64 * 784,
                   backoff_initial_s=0.2, backoff_max_s=1.0, open_timeout_s=2.0, read_timeout_s=2.0)


@pytest.mark.timeout(180)
def test_live_feed_segments_are_indexed_within_seconds(ray_local, redis_server, tmp_path):
    model = qwen2vl.write_tiny_checkpoint(tmp_path / "tiny")
    settings = load_settings(data_dir=tmp_path / "data", model_path=model, segment_seconds=1.0,
                             min_pixels=4 * 784, max_pixels=64 * 784, feed_allow_hosts=["127.0.0.1"])
    r = redis_server.client()
    add_feed(r, str(make_stream_video(tmp_path / "lobby.mp4", seconds=3.0)), feed_id="lobby", settings=settings)
    add_feed(r, f"rtsp://127.0.0.1:{free_tcp_port()}/cam", feed_id="dead", settings=settings)   # refused, retried
    sup = FeedSupervisor(redis_server.url, settings, sampler_options=SMALL_FEEDS, events=False)
    indexer = LiveIndexer.remote(settings, str(model), redis_server.url)
    index = SegmentIndex(settings.index_root)
    try:
        assert ray.get(indexer.start.remote())      # the checkpoint is loaded before any reader starts
        sup.reconcile()
        entries = wait_for(lambda: (lambda e: e if len(e) >= 3 else None)(r.xrange(SEGMENTS_STREAM)), 60,
                           what="three live segments indexed")
        fields = [{k.decode(): v.decode() for k, v in e[1].items()} for e in entries]
        assert {f["source_id"] for f in fields} == {"lobby"} and all(f["live"] == "1" for f in fields)
        assert all(f["padded"] in ("0", "1") and f["model_id"] and "path" not in f for f in fields)
        # indexed within a few seconds of the segment's last frame (1-s segments, real-time playback)
        assert max(float(f["latency_s"]) for f in fields) < 5.0, fields
        rows = index.list("lobby")
        assert {row["segment_id"] for row in rows} >= {f["segment_id"] for f in fields}
        assert all(row["t0"] > time.time() - 120 for row in rows)           # epoch-stamped, not media time
        assert all(row["source_size"] == [320, 240] for row in rows)       # the feed's own frame size
        from pipeline.thumbnails import ThumbnailStore
        assert ThumbnailStore(index).present(f["segment_id"] for f in fields) == {f["segment_id"] for f in fields}
        assert all(f["thumbnail_url"].endswith("/thumbnail") for f in fields)
        status = ray.get(indexer.status.remote())
        assert status["running"] and status["segments"] >= 3 and status["errors"] == 0

        # the stored tokens are the vision tower's output for a live segment's frames
        lobby = sup.readers()["lobby"]
        seg = wait_for(lambda: (ray.get(lobby.next_segments.remote(1, 1.0)) or [None])[0], 30, what="a segment")
        tubes = tubes_from_segment(seg)
        vis = qwen2vl.load_pretrained(model).visual
        with torch.no_grad():
            direct = vis(torch.as_tensor(tubes.pixel_rows), torch.tensor([tubes.grid_thw]))
        from actors.encoder import VisionEncoder
        enc = VisionEncoder(str(model), token_budget=settings.encoder_token_budget)
        got = enc.encode([torch.from_numpy(tubes_from_segment(seg, as_uint8=True).pixel_rows)], [tubes.grid_thw])[0]
        # the index stores fp16: the encoder normalises uint8 rows with one fused multiply-add, so its inputs
        # differ in the last fp32 bits, and an output can round to the neighbouring fp16 value (1 ulp = 2e-3 at |x| < 4)
        torch.testing.assert_close(got.float(), direct.half().float(), atol=2e-3, rtol=0)

        # removing the feed stops its reader; the indexer keeps running
        remove_feed(r, "lobby")
        sup.reconcile()
        time.sleep(1.0)
        assert ray.get(indexer.status.remote())["running"]
    finally:
        ray.get(indexer.stop.remote(), timeout=60)
        ray.kill(indexer)
        sup.stop_all()


def test_live_encoder_count_shards_and_reservation():
    from actors.live import LIVE_INDEXER_CPUS, live_encoder_options
    from pipeline.live import live_encoder_count, shard_feeds

    assert [live_encoder_count(n, 8, 4) for n in (0, 1, 8, 9, 17, 100)] == [1, 1, 1, 2, 3, 4]
    assert live_encoder_count(5, 1, 1) == 1                     # bounded by what the cluster holds
    feeds = ["c", "a", "d", "b", "e"]
    shards = [shard_feeds(feeds, i, 2) for i in range(2)]
    assert shards == [["a", "c", "e"], ["b", "d"]]              # every feed once, balanced
    with pytest.raises(ValueError, match="live encoder 2 of 2 does not exist"):
        shard_feeds(feeds, 2, 2)
    # with GPUs in the cluster each actor reserves its GPU share, like an archive encoder; without, only its CPUs
    assert live_encoder_options(1.0, cluster_gpus=4.0) == {"num_cpus": LIVE_INDEXER_CPUS, "num_gpus": 1.0}
    assert live_encoder_options(0.5, cluster_gpus=1.0)["num_gpus"] == 0.5
    assert live_encoder_options(1.0, cluster_gpus=0.0) == {"num_cpus": LIVE_INDEXER_CPUS, "num_gpus": 0.0}


@pytest.mark.timeout(240)
def test_live_encoders_follow_the_feed_count_and_lose_no_segment(ray_local, redis_server, tmp_path):
    """One live encoder per feed (feeds_per_live_encoder=1): a second feed starts a second actor, which takes that
    feed over; removing the first feed removes an actor, whose feed moves back to the one left after it drained.
    The moved feed's segments have no gap across both moves."""
    from actors.live import LiveEncoderPool

    model = qwen2vl.write_tiny_checkpoint(tmp_path / "tiny")
    settings = load_settings(data_dir=tmp_path / "data", model_path=model, segment_seconds=1.0,
                             min_pixels=4 * 784, max_pixels=64 * 784, feeds_per_live_encoder=1)
    r = redis_server.client()
    video = str(make_stream_video(tmp_path / "lobby.mp4", seconds=2.0))
    sup = FeedSupervisor(redis_server.url, settings, sampler_options=SMALL_FEEDS, events=False)
    pool = LiveEncoderPool(settings, str(model), redis_server.url)
    index = SegmentIndex(settings.index_root)

    def indexed(feed_id: str, at_least: int):
        return wait_for(lambda: (lambda rows: rows if len(rows) >= at_least else None)(index.list(feed_id)), 60,
                        what=f"{at_least} segments of {feed_id}")

    def rescale() -> int:
        sup.reconcile()
        return pool.scale(len(sup.readers()))

    try:
        add_feed(r, video, feed_id="a", settings=settings)
        assert rescale() == 1
        add_feed(r, video, feed_id="b", settings=settings)
        sup.reconcile()
        before = len(indexed("b", 2))                              # pulled by the one actor so far
        assert pool.scale(len(sup.readers())) == 2
        status = pool.status()
        assert status["running"] and [a["shard"] for a in status["actors"]] == [[0, 2], [1, 2]]
        wait_for(lambda: pool.status()["actors"][1]["segments"] >= 2 or None, 60, what="the new actor indexing b")

        remove_feed(r, "a")
        assert rescale() == 1                                      # the actor pulling b drains and ends
        after = len(indexed("b", before + 6))
        status = pool.status()
        assert status["encoders"] == 1 and status["actors"][0]["shard"] == [0, 1] and not status["actors"][0]["lost"]
        t0s = sorted(row["t0"] for row in index.list("b"))
        gaps = [round(later - earlier, 3) for earlier, later in zip(t0s, t0s[1:]) if later - earlier > 1.05]
        assert not gaps, (gaps, after)
    finally:
        pool.stop()
        sup.stop_all()
