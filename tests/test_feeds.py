"""Feed registry in a real Redis, and FeedReader / FeedSupervisor on a real local Ray."""
from __future__ import annotations

import json
import os
import threading
import time

import pytest
import ray

from actors.feeds import NAMESPACE, FeedReader, FeedSupervisor, reader_name
from pipeline.feeds import FEEDS_KEY, add_feed, get_feed, list_feeds, remove_feed, sampler_config
from pipeline.settings import load_settings
from pipeline.video.protocols import ffmpeg_protocols
from streams import free_tcp_port, make_stream_video, wait_for


def _is_dead(actor) -> bool:
    try:
        ray.get(actor.status.remote(), timeout=5)
    except ray.exceptions.RayActorError:
        return True
    except ray.exceptions.GetTimeoutError:
        pass
    return False


SMALL_FEEDS = dict(segment_seconds=1.0, min_pixels=4 * 784, max_pixels=64 * 784,
                   backoff_initial_s=0.2, backoff_max_s=1.0, open_timeout_s=2.0, read_timeout_s=2.0)


@pytest.fixture
def settings(tmp_path):
    return load_settings(data_dir=tmp_path / "data", feed_allow_hosts=["127.0.0.1"])   # test sources live there


# ---------------------------------------------------------------- registry

@pytest.mark.timeout(30)
def test_registry_add_list_get_remove(redis_server, settings, tmp_path):
    r = redis_server.client()
    cam = add_feed(r, "rtsp://admin:pw@10.0.0.5:554/stream1", name="Lobby", settings=settings)
    assert set(cam) == {"id", "url", "name", "fps", "max_pixels", "record", "created"}
    assert cam["name"] == "Lobby" and cam["fps"] is None and len(cam["id"]) == 12
    demo = add_feed(redis_server.url, str(tmp_path / "demo.mp4"), fps=1.0, max_pixels=50_000, feed_id="demo",
                    settings=settings)                     # a redis:// URL works as well as a client
    assert demo["id"] == "demo" and demo["name"] == "demo" and demo["fps"] == 1.0
    assert [f["id"] for f in list_feeds(r)] == [cam["id"], "demo"]                 # oldest first
    assert get_feed(r, cam["id"]) == cam
    assert json.loads(r.hget(FEEDS_KEY, "demo")) == demo                            # the documented layout

    bad = [(dict(url="ftp://h/x.mp4"), "scheme 'ftp'"), (dict(url="rtmp://h/live"), "scheme 'rtmp'"),
           (dict(url=""), "non-empty"), (dict(url="rtsp://h/x", fps=0), "fps"),
           (dict(url="rtsp://h/x", fps=0.125), "even whole number"),     # 1 frame per 8-s segment
           (dict(url="rtsp://h/x", max_pixels=100), "max_pixels"),
           (dict(url="rtsp://h/x", max_pixels=2.5), "max_pixels"),
           (dict(url="rtsp://h/x", feed_id="a:b"), "feed_id"),
           (dict(url="rtsp://10.0.0.6/x", feed_id="demo"), "already exists"),
           (dict(url="rtsp://h/x", name=""), "name"),
           (dict(url="/etc/passwd", file_roots=[tmp_path]), "outside the allowed roots"),
           (dict(url="file:///tmp/x.mp4", schemes=["rtsp", "http"]), "scheme 'file'"),
           # what would hang a reader (a FIFO blocks the open, a device never ends), or lies outside through /proc
           (dict(url=str(tmp_path / "fifo.mp4"), file_roots=[tmp_path]), "is a FIFO, not a regular file"),
           (dict(url=f"file://{tmp_path}/fifo.mp4"), "is a FIFO"),
           (dict(url="/dev/zero"), "is a character device"),
           (dict(url=str(tmp_path / "zero.mp4"), file_roots=[tmp_path]), "outside the allowed roots"),
           (dict(url="/proc/self/environ", file_roots=[tmp_path]), "outside the allowed roots"),
           (dict(url=str(tmp_path / "proc.mp4"), file_roots=[tmp_path]), "outside the allowed roots"),
           (dict(url=str(tmp_path), file_roots=[tmp_path]), "is a folder, not a regular file")]
    os.mkfifo(tmp_path / "fifo.mp4")
    (tmp_path / "zero.mp4").symlink_to("/dev/zero")
    (tmp_path / "proc.mp4").symlink_to("/proc/self/environ")
    for kwargs, words in bad:
        with pytest.raises(ValueError, match=words):
            add_feed(r, settings=settings, **kwargs)
    if "srt" not in ffmpeg_protocols():                 # allowed scheme, but this PyAV's FFmpeg cannot open it
        with pytest.raises(ValueError, match="'srt' protocol"):
            add_feed(r, "srt://10.0.0.9:9000", settings=settings)
    assert len(list_feeds(r)) == 2                                                   # nothing half-stored
    ok = add_feed(r, f"file://{tmp_path}/sub/a.mp4", file_roots=[tmp_path], settings=settings)
    assert remove_feed(r, ok["id"]) == ok

    assert remove_feed(r, cam["id"]) == cam
    assert [f["id"] for f in list_feeds(r)] == ["demo"]
    with pytest.raises(KeyError):
        remove_feed(r, cam["id"])
    with pytest.raises(KeyError):
        get_feed(r, "nope")
    with pytest.raises(ValueError, match="redis"):
        list_feeds("not-a-url")


