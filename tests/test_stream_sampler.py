"""StreamSampler against real streams on loopback (RTSP via GStreamer, HLS via ffmpeg + http.server, MPEG-TS over
UDP, a local file at real time), plus the pure pieces (clock, slots, segments, queue, backoff); URL checks: test_feed_urls.py."""
from __future__ import annotations

import random
import socket
import threading
import time

import numpy as np
import pytest

from pipeline.video.clock import Backoff, PtsClock, RateSampler
from pipeline.video.segments import SegmentBuilder, SegmentQueue
from pipeline.video.sampler_config import SamplerConfig
from pipeline.video.stream import UNREACHABLE
from qwen2vl.processor import smart_resize
from streams import (FAST_RETRY, SMALL, HlsServer, RtspServer, TcpRelay, UdpSender, free_tcp_port, make_stream_video,
                     wait_for)

pytestmark = pytest.mark.timeout(30)


def drain(sampler, until, timeout_s, what):
    """Collect segments until until(collected, status) holds; fail after timeout_s naming `what`."""
    got = []
    deadline = time.monotonic() + timeout_s
    while not until(got, sampler.status()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}; status={sampler.status()}")
        got += sampler.next_segments(max_n=8, timeout_s=0.1)
    return got


def check_times(segments, fps=2.0, tol=0.08):
    """Frame times increase across segments, sit ~1/fps apart inside a segment, and match segment ids."""
    last = -np.inf
    for seg in segments:
        real = seg.frame_ts[:-1] if seg.padded else seg.frame_ts
        assert real[0] > last, f"times went backwards at {seg.segment_id}"
        for a, b in zip(real, real[1:]):
            assert abs((b - a) - 1 / fps) < tol, f"frames {a} -> {b} are not {1 / fps} s apart"
        assert seg.segment_id == f"{seg.source_id}:{round(seg.t0 * 1000)}"
        assert seg.frames.shape[0] % 2 == 0 and seg.frames.dtype == np.uint8
        last = real[-1]


# ---------------------------------------------------------------- pure pieces

def test_pts_clock_follows_pts_and_never_runs_ahead():
    c = PtsClock(max_jump_s=5.0)
    assert c.to_epoch(None, now=100.0) == 100.0                   # no pts, nothing to follow: the wall clock
    assert c.to_epoch(1.4, now=100.1) == pytest.approx(100.1)     # anchor at the first arrival
    assert c.to_epoch(1.5, now=100.25) == pytest.approx(100.2)    # late arrival: the pts spacing is kept
    assert c.to_epoch(1.6, now=100.26) == pytest.approx(100.26)   # would be ahead of the clock: lowered to it
    assert c.to_epoch(1.7, now=100.4) == pytest.approx(100.36)    # and followed from there
    assert c.to_epoch(None, now=100.45) == pytest.approx(100.361)  # missing pts: just after the last one
    assert c.reanchors == 0
    t = c.to_epoch(0.0, now=103.0)                                # sender restarted: pts went backwards
    assert c.reanchors == 1 and t == pytest.approx(100.361 + 2.55)  # the real 2.55 s since the last arrival
    assert c.to_epoch(0.5, now=103.5) == pytest.approx(t + 0.5)
    t2 = c.to_epoch(60.0, now=104.0)                              # absurd jump forward
    assert c.reanchors == 2 and t2 == pytest.approx(t + 0.5 + 0.5)
    t3 = c.to_epoch(61.0, now=104.0)                              # would be 0.9 s ahead of the clock: at it
    assert c.reanchors == 2 and t3 == pytest.approx(104.0)
    t4 = c.to_epoch(62.0, now=110.5)                              # 5.5 s behind the clock (drift or stall)
    assert c.reanchors == 3 and t4 == pytest.approx(110.5)
    c.reset()                                                     # a new connection: what it had buffered came
    for pts, arrival in ((7.0, 120.0), (7.04, 120.001), (7.08, 120.002), (7.12, 120.04)):   # at once, then live
        c.bound(pts, arrival)
    first = c.to_epoch(None, now=120.05)                          # the first frame (RTSP's has no pts): just
    assert first == pytest.approx(120.04 - 0.12 - 0.001)          # before the next, in the past it came from
    assert [c.to_epoch(p, now=120.06) for p in (7.0, 7.04, 7.08, 7.12)] == pytest.approx(
        [119.92, 119.96, 120.0, 120.04])                          # the buffered frames keep their spacing
    assert c.reanchors == 3 and c.to_epoch(7.16, now=120.09) == pytest.approx(120.08)
    paced = PtsClock(paced=True)                                  # a file: its reader waits for each frame's time
    assert paced.to_epoch(0.0, now=50.0) == 50.0 and paced.to_epoch(1.0, now=50.0) == 51.0
    with pytest.raises(ValueError):
        PtsClock(0)


