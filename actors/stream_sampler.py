"""The live-feed reading loop, without Ray: open a stream with PyAV, sample 2 fps by timestamp, cut segments.

One StreamSampler reads one source in a background thread:

    open (PyAV, always with timeouts) -> demux -> decode -> map pts to epoch seconds -> take the first frame
    every 1/fps s -> convert only that frame, straight from YUV to the smart_resize size -> segments
    of `segment_seconds` on a fixed epoch grid -> bounded queue that drops the OLDEST segment when full.

Live sources die, hang and restart (/work/shared/STREAMS.md section 5 lists how PyAV reacts). Both the end of
iteration and any av.error.FFmpegError count as "disconnected": the partial segment is flushed (padded to an
even frame count), the gap is recorded once frames flow again, and the source is reopened with capped
exponential backoff plus jitter. Local files (a path or file://) are played at real time and loop at EOF, so a
demo file behaves like a camera.

FeedReader (actors/feeds.py) wraps one StreamSampler in a Ray actor; tests drive StreamSampler directly.
"""
from __future__ import annotations

import collections
import functools
import logging
import math
import random
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

import av
import numpy as np

from pipeline.records import Segment
from pipeline.settings import FEED_READER_SCHEMES, redact_url

log = logging.getLogger(__name__)

NETWORK_SCHEMES = FEED_READER_SCHEMES
ALLOWED_SCHEMES = (*NETWORK_SCHEMES, "file")
INTERPOLATION = "BICUBIC"          # the reference processor resizes with bicubic (QWEN2VL_SPEC 2.1)
_EPS = 1e-6                         # seconds; absorbs float error in pts * time_base and grid arithmetic
_MIN_STEP_S = 1e-3                  # re-anchored times stay at least this far after the previous frame


# The FFmpeg protocol a network scheme needs (rtsp runs over tcp, rtsps over tls). PyAV wheels bundle their own
# FFmpeg, whose build may leave some out: the one measured here has no libsrt.
_PROTOCOL_OF = {"rtsp": "tcp", "rtsps": "tls", "http": "http", "https": "https", "udp": "udp", "srt": "srt"}


@functools.cache
def ffmpeg_protocols() -> frozenset[str] | None:
    """Names of the protocols of the libavformat PyAV runs (its avio_enum_protocols), or None when that library
    cannot be found (then nothing is refused up front and a missing protocol shows as the feed's open error)."""
    import ctypes
    import ctypes.util
    import glob
    import os

    wheel_libs = os.path.join(os.path.dirname(av.__file__), os.pardir, "av.libs")
    found = sorted(glob.glob(os.path.join(wheel_libs, "libavformat*"))) or [ctypes.util.find_library("avformat")]
    if not found[0]:
        return None
    try:
        lib = ctypes.CDLL(found[0])
        lib.avio_enum_protocols.restype = ctypes.c_char_p
        lib.avio_enum_protocols.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_int]
    except (OSError, AttributeError):
        return None
    cursor, names = ctypes.c_void_p(None), set()
    while (name := lib.avio_enum_protocols(ctypes.byref(cursor), 0)) is not None:    # 0: input protocols
        names.add(name.decode())
    return frozenset(names)


class UnusableVideo(ValueError):
    """The stream decodes, but its frames cannot be used (e.g. smaller than one 28x28 merged patch)."""


# ---------------------------------------------------------------- URLs

def validate_feed_url(url: Any, schemes: tuple[str, ...] | list[str] = ALLOWED_SCHEMES) -> str:
    """Return the URL stripped of surrounding blanks, or raise ValueError saying what is wrong.

    A URL without a scheme is a local file path (allowed only when "file" is in `schemes`). Network URLs
    need a host or a port ("udp://:5600" listens on every interface).
    """
    if not isinstance(url, str) or not url.strip():
        raise ValueError(f"feed url must be a non-empty string, got {url!r}")
    url = url.strip()
    if any(ord(c) < 32 for c in url):
        raise ValueError(f"feed url must not contain control characters, got {redact_url(url)!r}")
    allowed = tuple(s.lower() for s in schemes)
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if "://" not in url or not scheme:
        if "file" not in allowed:
            raise ValueError(f"feed url {url!r} has no scheme; expected one of {', '.join(allowed)}")
        return url
    if scheme not in allowed:
        raise ValueError(f"unsupported feed url scheme {scheme!r} in {redact_url(url)!r}; "
                         f"expected one of {', '.join(allowed)}")
    if scheme == "file":
        if not unquote(parts.path):
            raise ValueError(f"file url {url!r} names no path; expected file:///absolute/path.mp4")
        return url
    try:
        port = parts.port
    except ValueError as e:
        raise ValueError(f"feed url {redact_url(url)!r} has a bad port: {e}") from None
    if not parts.hostname and port is None:
        raise ValueError(f"feed url {redact_url(url)!r} names no host; expected {scheme}://HOST[:PORT]/...")
    return url