@pytest.mark.timeout(60)
def test_registration_refuses_this_node_unless_allowed(ray_local, redis_server, tmp_path):
    """Loopback, link-local and unspecified hosts, udp listeners and the service's own ports (Redis, the API, Ray)
    are refused before anything is stored; feed_allow_hosts and feed_udp_listen let the first ones through."""
    r = redis_server.client()
    strict = load_settings(data_dir=tmp_path / "data", redis_url=redis_server.url, port=8123)
    gcs_port = int(ray.get_runtime_context().gcs_address.rpartition(":")[2])
    raylet_port = next(n["NodeManagerPort"] for n in ray.nodes() if n["Alive"])
    for url, words in ((f"rtsp://127.0.0.1:{free_tcp_port()}/cam", "'127.0.0.1' is a loopback address"),
                       ("rtsp://localhost/cam", "'localhost' resolves to 127.0.0.1"),
                       ("http://169.254.169.254/latest/meta-data/", "link-local"),
                       ("rtsp://[::1]/cam", "loopback"), ("rtsp://0.0.0.0/cam", "unspecified"),
                       ("udp://:5600", "feed_udp_listen"), ("rtsp://no-such-camera.invalid/cam", "does not resolve")):
        with pytest.raises(ValueError, match=words):
            add_feed(r, url, settings=strict)
    loose = strict.model_copy(update={"feed_allow_hosts": ["127.0.0.0/8", "::1"], "feed_udp_listen": True})
    for port, service in ((redis_server.port, "Redis"), (8123, "API"), (gcs_port, "Ray GCS"), (raylet_port, "Ray")):
        with pytest.raises(ValueError, match=f"port {port} of this service's own {service}"):
            add_feed(r, f"rtsp://127.0.0.1:{port}/x", settings=loose)     # allowed loopback, but never these
    assert list_feeds(r) == []                                           # nothing stored
    ok = add_feed(r, f"rtsp://127.0.0.1:{free_tcp_port()}/cam", feed_id="cam", settings=loose)
    assert add_feed(r, "udp://:5600", settings=loose)["url"] == "udp://:5600"
    # the reader checks the stored URL again under today's settings: stored under looser rules, refused at open
    from pipeline.video.stream import StreamSampler

    sampler = StreamSampler(sampler_config(ok, strict, **SMALL_FEEDS))
    sampler.start()
    try:
        st = wait_for(lambda: (st := sampler.status())["open_failures"] >= 1 and st, 10, what="the refusal")
        assert st["last_error"].startswith("refused: ") and "loopback" in st["last_error"] and st["connects"] == 0
    finally:
        sampler.stop()


def test_sampler_config_from_a_feed(settings):
    cfg = sampler_config({"id": "cam", "url": "udp://:5600", "fps": 1.0, "max_pixels": 50_000}, settings)
    assert (cfg.fps, cfg.max_pixels, cfg.min_pixels) == (1.0, 50_000, 50_000)     # floor lowered with the cap
    assert cfg.segment_seconds == settings.segment_seconds and cfg.queue_size == settings.feed_queue_segments
    assert cfg.backoff_max_s == settings.feed_reconnect_max_seconds
    cfg = sampler_config({"id": "cam", "url": "udp://:5600", "fps": None, "max_pixels": None}, settings,
                         queue_size=9)
    assert (cfg.fps, cfg.max_pixels, cfg.queue_size) == (settings.fps, settings.max_pixels, 9)


# ---------------------------------------------------------------- readers and the supervisor on Ray

def pull(handle, at_least: int, timeout_s: float) -> list:
    got = []
    deadline = time.monotonic() + timeout_s
    while len(got) < at_least:
        if time.monotonic() > deadline:
            raise AssertionError(f"got {len(got)} of {at_least} segments; status={ray.get(handle.status.remote())}")
        got += ray.get(handle.next_segments.remote(8, 0.5), timeout=30)
    return got