def test_rate_sampling_and_segments_on_the_epoch_grid():
    rate = RateSampler(2.0)
    ts = [1000.02 + i * 0.04 for i in range(25 * 3)]              # 3 s of 25 fps
    taken = [t for t in ts if rate.take(t)]
    # 12.5 frames per sample: the first frame at or after each due time, so 0.52 / 0.48 s apart, no drift
    assert taken == pytest.approx([1000.02, 1000.54, 1001.02, 1001.54, 1002.02, 1002.54])
    rate30 = RateSampler(2.0)
    taken30 = [t for t in (i / 30 for i in range(90)) if rate30.take(t)]
    assert taken30 == pytest.approx([0.5 * k for k in range(6)])   # 1/30 s steps land on the half seconds
    assert rate.take(1010.0) and not rate.take(1010.3) and rate.take(1010.52)   # after a gap: new phase
    assert not rate.take(1010.9) and rate.take(1011.03)           # a little late: the phase is kept
    assert not rate.take(1011.45) and rate.take(1011.5)
    b = SegmentBuilder("cam", fps=2.0, segment_seconds=2.0)
    frame = np.zeros((28, 56, 3), np.uint8)
    out = []
    for t in (1000.7, 1001.2, 1001.7, 1002.2, 1002.7, 1003.2, 1003.7, 1004.2):
        out += b.add(t, frame)
    # window [1000, 1002): 3 frames -> padded; [1002, 1004): 4 frames -> emitted as soon as it is full
    assert [len(s.frame_ts) for s in out] == [4, 4] and [s.padded for s in out] == [True, False]
    assert out[0].frame_ts == pytest.approx([1000.7, 1001.2, 1001.7, 1002.2]) and out[0].t1 == pytest.approx(1002.2)
    assert (out[0].frames[3] == out[0].frames[2]).all()
    assert out[1].t0 == pytest.approx(1002.2) and out[1].segment_id == "cam:1002200"
    out2 = b.add(1004.7, np.zeros((56, 28, 3), np.uint8))         # size change starts a new segment
    assert [s.frames.shape for s in out2] == [(2, 28, 56, 3)]
    flushed = b.flush()
    assert flushed[0].frames.shape == (2, 56, 28, 3) and flushed[0].padded and b.flush() == []
    with pytest.raises(ValueError, match="even whole number"):
        SegmentBuilder("cam", fps=2.0, segment_seconds=1.5)


def test_segment_queue_drops_oldest_and_counts():
    q = SegmentQueue(2)
    b = SegmentBuilder("cam", fps=2.0, segment_seconds=1.0)
    frame = np.zeros((28, 28, 3), np.uint8)
    segs = [s for t in np.arange(100.0, 105.0, 0.5) for s in b.add(float(t), frame)]
    assert len(segs) == 5
    dropped = [q.put(s) for s in segs]
    assert q.drops == 3 and [d.t0 for d in dropped if d] == [100.0, 101.0, 102.0]
    assert [s.t0 for s in q.get_many(8, 0)] == [103.0, 104.0]      # the newest survive, oldest first
    t = time.monotonic()
    assert q.get_many(8, 0.2) == [] and time.monotonic() - t >= 0.19
    with pytest.raises(ValueError):
        q.get_many(0)