def check_protocol(url: str) -> None:
    """ValueError when the FFmpeg PyAV runs lacks the protocol the URL's scheme needs. Registration calls this;
    a feed stored before (or under another PyAV) stays registered and shows "Protocol not found" as its open error."""
    scheme = urlsplit(url).scheme.lower() if "://" in url else ""
    protocol = _PROTOCOL_OF.get(scheme, scheme)
    protocols = ffmpeg_protocols()
    if protocol and protocols is not None and protocol not in protocols:     # bare paths have no scheme
        raise ValueError(f"{scheme}:// feeds need FFmpeg's {protocol!r} protocol, which the FFmpeg that "
                         f"PyAV {av.__version__} runs here was built without; use another scheme or a PyAV built "
                         "against an FFmpeg that has it")


def local_file_path(url: str) -> str | None:
    """The local path of a file source (bare path or file://), or None for a network source."""
    parts = urlsplit(url)
    if "://" not in url or not parts.scheme:
        return url
    if parts.scheme.lower() == "file":
        return unquote(parts.path)
    return None


def open_arguments(url: str, open_s: float, read_s: float, hls_hold_counters: int) -> tuple[str, dict[str, str]]:
    """(url, options) for av.open: per-protocol settings measured in STREAMS.md section 5."""
    scheme = urlsplit(url).scheme.lower()
    options: dict[str, str] = {}
    if scheme in ("rtsp", "rtsps"):
        options["rtsp_transport"] = "tcp"
        # RTSP socket timeout in µs; a stalled server raises TimeoutError after about twice this value,
        # so half the read timeout makes it fire at about read_s (PyAV's own timeout alone takes ~2x read_s).
        options["timeout"] = str(max(250_000, int(read_s * 1e6 / 2)))
        options["analyzeduration"] = "100000"   # fast probe: open in ~0.2 s instead of ~1.2 s, no start burst
        options["probesize"] = "32768"
    elif scheme in ("http", "https"):
        # HLS demuxer options (ignored by the other HTTP demuxers): start at the live edge, and end after a
        # few playlist reloads without a new segment instead of reloading a dead writer's playlist forever.
        options["live_start_index"] = "-1"
        options["m3u8_hold_counters"] = str(hls_hold_counters)
    elif scheme == "udp":
        # A big FIFO (counted in 188-byte packets) so a burst is not an EIO; overruns drop data, not the stream.
        query = dict(parse_qsl(urlsplit(url).query, keep_blank_values=True))
        extra = {k: v for k, v in (("fifo_size", "1000000"), ("overrun_nonfatal", "1")) if k not in query}
        if extra:
            parts = urlsplit(url)
            q = parts.query + ("&" if parts.query else "") + urlencode(extra)
            url = urlunsplit((parts.scheme, parts.netloc, parts.path, q, parts.fragment))
    return url, options


def describe_error(exc: BaseException, url: str) -> str:
    """'TypeName: message' with any password in the URL hidden."""
    text = f"{type(exc).__name__}: {exc}"
    safe = redact_url(url)
    return text.replace(url, safe) if safe != url else text


# ---------------------------------------------------------------- timing