@pytest.mark.timeout(120)
def test_supervisor_follows_the_registry_and_restarts_readers(ray_local, redis_server, settings, tmp_path):
    r = redis_server.client()
    video = make_stream_video(tmp_path / "lobby.mp4", seconds=3.0)
    add_feed(r, str(video), name="lobby", feed_id="lobby", settings=settings)
    add_feed(r, f"rtsp://127.0.0.1:{free_tcp_port()}/cam", feed_id="dead", settings=settings)
    # a record written where PyAV has SRT: registration here (no libsrt) refuses such a URL, but the record must load
    r.hset(FEEDS_KEY, "oldsrt", json.dumps({"id": "oldsrt", "url": f"srt://127.0.0.1:{free_tcp_port()}",
                                            "name": "oldsrt", "fps": None, "max_pixels": None,
                                            "created": time.time() + 1}))
    sup = FeedSupervisor(redis_server.url, settings, sampler_options=SMALL_FEEDS)
    try:
        assert sup.reconcile() == {"started": ["lobby", "dead", "oldsrt"], "adopted": [], "stopped": [],
                                   "restarted": []}
        lobby = sup.readers()["lobby"]
        segs = pull(lobby, 2, 60)
        assert all(s.source_id == "lobby" and s.segment_id.startswith("lobby:") for s in segs)
        assert segs[0].frames.shape[0] == 2 and segs[0].t0 > time.time() - 60          # epoch-stamped
        st = sup.statuses()
        # a refused feed reports why (the cause in the detail) and keeps retrying; the other feed is unaffected
        assert st["dead"]["last_error"] == "open failed: source unreachable" and st["dead"]["open_failures"] >= 1
        assert "Connection refused" in st["dead"]["last_error_detail"]
        assert st["dead"]["running"] and st["lobby"]["connected"] and st["lobby"]["last_error"] is None
        if "srt" not in ffmpeg_protocols():
            st = wait_for(lambda: (lambda s: s if s["oldsrt"]["last_error"] else None)(sup.statuses()), 10,
                          what="the srt feed's open error")
            assert st["oldsrt"]["running"] and "Protocol not found" in st["oldsrt"]["last_error"]
        def dead_open_failed():
            events = [{k.decode(): v.decode() for k, v in e[1].items()} for e in r.xrange("tubescope:errors")]
            return [f for f in events if f["source_id"] == "dead" and f["kind"] == "feed_open_failed"]
        events = wait_for(dead_open_failed, 10, what="the refused feed's error event")
        assert {e["error"] for e in events} == {"open failed: source unreachable"}   # events tell no port state
        assert sup.reconcile() == {"started": [], "adopted": [], "stopped": [], "restarted": []}   # steady state

        # a crashed reader is recreated under the same name and reads again
        old_pid = st["lobby"]["pid"]
        ray.kill(lobby)
        wait_for(lambda: _is_dead(lobby), 30, what="the killed reader to be gone")   # ray.kill is asynchronous
        assert sup.reconcile()["restarted"] == ["lobby"]
        lobby2 = sup.readers()["lobby"]
        assert ray.get(lobby2.status.remote())["pid"] != old_pid and sup.statuses()["lobby"]["restarts"] == 1
        pull(lobby2, 1, 60)

        # a removed feed's reader is stopped and its actor is gone
        remove_feed(r, "dead")
        remove_feed(r, "oldsrt")
        assert sorted(sup.reconcile()["stopped"]) == ["dead", "oldsrt"] and set(sup.readers()) == {"lobby"}
        with pytest.raises(ValueError):
            ray.get_actor(reader_name("dead"), namespace=NAMESPACE)

        # a second supervisor over the same registry adopts the live reader instead of starting another
        sup2 = FeedSupervisor(redis_server.url, settings, sampler_options=SMALL_FEEDS)
        assert sup2.reconcile()["adopted"] == ["lobby"]
        assert ray.get(sup2.readers()["lobby"].status.remote())["pid"] == ray.get(lobby2.status.remote())["pid"]

        # service restart: everything stopped, a new supervisor resumes every registered feed
        sup.stop_all()
        with pytest.raises(ValueError):
            ray.get_actor(reader_name("lobby"), namespace=NAMESPACE)
        sup3 = FeedSupervisor(redis_server.url, settings, sampler_options=SMALL_FEEDS)
        assert sup3.reconcile()["started"] == ["lobby"]
        pull(sup3.readers()["lobby"], 1, 60)
        sup3.stop_all()
    finally:
        sup.stop_all()
        for fid in ("lobby", "dead", "oldsrt"):           # nothing may outlive the test
            try:
                ray.kill(ray.get_actor(reader_name(fid), namespace=NAMESPACE))
            except ValueError:
                pass


