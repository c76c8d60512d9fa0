"""Live ingest under faults, with real Ray, a real redis-server the tests stop and restart, real file feeds and a real
read-only index volume: a stuck reader, a Redis outage longer than the readers' queues, an unwritable index, a Redis
that comes back empty. Each test prints a FAULT-ROW line (fault, indexed, events, lost, duplicated, recover_s).
"""
from __future__ import annotations

import logging
import threading
import time
from collections import Counter

import numpy as np
import pytest
import ray

import qwen2vl
from actors.feeds import NAMESPACE, FeedReader, FeedSupervisor, reader_name
from actors.live import LiveIndexer
from pipeline.events import ERRORS_STREAM, SEGMENTS_STREAM
from pipeline.feeds import add_feed, get_feed, list_feeds, remove_feed
from pipeline.index import SegmentIndex
from pipeline.records import Segment
from pipeline.redis_server import RedisServer
from pipeline.registry_copy import COPY_NAME
from pipeline.settings import load_settings
from services import read_only
from streams import make_stream_video, wait_for

SMALL_FEEDS = dict(segment_seconds=1.0, min_pixels=4 * 784, max_pixels=64 * 784,
                   backoff_initial_s=0.2, backoff_max_s=1.0, open_timeout_s=2.0, read_timeout_s=2.0)
pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return qwen2vl.write_tiny_checkpoint(tmp_path_factory.mktemp("live-faults") / "tiny")


@pytest.fixture(scope="module")
def feed_video(tmp_path_factory):
    return make_stream_video(tmp_path_factory.mktemp("live-video") / "cam.mp4", seconds=3.0)


class Live:
    """One test's live path: settings, index, readers started by name, the LiveIndexer; all stopped at the end."""

    def __init__(self, tmp_path, model, redis_url):
        self.settings = load_settings(data_dir=tmp_path / "data", model_path=model, segment_seconds=1.0,
                                      min_pixels=4 * 784, max_pixels=64 * 784, feed_queue_segments=4)
        self.index = SegmentIndex(self.settings.index_root)
        self.redis_url = redis_url
        self.actors: list = []
        self.indexer = None

    def reader(self, feed: dict):
        actor = FeedReader.options(name=reader_name(feed["id"]), namespace=NAMESPACE).remote(
            feed, self.settings, SMALL_FEEDS, None)
        self.actors.append(actor)
        return actor

    def start_indexer(self):
        self.indexer = LiveIndexer.remote(self.settings, str(self.settings.model_path), self.redis_url)
        assert ray.get(self.indexer.start.remote())
        return self.indexer

    def status(self) -> dict:
        return ray.get(self.indexer.status.remote(), timeout=30)

    def rows(self, source: str) -> list[str]:
        return [r["segment_id"] for r in self.index.list(source)]

    def close(self):
        if self.indexer is not None:
            ray.get(self.indexer.stop.remote(), timeout=60)
            ray.kill(self.indexer)
        for actor in self.actors:
            ray.kill(actor)


@pytest.fixture
def live(tmp_path, tiny_model):
    made = []

    def make(redis_url):
        made.append(Live(tmp_path, tiny_model, redis_url))
        return made[-1]

    yield make
    for one in made:
        one.close()


def entries(client, stream: str, **match) -> list[dict]:
    out = [{k.decode(): v.decode() for k, v in e[1].items()} for e in client.xrange(stream)]
    return [f for f in out if all(f.get(k) == v for k, v in match.items())]


def row(fault: str, indexed: int, events: int, lost: int, duplicated: int, recover_s: float | None) -> None:
    print(f"\nFAULT-ROW | {fault} | {indexed} | {events} | {lost} | {duplicated} | "
          f"{'-' if recover_s is None else f'{recover_s:.1f}'} |")


@ray.remote(num_cpus=0, max_concurrency=4)
class SlowReader:
    """A reader whose first pull answers after `delay_s` with one segment, and whose later pulls never answer (a
    reader stuck in a call, or one Ray cannot schedule)."""

    def __init__(self, feed_id: str, delay_s: float):
        self.feed_id, self.delay_s, self.calls = feed_id, delay_s, 0

    def next_segments(self, max_n: int, timeout_s: float) -> list[Segment]:
        self.calls += 1
        if self.calls > 1:
            threading.Event().wait(3600)
        time.sleep(self.delay_s)
        t0 = float(int(time.time()))
        frames = np.full((2, 56, 56, 3), 128, np.uint8)
        return [Segment(source_id=self.feed_id, segment_id="", t0=t0, t1=t0 + 1.0, frame_ts=[t0, t0 + 0.5],
                        frames=frames)]


