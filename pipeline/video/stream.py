"""Reading one live source, without Ray: open a stream with PyAV, sample 2 fps by timestamp, cut segments.

One StreamSampler reads one source, as its SamplerConfig (pipeline/video/sampler_config.py) says, in a background
thread:

    open (PyAV, always with timeouts; options from the protocol table) -> demux (settle: what the source had
    buffered is read before anything is decoded, to anchor the clock) -> decode -> map pts to epoch seconds
    (PtsClock, never ahead of the wall clock) -> take the first frame every 1/fps s (RateSampler) -> convert only
    that frame, straight from YUV to the smart_resize size -> segments by the segment rule -> bounded queue that
    drops the OLDEST segment when full.

Live sources die, hang and restart. Both the end of iteration and any av.error.FFmpegError count as
"disconnected": the partial segment is flushed (padded to an even frame count), the gap is recorded once frames flow
again, and the source is reopened: at once if the connection gave frames, then with capped exponential backoff plus
jitter. Local files (a path or file://) are played at real time and loop at EOF in continuous time (no disconnect),
so a demo file behaves like a camera (docs/architecture.md, "Streams and protocols").

actors/feeds.py wraps one StreamSampler in a Ray actor (FeedReader); tests drive StreamSampler directly.
"""
from __future__ import annotations

import collections
import itertools
import logging
import threading
import time
from typing import Callable

import av

from pipeline.records import Segment
from pipeline.video.clock import Backoff, PtsClock, RateSampler
from pipeline.video.egress import EgressProxy, through_proxy
from pipeline.video.hosts import UnresolvedHost, check_host
from pipeline.video.media import INTERPOLATION, quarter_turns, upright
from pipeline.video.protocols import (check_regular_file, check_roots, describe_error, local_file_path, open_arguments,
                                      redact_url, validate_url)
from pipeline.video.recording import Recorder
from pipeline.video.sampler_config import SamplerConfig
from pipeline.video.segments import SegmentBuilder, SegmentQueue
from qwen2vl.geometry import FACTOR, smart_resize

log = logging.getLogger(__name__)


class UnusableVideo(ValueError):
    """The stream decodes, but its frames cannot be used (e.g. smaller than one 28x28 merged patch)."""


# What the feed's readers see of a failed open or a lost connection: a refused connection, a timeout, a closed port
# and a port that speaks no video all read the same, so a feed is no port scanner. The cause is in the detail.
UNREACHABLE = "open failed: source unreachable"
CONNECTION_LOST = "connection lost"
# a new connection's buffered packets held before decoding (_settle): more than a long HLS segment at 60 fps
SETTLE_MAX_PACKETS = 600
# status fields only admins see: the cause, and the timings that tell a quick refusal from a slow timeout
DETAIL_FIELDS = ("last_error_detail", "last_error_time", "open_failures", "backoff_s")


# ---------------------------------------------------------------- the sampler

EventHook = Callable[[str, dict], None]