class PtsClock:
    """Maps a source's presentation times (seconds) to wall-clock epoch seconds.

    The first frame of a connection is anchored at time.time(); later frames follow their pts from that anchor,
    so the source's own spacing is kept even when frames arrive in bursts (the RTSP probe, HLS segments). Then:
    - pts go backwards (sender restarted) or jump forward more than `max_jump_s`: re-anchor keeping the real
      time elapsed since the previous frame arrived;
    - the mapped time runs more than `max_ahead_s` ahead of the wall clock, or `max_jump_s` behind it (the
      camera's clock drifts, or the source stalled while its pts ran on): re-anchor at the wall clock.
    Times never decrease, across re-anchors and reconnects alike. A burst at the start of a connection makes
    times run ahead of arrival by up to its length (about 0.1-0.2 s for RTSP with the fast probe).
    """

    def __init__(self, max_jump_s: float = 10.0, max_ahead_s: float = 2.0):
        if not max_jump_s > 0 or not max_ahead_s > 0:
            raise ValueError(f"max_jump_s and max_ahead_s must be > 0, got {max_jump_s}, {max_ahead_s}")
        self.max_jump_s, self.max_ahead_s = max_jump_s, max_ahead_s
        self.reanchors = 0
        self.last_t: float | None = None             # epoch time given to the previous frame
        self._offset: float | None = None            # epoch seconds - pts seconds
        self._last_pts: float | None = None
        self._last_arrival: float | None = None      # wall clock when the previous frame arrived

    def reset(self) -> None:
        """Forget the anchor (a new connection); times still never go below the last one given."""
        self._offset = None
        self._last_pts = None

    def _not_before_last(self, t: float) -> float:
        return t if self.last_t is None else max(t, self.last_t + _MIN_STEP_S)

    def to_epoch(self, pts_s: float | None, now: float) -> float:
        if pts_s is None:
            if self._offset is None:                 # no pts before any anchor (first RTSP frame): the clock
                t = self._not_before_last(now)
                self.last_t, self._last_arrival = t, now
                return t
            pts_s = self._last_pts + _MIN_STEP_S     # otherwise just after the previous frame
        if self._offset is None:
            self._offset = self._not_before_last(now) - pts_s
        else:
            follow = pts_s + self._offset
            if pts_s < self._last_pts - _EPS or pts_s - self._last_pts > self.max_jump_s:
                elapsed = max(_MIN_STEP_S, now - self._last_arrival)
                self._offset = self.last_t + elapsed - pts_s
                self.reanchors += 1
            elif follow - now > self.max_ahead_s or now - follow > self.max_jump_s:
                self._offset = self._not_before_last(now) - pts_s
                self.reanchors += 1
        t = max(pts_s + self._offset, self.last_t if self.last_t is not None else -math.inf)
        self._last_pts, self._last_arrival, self.last_t = pts_s, now, t
        return t


class RateSampler:
    """Takes one frame per 1/fps seconds by timestamp: the first frame, then the first at or after each due time.

    Due times step by exactly 1/fps, so the rate does not drift (a 25 fps source gives frames 0.52 and 0.48 s
    apart, 2 per second); a frame more than half a period late (after a gap) is taken and restarts the phase.
    """

    def __init__(self, fps: float):
        if not fps > 0:
            raise ValueError(f"fps must be > 0, got {fps}")
        self.period = 1.0 / fps
        self._due: float | None = None

    def take(self, t: float) -> bool:
        if self._due is not None and t < self._due - 1e-3:     # 1 ms: float error in pts * time_base
            return False
        late = self._due is None or t - self._due > self.period / 2
        self._due = (t if late else self._due) + self.period
        return True

    def restart(self) -> None:
        """Take the next frame whatever its time (a new connection starts a new phase)."""
        self._due = None


# ---------------------------------------------------------------- segments