def test_backoff_grows_capped_with_jitter():
    b = Backoff(0.5, 4.0, jitter=0.2, rng=random.Random(0))
    delays = [b.next_delay() for _ in range(7)]
    bases = [0.5, 1.0, 2.0, 4.0, 4.0, 4.0, 4.0]
    assert all(0.8 * base <= d <= base for d, base in zip(delays, bases)), delays
    assert len(set(delays)) == len(delays)                        # jittered, not lockstep
    b.reset()
    assert b.next_delay() <= 0.5
    with pytest.raises(ValueError):
        Backoff(2.0, 1.0)


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="url"):
        SamplerConfig(source_id="a", url="  ")
    with pytest.raises(ValueError, match="even whole number"):
        SamplerConfig(source_id="a", url="rtsp://h/x", fps=2.0, segment_seconds=0.5)
    with pytest.raises(ValueError, match="source_id"):
        SamplerConfig(source_id="a:b", url="rtsp://h/x")
    with pytest.raises(ValueError, match="min_pixels"):
        SamplerConfig(source_id="a", url="rtsp://h/x", min_pixels=10_000, max_pixels=5_000)
    with pytest.raises(ValueError, match="queue_size"):
        SamplerConfig(source_id="a", url="rtsp://h/x", queue_size=0)


# ---------------------------------------------------------------- real sources

@pytest.mark.timeout(40)
def test_local_file_plays_at_real_time_and_loops(stream_video, samplers):
    t_start = time.time()
    events = []
    s = samplers(stream_video, segment_seconds=1.0, on_event=lambda kind, fields: events.append(kind), **FAST_RETRY)
    segs = drain(s, lambda got, st: st["loops"] >= 1 and len(got) >= 5, 15, "the file to play and loop")
    lag_s = s.status()["lag_s"]
    t = time.monotonic()
    assert s.stop() and time.monotonic() - t < 0.5                      # prompt stop while playing
    segs += s.next_segments(max_n=100, timeout_s=0)                     # stop() flushed the partial segment
    check_times(segs)
    h, w = smart_resize(240, 320, factor=28, **SMALL)
    assert all(seg.frames.shape[1:] == (h, w, 3) for seg in segs)
    real = [t for seg in segs for t in (seg.frame_ts[:-1] if seg.padded else seg.frame_ts)]
    assert t_start <= real[0] < t_start + 1.5
    elapsed = time.time() - t_start
    assert real[-1] - real[0] <= elapsed and real[-1] <= time.time()   # paced: never ahead of the clock
    assert real[-1] - real[0] >= 2.5                                    # 3 s of media took >= 2.5 s wall
    st = s.status()
    assert st["frames_decoded"] >= 75 and st["frames_sampled"] == len(real)
    assert st["segments_produced"] == len(segs) and st["drops"] == 0
    # a loop is not a fault: one connection, no reconnect, gap, error or disconnect event; time runs on
    assert st["loops"] >= 1 and st["connects"] == 1 and st["reconnects"] == 0
    assert st["gap_count"] == 0 and st["open_gap"] is None and st["last_error"] is None
    assert events == ["connected"]
    steps = np.diff(real)
    assert steps.max() < 1.5 / 2.0, steps                             # 2 fps across the loop: no hole
    assert lag_s is not None and -0.1 < lag_s < 2.0


@pytest.mark.timeout(40)
def test_slow_consumer_drops_oldest_segments(stream_video, samplers):
    s = samplers(stream_video, segment_seconds=1.0, queue_size=2)
    wait_for(lambda: s.status()["segments_produced"] >= 5, 10, what="5 segments")
    assert s.stop()                                                    # freeze the counters
    st = s.status()
    assert st["queued"] == 2 and st["drops"] == st["segments_produced"] - 2 >= 3   # every drop counted
    kept = s.next_segments(max_n=8, timeout_s=0)
    assert len(kept) == 2
    assert kept[0].t0 < kept[1].t0 and kept[1].t1 >= st["last_frame_time"] - 1.0   # the newest were kept