class StreamSampler:
    """Reads one source in a background thread: start(), next_segments(), status(), stop().

    `on_event(kind, fields)` (optional) is called from the reading thread on state changes:
    "connected", "disconnected" (with the reason) and "open_failed" (first failure of a streak only).
    """

    def __init__(self, config: SamplerConfig, on_event: EventHook | None = None, recorder: Recorder | None = None):
        self.config = config
        self.on_event = on_event
        self.recorder = recorder                     # gets every packet read (pipeline/video/recording.py)
        self.queue = SegmentQueue(config.queue_size)
        self._file_path = local_file_path(config.url)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()           # guards the gap list and error fields read by status()
        self._clock = PtsClock(config.max_pts_jump_s, paced=self._file_path is not None)
        self._rate = RateSampler(config.fps)
        self._builder = SegmentBuilder(config.source_id, config.fps, config.segment_seconds)
        self._sizes: dict[tuple[int, int], tuple[int, int]] = {}   # source (h, w) -> target (h, w)
        self._egress = EgressProxy(config.hosts, connect_timeout_s=config.open_timeout_s)   # started on first use
        # status counters (written by the reading thread only)
        self.connected = False
        self.connects = 0
        self.reconnects = 0
        self.open_failures = 0
        self.frames_decoded = 0
        self.frames_sampled = 0
        self.segments_produced = 0
        self.packets_skipped = 0
        self.loops = 0                               # times a local file started again from its beginning
        self.last_frame_time: float | None = None    # epoch time of the last sampled frame
        self.last_decoded_time: float | None = None  # epoch time of the last decoded frame
        self.last_segment_time: float | None = None  # end time (t1) of the last completed segment
        self.last_error: str | None = None           # what any reader of the feed may see: never the port's state
        self.last_error_detail: str | None = None    # the cause itself (logs, admins)
        self.last_error_time: float | None = None
        self.backoff_s: float | None = None          # the delay before the next attempt, while waiting
        self.gap_count = 0
        self._gaps: collections.deque[dict] = collections.deque(maxlen=config.max_gaps_kept)
        self._open_gap: dict | None = None           # a disconnect whose end (next frame) is not known yet
        self.frame_size: tuple[int, int] | None = None   # target (height, width) of the sampled frames
        self.started_at: float | None = None

    # ---- control ----------------------------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self.started_at = time.time()
        self._thread = threading.Thread(target=self.run, name=f"feed-{self.config.source_id}", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 15.0) -> bool:
        """Ask the loop to stop and wait for it; True once the thread has ended.

        Returns promptly unless PyAV is blocked in a read of a hung source, which its timeouts bound to
        about read_timeout_s (RTSP: the socket timeout) or open_timeout_s.
        """
        self._stop.set()
        if self._thread is None:
            return True
        self._thread.join(timeout_s)
        return not self._thread.is_alive()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def next_segments(self, max_n: int = 8, timeout_s: float = 1.0) -> list[Segment]:
        return self.queue.get_many(max_n, timeout_s)

    # ---- the loop ---------------------------------------------------------------------------------------------
    def run(self) -> None:
        """Open, read, reconnect until stop() is called. Runs in the calling thread (start() uses a thread)."""
        cfg = self.config
        backoff = Backoff(cfg.backoff_initial_s, cfg.backoff_max_s, cfg.backoff_jitter)
        try:
            while not self._stop.is_set():
                try:
                    container = self._open(backoff)
                except Exception as e:              # unexpected (a bug, bad options): report, back off, retry
                    log.exception("feed %s: unexpected error while opening", cfg.source_id)
                    self._set_error("open failed: internal error",
                                    f"open failed: internal error: {type(e).__name__}: {e}")
                    self._wait(backoff.next_delay())
                    continue
                if container is None:
                    continue
                sampled_before, opened_at = self.frames_sampled, time.monotonic()
                reason, detail = self._read(container)
                if self._stop.is_set():
                    break
                self._disconnected(reason, detail)
                if self.frames_sampled > sampled_before:
                    # it worked: the first retry is at once (a restarted camera is back as soon as it listens),
                    # but no sooner than backoff_initial_s after the last open, so a source that drops every
                    # frame or two is not hammered; failures after that back off
                    backoff.reset()
                    self._wait(opened_at + cfg.backoff_initial_s - time.monotonic())
                else:
                    self._wait(backoff.next_delay())
        finally:
            self._emit_segments(self._builder.flush())
            self._egress.close()
            self.connected = False
            self.backoff_s = None

    def _open(self, backoff: Backoff):
        cfg = self.config
        try:                  # the stored URL is checked again at every open: the rules may be stricter than at
            validate_url(cfg.url, cfg.schemes)       # registration, a name may resolve elsewhere now
            check_roots(cfg.url, cfg.file_roots)     # (docs/architecture.md, "Streams and protocols")
            check_regular_file(cfg.url)              # a FIFO or a device would hang the open or never end
            check_host(cfg.url, cfg.hosts)
        except UnresolvedHost as e:
            return self._open_failed(backoff, UNREACHABLE, f"open failed: {e}")
        except ValueError as e:
            return self._open_failed(backoff, f"refused: {e}")
        url, options = through_proxy(cfg.url, *open_arguments(cfg.url, cfg.read_timeout_s, cfg.hls_hold_counters),
                                     self._egress)
        try:
            container = av.open(url, options=options, timeout=(cfg.open_timeout_s, cfg.read_timeout_s))
        except av.error.ProtocolNotFoundError as e:      # this node's FFmpeg lacks it: nothing about the source
            return self._open_failed(backoff, f"open failed: {describe_error(e, cfg.url)}")
        except (av.error.FFmpegError, OSError) as e:
            refused = self._egress.take_refusal()
            return self._open_failed(backoff, UNREACHABLE, f"open failed: {describe_error(e, cfg.url)}"
                                     + (f" (the egress check refused: {refused})" if refused else ""))
        if not container.streams.video:
            container.close()
            return self._open_failed(backoff, UNREACHABLE, "open failed: the source has no video stream")
        if self.connects > 0:
            self.reconnects += 1
        self.connects += 1
        self.connected = True
        self._clock.reset()                         # a new connection may start its pts anywhere
        self._rate.restart()
        self._event("connected", {"reconnects": self.reconnects})
        return container

    def _open_failed(self, backoff: Backoff, error: str, detail: str | None = None) -> None:
        """Count a failed open, report it (an event for the first of a streak), wait out the backoff."""
        self.open_failures += 1
        first_of_streak = backoff.failures == 0
        self._set_error(error, detail)
        if first_of_streak:
            self._event("open_failed", {"error": self.last_error})
        self._wait(backoff.next_delay())
        return None

    def _read(self, container) -> tuple[str, str]:
        """Demux and decode until EOF, an error or stop(); return why it ended: (what readers see, the cause). A local
        file that gave frames loops in place (seek to its start): time runs on, so a loop is no disconnect, gap or
        error."""
        stream = container.streams.video[0]
        time_base = stream.time_base
        if self.recorder is not None:
            self.recorder.begin(stream)
        try:
            packets = container.demux(stream)
            if self._file_path is None:
                packets = itertools.chain(self._settle(packets, time_base), packets)
            while True:
                decoded_before = self.frames_decoded
                for packet in packets:
                    if self._stop.is_set():
                        return "stopped", "stopped"
                    try:
                        frames = packet.decode()
                    except av.error.InvalidDataError:   # e.g. the truncated last packet of a dying RTSP session
                        self.packets_skipped += 1
                        continue
                    for frame in frames:
                        self._on_frame(frame, time_base)
                        if self._stop.is_set():
                            return "stopped", "stopped"
                    if self.recorder is not None:       # after decoding: the clock knows the packet's time
                        self.recorder.write(packet, self._clock)
                if self._file_path is None or self.frames_decoded == decoded_before:
                    return "eof", "eof"
                container.seek(0)                       # PtsClock re-anchors the restarted pts just after the last
                self.loops += 1                         # frame; the rate sampler keeps its phase
                packets = container.demux(stream)
        except av.error.FFmpegError as e:               # ExitError (read timeout), TimeoutError, OSError (EIO) ...
            return CONNECTION_LOST, describe_error(e, self.config.url)
        except UnusableVideo as e:                      # frames decoded: the source is video, nothing to hide
            return str(e), str(e)
        except Exception as e:                          # a bug must not kill the feed: report it and reconnect
            log.exception("feed %s: unexpected error while reading", self.config.source_id)
            return "internal error", f"internal error: {type(e).__name__}: {e}"
        finally:
            if self.recorder is not None:
                self.recorder.end()
            try:
                container.close()
            except Exception:                           # closing a broken connection may fail again
                pass

    def _settle(self, packets, time_base) -> list:
        """Read what a new connection had buffered (the open's probe, a start the reader fell behind on, a whole HLS
        segment) before decoding any of it, bounding the clock by each packet's arrival; return those packets.

        Buffered packets come at once; the source is live at the first packet with a later pts that had to be
        waited for (at least half its pts step). So the buffered frames get times in the past, where they were
        captured, instead of the first being anchored at the moment the reader got to it and all the others
        running ahead of the clock (docs/architecture.md, "Streams and protocols")."""
        held: list = []
        last_pts = last_arrival = None
        for packet in packets:
            arrival = time.time()
            held.append(packet)
            if packet.pts is None:
                continue
            pts_s = float(packet.pts * time_base)
            self._clock.bound(pts_s, arrival)
            if last_pts is None or pts_s > last_pts:
                if last_pts is not None and arrival - last_arrival >= (pts_s - last_pts) / 2:
                    break
                last_pts, last_arrival = pts_s, arrival
            if self._stop.is_set() or len(held) >= SETTLE_MAX_PACKETS:
                break
        return held

    def _on_frame(self, frame, time_base) -> None:
        now = time.time()
        self.frames_decoded += 1
        pts = frame.pts
        pts_s = float(pts * (frame.time_base or time_base)) if pts is not None else None
        t = self._clock.to_epoch(pts_s, now)
        if self._file_path is not None and t > now:
            if self._stop.wait(t - now):               # play a file at real time; stop stays prompt
                return
        self.last_decoded_time = t
        if self._open_gap is not None:
            self._close_gap(t)
        if not self._rate.take(t):
            return
        size = self._target(frame.height, frame.width)
        rgb = upright(frame, frame.to_ndarray(height=size[0], width=size[1], format="rgb24",
                                              interpolation=INTERPOLATION))
        self.frames_sampled += 1
        self.last_frame_time = t
        self.frame_size = rgb.shape[:2]
        turned = quarter_turns(frame) % 2
        source_size = (frame.height, frame.width) if turned else (frame.width, frame.height)
        self._emit_segments(self._builder.add(t, rgb, source_size))

    def _target(self, height: int, width: int) -> tuple[int, int]:
        key = (height, width)
        if key not in self._sizes:
            try:
                size = smart_resize(height, width, factor=FACTOR, min_pixels=self.config.min_pixels,
                                    max_pixels=self.config.max_pixels)
            except ValueError as e:
                raise UnusableVideo(f"frames of {width}x{height} cannot be resized for the model: {e}") from None
            self._sizes[key] = tuple(size)
        return self._sizes[key]

    def _emit_segments(self, segments: list[Segment]) -> None:
        for seg in segments:
            self.segments_produced += 1
            self.last_segment_time = seg.t1
            dropped = self.queue.put(seg)
            if dropped is not None:
                log.info("feed %s: consumer behind, dropped segment %s", self.config.source_id, dropped.segment_id)

    def _disconnected(self, reason: str, detail: str) -> None:
        self._emit_segments(self._builder.flush())     # keep what was read before the drop
        self._set_error(f"disconnected: {reason}", f"disconnected: {detail}")
        now = time.time()
        with self._lock:
            if self._open_gap is None and self.last_decoded_time is not None:
                self._open_gap = {"start": self.last_decoded_time, "end": None, "reason": reason, "detected": now}
        self.connected = False                         # last, so status() never shows a silent disconnect
        self._event("disconnected", {"reason": reason})

    def _close_gap(self, t: float) -> None:
        with self._lock:
            gap, self._open_gap = self._open_gap, None
            gap["end"] = t
            gap["seconds"] = t - gap["start"]
            self._gaps.append(gap)
            self.gap_count += 1

    def _wait(self, delay_s: float) -> None:
        if delay_s <= 0:
            return
        self.backoff_s = delay_s
        self._stop.wait(delay_s)
        self.backoff_s = None

    def _set_error(self, message: str, detail: str | None = None) -> None:
        """Record an error: `message` for the feed's readers, `detail` (default: the message) for logs and admins."""
        detail = detail or message
        with self._lock:
            self.last_error, self.last_error_detail, self.last_error_time = message, detail, time.time()
        log.warning("feed %s: %s", self.config.source_id, detail)

    def _event(self, kind: str, fields: dict) -> None:
        if self.on_event is None:
            return
        try:
            self.on_event(kind, {"source_id": self.config.source_id, "url": redact_url(self.config.url), **fields})
        except Exception:                              # an event sink problem must not stop the feed
            log.exception("feed %s: event hook failed", self.config.source_id)

    # ---- status -----------------------------------------------------------------------------------------------
    def status(self) -> dict:
        now = time.time()
        with self._lock:
            gaps = [dict(g) for g in self._gaps]
            open_gap = dict(self._open_gap) if self._open_gap else None
            last_error, last_error_time = self.last_error, self.last_error_time
            last_error_detail = self.last_error_detail
        last = self.last_frame_time
        return {
            "source_id": self.config.source_id,
            "url": redact_url(self.config.url),
            "running": self.running,
            "connected": self.connected,
            "started_at": self.started_at,
            "last_frame_time": last,
            "lag_s": None if last is None else now - last,
            "frame_size": list(self.frame_size) if self.frame_size else None,
            "frames_decoded": self.frames_decoded,
            "frames_sampled": self.frames_sampled,
            "segments_produced": self.segments_produced,
            "last_segment_time": self.last_segment_time,
            "queued": len(self.queue),
            "pending_frames": self._builder.pending,
            "drops": self.queue.drops,
            "connects": self.connects,
            "reconnects": self.reconnects,
            "open_failures": self.open_failures,
            "packets_skipped": self.packets_skipped,
            "loops": self.loops,
            "reanchors": self._clock.reanchors,
            "backoff_s": self.backoff_s,
            "gap_count": self.gap_count,
            "gaps": gaps,
            "open_gap": open_gap,
            "last_error": last_error,
            "last_error_detail": last_error_detail,
            "last_error_time": last_error_time,
            **(self.recorder.status() if self.recorder is not None else {"recording_error": None}),
        }