class SegmentBuilder:
    """Groups sampled frames into segments on a fixed epoch grid of `segment_seconds`.

    Same rules as the archive path (pipeline/tubes.py iter_segments): window k holds frames with
    k*segment_seconds <= t < (k+1)*segment_seconds; a frame-size change starts a new segment; an odd count
    repeats the last frame (stamped t1) and is marked padded. A full window is emitted at once, without
    waiting for the next frame, to keep live latency low.
    """

    def __init__(self, source_id: str, fps: float, segment_seconds: float):
        per_segment = fps * segment_seconds
        if abs(per_segment - round(per_segment)) > 1e-6 or round(per_segment) < 2 or round(per_segment) % 2:
            raise ValueError(f"fps * segment_seconds must be an even whole number of frames (two per tube), "
                             f"got {fps} * {segment_seconds} = {per_segment:g}")
        self.source_id, self.fps, self.segment_seconds = source_id, fps, segment_seconds
        self.frames_per_segment = round(per_segment)
        self._key: tuple | None = None
        self._ts: list[float] = []
        self._frames: list[np.ndarray] = []

    def add(self, t: float, frame: np.ndarray) -> list[Segment]:
        """Add one frame (uint8 [H, W, 3]); return the segments this completes (0, 1 or 2)."""
        done = []
        key = (math.floor(t / self.segment_seconds + _EPS), frame.shape)
        if self._key is not None and key != self._key:
            done.extend(self.flush())
        self._key = key
        self._ts.append(t)
        self._frames.append(frame)
        if len(self._frames) >= self.frames_per_segment:
            done.extend(self.flush())
        return done

    @property
    def pending(self) -> int:
        """Frames of the segment being filled."""
        return len(self._frames)

    def flush(self) -> list[Segment]:
        """The partial segment (padded to an even count), if any; used at a window change, disconnect or stop."""
        if not self._frames:
            return []
        ts, frames = self._ts, self._frames
        self._key, self._ts, self._frames = None, [], []
        t1 = ts[-1] + 1.0 / self.fps            # the last frame is on screen until the next sample time
        padded = len(frames) % 2 == 1
        if padded:                               # reference rule: repeat the last frame
            frames, ts = frames + [frames[-1]], ts + [t1]
        return [Segment(source_id=self.source_id, segment_id="", t0=ts[0], t1=t1, frame_ts=ts,
                        frames=np.stack(frames), padded=padded)]


class SegmentQueue:
    """Bounded FIFO of segments; put() drops the OLDEST segment when full and counts it."""

    def __init__(self, maxsize: int):
        if not isinstance(maxsize, int) or maxsize < 1:
            raise ValueError(f"queue size must be an int >= 1, got {maxsize!r}")
        self.maxsize = maxsize
        self.drops = 0
        self._items: collections.deque[Segment] = collections.deque()
        self._cond = threading.Condition()

    def put(self, segment: Segment) -> Segment | None:
        """Append; return the segment dropped to make room, if any."""
        with self._cond:
            dropped = None
            if len(self._items) >= self.maxsize:
                dropped = self._items.popleft()
                self.drops += 1
            self._items.append(segment)
            self._cond.notify_all()
            return dropped

    def get_many(self, max_n: int = 8, timeout_s: float = 1.0) -> list[Segment]:
        """Up to max_n segments, oldest first; waits up to timeout_s for the first one ([] on timeout)."""
        if not isinstance(max_n, int) or max_n < 1:
            raise ValueError(f"max_n must be an int >= 1, got {max_n!r}")
        if timeout_s < 0:
            raise ValueError(f"timeout_s must be >= 0, got {timeout_s}")
        with self._cond:
            self._cond.wait_for(lambda: len(self._items) > 0, timeout=timeout_s)
            n = min(max_n, len(self._items))
            return [self._items.popleft() for _ in range(n)]

    def __len__(self) -> int:
        with self._cond:
            return len(self._items)


class Backoff:
    """Exponential reconnect delays: initial * 2**n, capped at max_s, each shortened by up to `jitter` (random)."""

    def __init__(self, initial_s: float, max_s: float, jitter: float = 0.2, rng: random.Random | None = None):
        if not 0 < initial_s <= max_s:
            raise ValueError(f"backoff needs 0 < initial_s <= max_s, got {initial_s}, {max_s}")
        if not 0 <= jitter < 1:
            raise ValueError(f"backoff jitter must be in [0, 1), got {jitter}")
        self.initial_s, self.max_s, self.jitter = initial_s, max_s, jitter
        self.failures = 0
        self._rng = rng or random.Random()

    def next_delay(self) -> float:
        base = min(self.max_s, self.initial_s * 2.0 ** min(self.failures, 60))
        self.failures += 1
        return base * (1.0 - self.jitter * self._rng.random())

    def reset(self) -> None:
        self.failures = 0


# ---------------------------------------------------------------- config