@pytest.mark.timeout(60)
def test_supervisor_run_loop_starts_and_stops(ray_local, redis_server, settings, tmp_path):
    r = redis_server.client()
    video = make_stream_video(tmp_path / "cam.mp4", seconds=2.0)
    sup = FeedSupervisor(r, settings, sampler_options=SMALL_FEEDS, events=False)
    loop = threading.Thread(target=sup.run, kwargs={"interval_s": 0.3}, daemon=True)
    loop.start()
    try:
        add_feed(r, str(video), feed_id="loop-cam", settings=settings)
        handle = wait_for(lambda: sup.readers().get("loop-cam"), 15, what="the run loop to start the feed")
        pull(handle, 1, 60)
        remove_feed(r, "loop-cam")
        wait_for(lambda: "loop-cam" not in sup.readers(), 15, what="the run loop to stop the feed")
    finally:
        sup.stop()
        loop.join(timeout=15)
        sup.stop_all()
    assert not loop.is_alive()


@pytest.mark.timeout(60)
def test_run_loop_wakes_at_once_logs_failed_rounds_and_stops_promptly(redis_server, settings, caplog):
    """The loop FeedService runs: no feeds, so no Ray; each round reads the registry once (one HVALS)."""
    r = redis_server.client()
    sup = FeedSupervisor(redis_server.url, settings, events=False)

    def rounds() -> int:
        return r.info("commandstats").get("cmdstat_hvals", {}).get("calls", 0)

    r.hset(FEEDS_KEY, "broken", "not json")                    # the first round fails on this record
    loop = threading.Thread(target=sup.run, kwargs={"interval_s": 60.0}, daemon=True)
    with caplog.at_level("ERROR", logger="actors.feeds"):
        loop.start()
        try:
            wait_for(lambda: rounds() == 1, 10, what="the first round")
            wait_for(lambda: "feed reconcile failed" in caplog.text, 10, what="the failed round to be logged")
            assert loop.is_alive()                               # a failed round does not end the loop
            r.hdel(FEEDS_KEY, "broken")
            with sup.lock:                                       # a round holds the lock: none starts meanwhile
                sup.wake()
                time.sleep(0.5)
                assert rounds() == 1
            wait_for(lambda: rounds() == 2, 10, what="a round right after wake(), not after 60 s")
        finally:
            t = time.monotonic()
            sup.stop()
            loop.join(timeout=10)
    assert not loop.is_alive() and time.monotonic() - t < 5     # stop() does not wait out the interval
    assert caplog.text.count("feed reconcile failed") == 1


@pytest.mark.timeout(60)
def test_reader_actor_pull_does_not_block_other_calls(ray_local, settings, tmp_path):
    video = make_stream_video(tmp_path / "cam.mp4", seconds=2.0)
    reader = FeedReader.remote({"id": "pull", "url": str(video)}, settings, SMALL_FEEDS, None, False)  # not started
    try:
        assert ray.get(reader.status.remote(), timeout=60)["running"] is False
        waiting = reader.next_segments.remote(8, 20.0)           # parks one actor thread: nothing is being read
        t = time.monotonic()
        st = ray.get(reader.start.remote(), timeout=10)          # answered while the pull waits
        assert st["running"] and st["feed_id"] == "pull" and time.monotonic() - t < 5
        segs = ray.get(waiting, timeout=30)                      # and the pull gets the first segment
        assert segs and segs[0].source_id == "pull" and len(segs[0].frame_ts) == 2
        assert ray.get(reader.stop.remote(), timeout=30) is True
        assert ray.get(reader.status.remote())["running"] is False
    finally:
        ray.kill(reader)


def test_sources_are_found_by_id_or_feed_name():
    from pipeline.feeds import resolve_sources

    feeds = [{"id": "f1", "name": "lobby"}, {"id": "f2", "name": "gate"}, {"id": "f3", "name": "gate"},
             {"id": "f4", "name": "clip"}, {"id": "f5", "name": "f5"}]
    indexed = {"clip", "f1", "f5"}
    assert resolve_sources(["lobby", "f1", "f5"], indexed, feeds) == ["f1", "f5"]     # repeats fold
    assert resolve_sources(["nowhere"], indexed, feeds) == ["nowhere"]       # left for the caller's 404
    assert resolve_sources(["clip"], indexed, None) == ["clip"]              # known ids need no registry
    with pytest.raises(ValueError, match=r"'gate' names several sources \(f2, f3\)"):
        resolve_sources(["gate"], indexed, feeds)
    with pytest.raises(ValueError, match=r"'clip' names several sources \(clip, f4\)"):   # an id and a feed's name
        resolve_sources(["clip"], indexed, feeds)