def test_a_stuck_reader_delays_no_other_feed_and_its_late_reply_is_indexed(ray_local, redis_server, live,
                                                                           feed_video):
    r = redis_server.client()
    lv = live(redis_server.url)
    good = add_feed(r, str(feed_video), feed_id="quick", settings=lv.settings)
    add_feed(r, "rtsp://10.0.0.9/stuck", feed_id="stuck", settings=lv.settings)
    lv.start_indexer()
    lv.reader(good)
    stuck = SlowReader.options(name=reader_name("stuck"), namespace=NAMESPACE).remote("stuck", 12.0)
    lv.actors.append(stuck)
    t0 = time.monotonic()
    # while the stuck reader holds its first pull (12 s, beyond any per-reader timeout), the other feed flows
    quick = wait_for(lambda: (lambda e: e if len(e) >= 6 else None)(entries(r, SEGMENTS_STREAM, source_id="quick")),
                     11, what="six segments of the quick feed while the other reader is stuck")
    assert time.monotonic() - t0 < 12.0
    latencies = [float(f["latency_s"]) for f in quick]
    assert max(latencies) < 3.0, latencies                       # 1-s segments: about a round, not ~10 s
    # the late reply is taken in a later round, not thrown away; the next pull stays outstanding, alone
    late = wait_for(lambda: lv.rows("stuck"), 30, what="the stuck reader's late segment indexed")
    assert len(late) == 1 and len(entries(r, SEGMENTS_STREAM, source_id="stuck")) == 1
    st = wait_for(lambda: (lambda s: s if s["pending_pulls"] == ["stuck"] else None)(lv.status()), 10,
                  what="one pull outstanding for the stuck feed")
    assert st["lost"] == {} and st["errors"] == 0
    ids = [f["segment_id"] for f in entries(r, SEGMENTS_STREAM)]
    row("stuck reader (12 s, then hung)", len(lv.rows("quick")) + len(late), len(ids), 0,
        len(ids) - len(set(ids)), None)
    assert len(ids) == len(set(ids))


def test_live_ingest_rides_out_a_redis_outage_longer_than_the_reader_queue(ray_local, tmp_path, live, feed_video):
    server = RedisServer(tmp_path / "redis", prefer_system=True, persist=True).start()   # the outage, not data loss
    try:
        r = server.client()
        lv = live(server.url)
        feed = add_feed(r, str(feed_video), feed_id="outage", settings=lv.settings)
        lv.start_indexer()
        reader = lv.reader(feed)
        wait_for(lambda: len(entries(r, SEGMENTS_STREAM)) >= 2, 60, what="two segments before the outage")
        server.stop()
        before = len(lv.rows("outage"))
        # 7 one-second segments: more than the reader's queue of 4 holds, so only indexing keeps them
        wait_for(lambda: len(lv.rows("outage")) >= before + 7, 30, what="segments indexed while Redis is down")
        down = lv.status()
        assert down["registry_error"].startswith("Redis unavailable") and down["events"]["pending"] >= 7
        server.start()
        restarted = time.monotonic()
        wait_for(lambda: lv.status()["events"]["pending"] == 0, 30, what="the outbox drained after the restart")
        recover_s = time.monotonic() - restarted
        ray.get(reader.stop.remote())                                   # freeze the counts
        wait_for(lambda: (lambda s: s["held"] == {} and not s["pending_pulls"] and s["events"]["pending"] == 0)(
            lv.status()) and ray.get(reader.status.remote())["queued"] == 0, 30, what="everything written")
        time.sleep(1.0)
        reader_status = ray.get(reader.status.remote())
        ids = [f["segment_id"] for f in entries(r, SEGMENTS_STREAM)]
        indexed = lv.rows("outage")
        assert reader_status["drops"] == 0 and lv.status()["lost"] == {}
        assert sorted(ids) == sorted(indexed)                           # every indexed segment announced once
        assert len(indexed) == reader_status["segments_produced"]       # and nothing the reader made is missing
        assert lv.status()["registry_error"] == ""
        row("Redis down ~8 s (> reader queue)", len(indexed), len(ids), 0, len(ids) - len(set(ids)), recover_s)
    finally:
        server.stop()