@dataclass
class SamplerConfig:
    source_id: str
    url: str
    fps: float = 2.0
    segment_seconds: float = 8.0
    min_pixels: int = 128 * 28 * 28
    max_pixels: int = 768 * 28 * 28
    queue_size: int = 4                 # segments held for the consumer; the oldest is dropped beyond this
    open_timeout_s: float = 5.0
    read_timeout_s: float = 5.0
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 30.0
    backoff_jitter: float = 0.2
    max_pts_jump_s: float = 10.0        # a larger pts jump, or drifting this far behind the clock, re-anchors
    max_ahead_s: float = 2.0            # frame times running further ahead of the wall clock re-anchor
    hls_hold_counters: int = 5          # HLS playlist reloads without a new segment before EOF
    max_gaps_kept: int = 100            # gaps listed in status(); gap_count counts them all

    def __post_init__(self):
        if not isinstance(self.source_id, str) or not self.source_id or ":" in self.source_id:
            raise ValueError(f"source_id must be a non-empty str without ':', got {self.source_id!r}")
        self.url = validate_feed_url(self.url)
        SegmentBuilder(self.source_id, self.fps, self.segment_seconds)     # validates fps * segment_seconds
        if not 28 * 28 <= self.min_pixels <= self.max_pixels:
            raise ValueError(f"need 784 <= min_pixels <= max_pixels, got {self.min_pixels}, {self.max_pixels}")
        for name in ("open_timeout_s", "read_timeout_s", "backoff_initial_s", "backoff_max_s", "max_pts_jump_s",
                     "max_ahead_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0 seconds, got {getattr(self, name)}")
        if self.backoff_max_s < self.backoff_initial_s:
            raise ValueError(f"backoff_max_s ({self.backoff_max_s}) must be >= backoff_initial_s "
                             f"({self.backoff_initial_s})")
        if not 0 <= self.backoff_jitter < 1:
            raise ValueError(f"backoff_jitter must be in [0, 1), got {self.backoff_jitter}")
        if not isinstance(self.queue_size, int) or self.queue_size < 1:
            raise ValueError(f"queue_size must be an int >= 1, got {self.queue_size!r}")
        if self.hls_hold_counters < 1 or self.max_gaps_kept < 1:
            raise ValueError("hls_hold_counters and max_gaps_kept must be >= 1")

    @property
    def frames_per_segment(self) -> int:
        return round(self.fps * self.segment_seconds)

    @classmethod
    def from_settings(cls, source_id: str, url: str, settings: Any = None, **overrides: Any) -> "SamplerConfig":
        """Defaults from pipeline.settings.Settings (fps, segment_seconds, pixels, queue, backoff cap)."""
        if settings is None:
            from pipeline.settings import load_settings
            settings = load_settings()
        values = dict(fps=settings.fps, segment_seconds=settings.segment_seconds,
                      min_pixels=settings.min_pixels, max_pixels=settings.max_pixels,
                      queue_size=settings.feed_queue_segments, backoff_max_s=settings.feed_reconnect_max_seconds)
        values["backoff_initial_s"] = min(cls.backoff_initial_s, values["backoff_max_s"])
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(source_id=source_id, url=url, **values)


# ---------------------------------------------------------------- the sampler

EventHook = Callable[[str, dict], None]