@pytest.mark.timeout(60)
def test_rtsp_kill_and_restart_reconnects_with_gap(samplers):
    with RtspServer() as srv:
        s = samplers(srv.url, segment_seconds=4.0, **FAST_RETRY)
        wait_for(lambda: s.status()["pending_frames"] >= 3, 15, what="a partial segment")
        before = s.next_segments(8, 0)
        killed_at = time.time()
        srv.kill()
        flushed = drain(s, lambda got, st: got and not st["connected"], 5, "the disconnect flush")
        partial = flushed[-1]
        real_frames = len(partial.frame_ts) - partial.padded
        assert 3 <= real_frames < 8 and partial.t1 <= killed_at + 0.6          # flushed, not lost
        wait_for(lambda: s.status()["open_failures"] >= 1, 5, what="a refused reopen")
        time.sleep(1.0)
        srv.start()
        after = drain(s, lambda got, st: st["gap_count"] >= 1
                      and any(seg.t0 >= st["gaps"][0]["end"] - 1e-6 for seg in got), 15, "a segment after the gap")
    st = s.status()
    gap = st["gaps"][0]
    # frame times may run ahead of arrival by the open burst (bounded by max_ahead_s, 2 s by default)
    assert killed_at - 1.0 < gap["start"] <= killed_at + 2.0 and gap["end"] - gap["start"] >= 1.0
    # the last failure before the reconnect: the drop itself, or a reopen while the server was down or starting
    assert st["last_error_detail"].startswith(("disconnected", "open failed")), st["last_error_detail"]
    assert st["reconnects"] == 1 and st["connects"] == 2
    everything = before + flushed + after
    check_times(everything)
    assert after[-1].t0 == pytest.approx(gap["end"])             # the first frame after the gap starts a segment


@pytest.mark.timeout(30)
def test_rtsp_frame_times_never_run_ahead_of_the_wall_clock(samplers):
    """A reader that falls behind right after connecting (here its connect hook takes 1 s; in production a starved
    CPU or a slow open) finds a second of video buffered. Those frames were captured in the past and get past times
    at the source's spacing; no frame time is ever after the moment the reader produced it."""
    opened = []

    def slow_start(kind, fields):
        if kind == "connected":
            opened.append(time.time())
            time.sleep(1.0)

    with RtspServer() as srv:
        s = samplers(srv.url, segment_seconds=1.0, on_event=slow_start)
        segs, worst = [], -np.inf
        deadline = time.monotonic() + 15
        while len(segs) < 4 and time.monotonic() < deadline:
            new = s.next_segments(max_n=8, timeout_s=0.02)
            now = time.time()
            for seg in new:                           # a full segment is queued as soon as its last frame is
                worst = max(worst, (seg.frame_ts[-2] if seg.padded else seg.frame_ts[-1]) - now)
            last = s.status()["last_frame_time"]
            if last is not None:
                worst = max(worst, last - time.time())
            segs += new
    assert len(segs) >= 4, s.status()
    assert worst <= 0.1, f"frame times ran {worst:.3f} s ahead of the wall clock"
    check_times(segs)
    assert segs[0].frame_ts[0] < opened[0] + 0.3          # the buffered second keeps its place in time


@pytest.mark.timeout(30)
def test_a_dropped_rtsp_connection_costs_only_the_reopen(samplers):
    """The network drops the connection while the camera runs on: the first retry is at once, so the recorded gap
    is the reopen and the wait for a keyframe, not a backoff delay (here 1 s, far longer than both)."""
    with RtspServer(keyframe_every=5) as srv, TcpRelay(srv.port) as relay:
        s = samplers(relay.url(), segment_seconds=1.0, backoff_initial_s=1.0, backoff_max_s=2.0, backoff_jitter=0.0,
                     open_timeout_s=2.0, read_timeout_s=2.0)
        before = drain(s, lambda got, st: len(got) >= 2, 15, "segments before the drop")
        relay.cut()
        after = drain(s, lambda got, st: st["gap_count"] >= 1
                      and any(seg.t0 >= st["gaps"][0]["end"] - 1e-6 for seg in got), 10, "a segment after the gap")
    st = s.status()
    gap = st["gaps"][0]
    assert st["reconnects"] == 1 and st["open_failures"] == 0
    assert gap["seconds"] < 0.6, gap                       # reopen ~0.2 s + keyframe wait <= 0.2 s
    check_times(before + after)