def test_an_unwritable_index_is_retried_counted_per_feed_and_recovers(ray_local, redis_server, live, feed_video):
    r = redis_server.client()
    lv = live(redis_server.url)
    feed = add_feed(r, str(feed_video), feed_id="rofeed", settings=lv.settings)
    lv.start_indexer()
    reader = lv.reader(feed)
    wait_for(lambda: len(lv.rows("rofeed")) >= 2, 60, what="two segments before the fault")
    with read_only(lv.settings.index_root) as cause:
        failing = wait_for(lambda: lv.status()["write_errors"], 20, what="the write failure reported")
        assert failing == {"rofeed": f"index not writable: {cause}"}
        # held while the queue allows (4 segments), then the oldest are dropped and counted
        wait_for(lambda: lv.status()["lost"].get("rofeed", 0) >= 2, 30, what="segments lost past the queue")
        assert 0 < sum(lv.status()["held"].values()) <= 4
    restored = time.monotonic()
    wait_for(lambda: not lv.status()["write_errors"], 30, what="writes working again")
    recover_s = time.monotonic() - restored
    ray.get(reader.stop.remote())
    wait_for(lambda: (lambda s: s["held"] == {} and not s["pending_pulls"])(lv.status())
             and ray.get(reader.status.remote())["queued"] == 0, 30, what="everything written")
    time.sleep(1.0)
    st, reader_status = lv.status(), ray.get(reader.status.remote())
    indexed, ids = lv.rows("rofeed"), [f["segment_id"] for f in entries(r, SEGMENTS_STREAM)]
    lost = st["lost"]["rofeed"]
    # every segment the reader made is indexed (and announced once) or counted as lost: none vanish
    assert sorted(ids) == sorted(indexed)
    assert len(indexed) + lost + reader_status["drops"] == reader_status["segments_produced"]
    errors = entries(r, ERRORS_STREAM, source_id="rofeed")
    kinds = Counter(e["kind"] for e in errors)
    assert kinds["live_index_write_failed"] == 1 and kinds["live_segments_lost"] >= 1
    assert all(e["error"] == f"index not writable: {cause}" for e in errors)
    assert sum(int(e["segments"]) for e in errors if e["kind"] == "live_segments_lost") == lost
    folder = next(p for p in lv.settings.index_root.iterdir() if p.name.startswith("source="))
    assert not [p for p in folder.iterdir() if p.name.startswith(".tmp-")]
    row("index read-only ~6 s", len(indexed), len(ids), lost, len(ids) - len(set(ids)), recover_s)


def test_feeds_survive_a_redis_that_restarts_empty(ray_local, redis_server, live, feed_video, caplog):
    r = redis_server.client()
    lv = live(redis_server.url)
    feed = add_feed(r, str(feed_video), feed_id="keep", settings=lv.settings)
    sup = FeedSupervisor(redis_server.url, lv.settings, sampler_options=SMALL_FEEDS, events=False)
    try:
        assert sup.reconcile()["started"] == ["keep"]
        assert (lv.settings.index_root / COPY_NAME).is_file()        # the durable copy, beside the index
        lv.start_indexer()
        wait_for(lambda: len(lv.rows("keep")) >= 2, 60, what="two segments before the restart")
        redis_server.stop()
        redis_server.start()                                         # no persistence: everything is gone
        restarted = time.monotonic()
        assert r.hlen("tubescope:feeds") == 0
        before = len(lv.rows("keep"))
        wait_for(lambda: len(lv.rows("keep")) >= before + 2, 20, what="indexing on after Redis lost the registry")
        with caplog.at_level(logging.ERROR, logger="pipeline.registry_copy"):
            done = sup.reconcile()
        assert done == {"started": [], "adopted": [], "stopped": [], "restarted": []}    # the reader kept running
        assert get_feed(r, "keep") == feed
        assert any("restored 1 feeds" in m for m in caplog.messages)
        warning = entries(r, ERRORS_STREAM, kind="feed_registry_restored")
        assert len(warning) == 1 and warning[0]["feeds"] == "1"
        wait_for(lambda: lv.status()["registry_error"] == "", 10, what="the indexer on the restored registry")
        recover_s = time.monotonic() - restarted
        after = len(lv.rows("keep"))
        wait_for(lambda: len(lv.rows("keep")) >= after + 2, 20, what="segments after the restore")
        # removing every feed is not a loss: nothing comes back
        remove_feed(r, "keep")
        assert sup.reconcile()["stopped"] == ["keep"] and list_feeds(r) == []
        assert sup.reconcile()["started"] == [] and list_feeds(r) == []
        events = [f["segment_id"] for f in entries(r, SEGMENTS_STREAM, source_id="keep")]
        indexed = lv.rows("keep")
        assert set(events) <= set(indexed) and len(events) == len(set(events))
        # the stream lost its pre-restart entries with Redis; everything since is announced
        row("Redis restarted empty (no persistence)", len(indexed), len(events), lv.status()["lost"].get("keep", 0),
            len(events) - len(set(events)), recover_s)
    finally:
        sup.stop_all()