class StreamSampler:
    """Reads one source in a background thread: start(), next_segments(), status(), stop().

    `on_event(kind, fields)` (optional) is called from the reading thread on state changes:
    "connected", "disconnected" (with the reason) and "open_failed" (first failure of a streak only).
    """

    def __init__(self, config: SamplerConfig, on_event: EventHook | None = None):
        self.config = config
        self.on_event = on_event
        self.queue = SegmentQueue(config.queue_size)
        self._file_path = local_file_path(config.url)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()           # guards the gap list and error fields read by status()
        self._clock = PtsClock(config.max_pts_jump_s, config.max_ahead_s)
        self._rate = RateSampler(config.fps)
        self._builder = SegmentBuilder(config.source_id, config.fps, config.segment_seconds)
        self._sizes: dict[tuple[int, int], tuple[int, int]] = {}   # source (h, w) -> target (h, w)
        # status counters (written by the reading thread only)
        self.connected = False
        self.connects = 0
        self.reconnects = 0
        self.open_failures = 0
        self.frames_decoded = 0
        self.frames_sampled = 0
        self.segments_produced = 0
        self.packets_skipped = 0
        self.last_frame_time: float | None = None    # epoch time of the last sampled frame
        self.last_decoded_time: float | None = None  # epoch time of the last decoded frame
        self.last_segment_time: float | None = None  # end time (t1) of the last completed segment
        self.last_error: str | None = None
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
                    self._set_error(f"open failed: internal error: {type(e).__name__}: {e}")
                    self._wait(backoff.next_delay())
                    continue
                if container is None:
                    continue
                sampled_before = self.frames_sampled
                reason = self._read(container)
                if self.frames_sampled > sampled_before:
                    backoff.reset()                 # it worked for a while: retry soon
                if self._stop.is_set():
                    break
                self._disconnected(reason)
                self._wait(backoff.next_delay())
        finally:
            self._emit_segments(self._builder.flush())
            self.connected = False
            self.backoff_s = None

    def _open(self, backoff: Backoff):
        cfg = self.config
        url, options = open_arguments(cfg.url, cfg.open_timeout_s, cfg.read_timeout_s, cfg.hls_hold_counters)
        if self._file_path is not None:
            url, options = self._file_path, {}
        try:
            container = av.open(url, options=options, timeout=(cfg.open_timeout_s, cfg.read_timeout_s))
        except (av.error.FFmpegError, OSError) as e:
            self.open_failures += 1
            first_of_streak = backoff.failures == 0
            self._set_error(f"open failed: {describe_error(e, cfg.url)}")
            if first_of_streak:
                self._event("open_failed", {"error": self.last_error})
            self._wait(backoff.next_delay())
            return None
        if not container.streams.video:
            container.close()
            self.open_failures += 1
            self._set_error("open failed: the source has no video stream")
            self._wait(backoff.next_delay())
            return None
        if self.connects > 0:
            self.reconnects += 1
        self.connects += 1
        self.connected = True
        self._clock.reset()                         # a new connection may start its pts anywhere
        self._rate.restart()
        self._event("connected", {"reconnects": self.reconnects})
        return container

    def _read(self, container) -> str:
        """Demux and decode until EOF, an error or stop(); return why it ended."""
        stream = container.streams.video[0]
        time_base = stream.time_base
        try:
            for packet in container.demux(stream):
                if self._stop.is_set():
                    return "stopped"
                try:
                    frames = packet.decode()
                except av.error.InvalidDataError:       # e.g. the truncated last packet of a dying RTSP session
                    self.packets_skipped += 1
                    continue
                for frame in frames:
                    self._on_frame(frame, time_base)
                    if self._stop.is_set():
                        return "stopped"
            return "eof"
        except av.error.FFmpegError as e:               # ExitError (read timeout), TimeoutError, OSError (EIO) ...
            return describe_error(e, self.config.url)
        except UnusableVideo as e:
            return str(e)
        except Exception as e:                          # a bug must not kill the feed: report it and reconnect
            log.exception("feed %s: unexpected error while reading", self.config.source_id)
            return f"internal error: {type(e).__name__}: {e}"
        finally:
            try:
                container.close()
            except Exception:                           # closing a broken connection may fail again
                pass

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
        from pipeline.decode import upright             # here, like smart_resize in _target: it loads torch
        rgb = upright(frame, frame.to_ndarray(height=size[0], width=size[1], format="rgb24",
                                              interpolation=INTERPOLATION))
        self.frames_sampled += 1
        self.last_frame_time = t
        self.frame_size = rgb.shape[:2]
        self._emit_segments(self._builder.add(t, rgb))

    def _target(self, height: int, width: int) -> tuple[int, int]:
        key = (height, width)
        if key not in self._sizes:
            # imported here: qwen2vl.processor loads torch, which only the reading process needs
            from qwen2vl.processor import smart_resize
            try:
                size = smart_resize(height, width, factor=28, min_pixels=self.config.min_pixels,
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

    def _disconnected(self, reason: str) -> None:
        self._emit_segments(self._builder.flush())     # keep what was read before the drop
        if reason != "eof" or self._file_path is None:
            self._set_error(f"disconnected: {reason}")
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
        self.backoff_s = delay_s
        self._stop.wait(delay_s)
        self.backoff_s = None

    def _set_error(self, message: str) -> None:
        with self._lock:
            self.last_error, self.last_error_time = message, time.time()
        log.warning("feed %s: %s", self.config.source_id, message)

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
            "reanchors": self._clock.reanchors,
            "backoff_s": self.backoff_s,
            "gap_count": self.gap_count,
            "gaps": gaps,
            "open_gap": open_gap,
            "last_error": last_error,
            "last_error_time": last_error_time,
        }


__all__ = ["ALLOWED_SCHEMES", "Backoff", "UnusableVideo", "PtsClock", "SamplerConfig", "SegmentBuilder", "SegmentQueue",
           "RateSampler", "StreamSampler", "describe_error", "local_file_path", "open_arguments",
           "validate_feed_url", "check_protocol"]