@pytest.mark.timeout(60)
def test_rtsp_hung_source_times_out_then_recovers(samplers):
    with RtspServer() as srv:
        s = samplers(srv.url, segment_seconds=1.0, **FAST_RETRY)
        drain(s, lambda got, st: len(got) >= 1, 15, "first segment")
        srv.pause()                                              # SIGSTOP: the TCP connection stays open
        hung_at = time.monotonic()
        wait_for(lambda: not s.status()["connected"], 8, what="the read timeout")
        detected_s = time.monotonic() - hung_at
        assert detected_s < 2 * FAST_RETRY["read_timeout_s"] + 1.0   # bounded by the timeout, not forever
        st = s.status()
        assert st["last_error"].startswith("disconnected") and st["open_gap"] is not None
        srv.resume()
        drain(s, lambda got, st: st["reconnects"] >= 1 and st["gap_count"] >= 1 and got, 20, "recovery")
        assert s.status()["running"]
        t = time.monotonic()
        srv.pause()                                              # stop() while blocked on a hung read
        time.sleep(0.3)
        assert s.stop(timeout_s=10)
        assert time.monotonic() - t < 2 * FAST_RETRY["read_timeout_s"] + 1.0
        srv.resume()


@pytest.mark.timeout(60)
def test_hls_live_and_writer_death(stream_video, samplers):
    with HlsServer(stream_video) as hls:
        s = samplers(hls.url, segment_seconds=1.0, hls_hold_counters=3, **FAST_RETRY)
        segs = drain(s, lambda got, st: len(got) >= 3, 20, "HLS segments")
        check_times(segs)
        hls.kill_writer()                                        # the playlist goes stale: EOF, not a hang
        wait_for(lambda: s.status()["last_error"] == "disconnected: eof", 12, what="EOF on a stale playlist")
        hls.start_writer()
        drain(s, lambda got, st: st["reconnects"] >= 1 and st["gap_count"] >= 1 and got, 20, "HLS reconnect")


@pytest.mark.timeout(60)
def test_udp_mpegts_sender_restart(stream_video, samplers):
    with UdpSender(stream_video) as tx:
        s = samplers(tx.url, segment_seconds=1.0, **FAST_RETRY)
        segs = drain(s, lambda got, st: len(got) >= 2, 15, "UDP segments")
        tx.kill()
        wait_for(lambda: not s.status()["connected"], 6, what="UDP read timeout")
        assert "disconnected" in s.status()["last_error"]
        tx.start()                                               # pts start over at the sender's offset
        segs += drain(s, lambda got, st: st["reconnects"] >= 1 and len(got) >= 2, 20, "UDP reconnect")
        assert s.stop(timeout_s=10)                              # before the sender goes, so no read timeout
    check_times(segs)
    st = s.status()
    assert st["gap_count"] == 1 and st["gaps"][0]["seconds"] >= 2.0


@pytest.mark.timeout(40)
def test_refused_connection_backs_off_and_other_feeds_go_on(stream_video, samplers):
    t0 = time.monotonic()
    dead = samplers(f"rtsp://127.0.0.1:{free_tcp_port()}/cam", source_id="dead",
                    backoff_initial_s=0.2, backoff_max_s=5.0, backoff_jitter=0.0)
    alive = samplers(stream_video, source_id="alive", segment_seconds=1.0)
    st = wait_for(lambda: (st := dead.status())["open_failures"] >= 5 and st["backoff_s"] and st, 10,
                  what="5 refused attempts")
    # attempts at 0, 0.2, 0.6, 1.4, 3.0 s: the delays double (no busy loop)
    assert time.monotonic() - t0 >= 0.2 + 0.4 + 0.8 + 1.6 - 0.05
    assert st["last_error"] == UNREACHABLE and "Connection refused" in st["last_error_detail"]
    assert not st["connected"] and st["segments_produced"] == 0
    assert st["running"] and st["gap_count"] == 0 and st["backoff_s"] == pytest.approx(3.2)
    assert len(alive.next_segments(max_n=8, timeout_s=0)) >= 2     # the healthy feed went on meanwhile
    assert alive.status()["last_error"] is None
    t = time.monotonic()
    assert dead.stop() and time.monotonic() - t < 0.5                 # prompt stop during a backoff wait


@pytest.mark.timeout(40)
def test_a_closed_port_a_silent_one_and_a_foreign_one_read_the_same(samplers):
    """What a feed's readers see never tells a closed port from a filtered one or one that speaks another
    protocol (the feed is no port scanner); the cause stays in the detail, for logs and admins."""
    with socket.socket() as silent, socket.socket() as foreign:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)                                         # connects complete, nothing ever answers
        foreign.bind(("127.0.0.1", 0))
        foreign.listen(8)

        def speak_ssh():
            while True:
                try:
                    conn, _ = foreign.accept()
                except OSError:
                    return
                with conn:
                    conn.sendall(b"SSH-2.0-OpenSSH_9.2\r\n")

        threading.Thread(target=speak_ssh, daemon=True).start()
        ports = {"closed": free_tcp_port(), "silent": silent.getsockname()[1], "foreign": foreign.getsockname()[1]}
        feeds = {kind: samplers(f"rtsp://127.0.0.1:{port}/cam", source_id=kind, **FAST_RETRY)
                 for kind, port in ports.items()}
        status = {kind: wait_for(lambda s=s: (st := s.status())["open_failures"] >= 1 and st, 15, what=kind)
                  for kind, s in feeds.items()}
    assert {st["last_error"] for st in status.values()} == {UNREACHABLE}
    assert "refused" in status["closed"]["last_error_detail"].lower()
    assert "refused" not in status["silent"]["last_error_detail"].lower()
    assert len({st["last_error_detail"].split(":")[1] for st in status.values()}) > 1   # the causes differ


@pytest.mark.timeout(30)
def test_unusable_frames_give_a_clear_error(tmp_path, samplers):
    tiny = make_stream_video(tmp_path / "tiny.mp4", seconds=1.0, width=16, height=16)   # below one 28x28 patch
    s = samplers(tiny, backoff_initial_s=0.2, backoff_max_s=5.0, backoff_jitter=0.0)
    # attempts at 0, 0.2, 0.6 s, then a wait of 0.8 s: it backs off instead of spinning on a bad source
    st = wait_for(lambda: (st := s.status())["connects"] >= 3 and st["backoff_s"] and st, 5, what="a third retry")
    assert st["backoff_s"] == pytest.approx(0.8) and st["connects"] == 3
    assert "16x16 cannot be resized" in st["last_error"] and st["frames_sampled"] == 0
    assert st["segments_produced"] == 0 and st["frames_decoded"] >= 3


def test_a_phone_video_is_sampled_upright(tmp_path, samplers):
    from videos import encode_video

    clip = encode_video(tmp_path / "portrait.mp4", 320, 240, 10, seconds=1.5, rotation=-90).path   # stored sideways
    s = samplers(clip, segment_seconds=1.0, **FAST_RETRY)
    segs = drain(s, lambda got, st: len(got) >= 1, 15, "a segment of the rotated file")
    h, w = smart_resize(240, 320, factor=28, **SMALL)
    assert segs[0].frames.shape[1:] == (w, h, 3) and tuple(s.status()["frame_size"]) == (w, h)
    assert segs[0].source_size == (240, 320)                         # the upright source, before resizing
