"""Events to Redis streams, with a bounded on-disk outbox for when Redis is away (docs/architecture.md, "Events").

`EventSink.emit(stream, fields)` XADDs one entry (MAXLEN ~ trimmed) and returns its id. When Redis is unreachable the
event is written to the outbox (one JSON file per event, named by a sequence number, so it survives a restart) and
`emit` returns None. The outbox is delivered in order before any newer event: on the next emit, on `flush()`, and by a
background thread every `flush_interval_s` while it is not empty. When the outbox is full the oldest event is dropped,
counted in `dropped` and logged as an error; after Redis returns, one `events_dropped` entry in the errors stream
reports the count. An XADD that failed on the way may still have been applied (Redis executed it, then the
connection died before the reply): such an event is marked uncertain, and before it is sent again the stream's
entries since it was queued are searched for one with exactly its fields, so an outage does not repeat it. What
remains at-least-once: a crash between XADD and removing the outbox file repeats that event.
One outbox folder belongs to one EventSink at a time.
"""
from __future__ import annotations

import json
import logging
import os
import threading
import time
import uuid
from collections import deque
from collections.abc import Mapping

import numpy as np
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from pipeline import metrics
from pipeline.video.protocols import redact_url

log = logging.getLogger("tubescope.events")

# Every stream tubescope writes; keys are namespaced "tubescope:".
STREAM_PREFIX = "tubescope:"
SEGMENTS_STREAM = "tubescope:segments"     # one entry per indexed segment
ERRORS_STREAM = "tubescope:errors"         # one entry per failure (bad file, dead feed, dropped events)
ANSWERS_STREAM = "tubescope:answers"       # one entry per answered question
SEARCHES_STREAM = "tubescope:searches"     # one entry per search, with its ranked segments
CAPTIONS_STREAM = "tubescope:captions"     # one entry per segment captioned (caption text, no vector)
SUMMARIES_STREAM = "tubescope:summaries"   # one entry per summary: every line, bottom up, with its times
ALERTS_STREAM = "tubescope:alerts"
STREAMS = (SEGMENTS_STREAM, ERRORS_STREAM, ANSWERS_STREAM, SEARCHES_STREAM, CAPTIONS_STREAM, SUMMARIES_STREAM,
           ALERTS_STREAM)

UNCERTAIN_LOOKBACK_S = 5.0          # an uncertain event is looked for among entries from this long before it
UNCERTAIN_SCAN_ENTRIES = 10_000     # and among at most this many of them
DEFAULT_MAXLEN = 100_000
DEFAULT_OUTBOX_MAX = 10_000

# Redis is away or cannot take writes right now: keep the event for later. Other errors are our bugs.
_UNAVAILABLE = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, redis.exceptions.ReadOnlyError,
                redis.exceptions.OutOfMemoryError, OSError)


def _json_default(value):
    if isinstance(value, (np.generic, np.ndarray)):
        return value.tolist()
    raise ValueError(f"event field value of type {type(value).__name__} is not JSON-serializable")


def _text(value) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def flatten_fields(fields: Mapping) -> dict[str, str]:
    """Fields as flat str -> str: strings stay, anything else (numbers, lists, dicts, None) becomes JSON."""
    if not isinstance(fields, Mapping) or not fields:
        raise ValueError(f"event fields must be a non-empty mapping of str -> value, got {fields!r}")
    out = {}
    for key, value in fields.items():
        if not isinstance(key, str) or not key:
            raise ValueError(f"event field names must be non-empty str, got {key!r}")
        if isinstance(value, (bytes, bytearray)):
            raise ValueError(f"event field {key!r} is bytes; send text (or base64) instead")
        out[key] = value if isinstance(value, str) else json.dumps(value, default=_json_default)
    return out


def _check_stream(stream) -> str:
    if not isinstance(stream, str) or not stream.startswith(STREAM_PREFIX) or len(stream) == len(STREAM_PREFIX):
        raise ValueError(f"stream must be a name under {STREAM_PREFIX!r} (see pipeline.events.STREAMS), got {stream!r}")
    return stream


def _check_positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


class EventSink:
    """XADD events to Redis streams; park them in a bounded on-disk outbox while Redis is unreachable."""

    def __init__(self, redis_url_or_client: str | redis.Redis, outbox_dir: str | os.PathLike,
                 maxlen: int = DEFAULT_MAXLEN, outbox_max: int = DEFAULT_OUTBOX_MAX,
                 flush_interval_s: float | None = 5.0, retry_after_s: float = 1.0):
        if isinstance(redis_url_or_client, redis.Redis):
            self.client = redis_url_or_client
        elif isinstance(redis_url_or_client, str) and "://" in redis_url_or_client:
            try:   # short timeouts and one retry: a dead server must cost milliseconds, a restarted one must reconnect
                self.client = redis.Redis.from_url(redis_url_or_client, socket_connect_timeout=1.0,
                                                   socket_timeout=2.0, retry=Retry(NoBackoff(), 1))
            except ValueError as e:
                raise ValueError(f"bad Redis URL {redact_url(redis_url_or_client)!r}: {e}") from None
        else:
            raise ValueError(f"expected a Redis URL (redis://host:port/db) or a redis.Redis client, "
                             f"got {type(redis_url_or_client).__name__}")
        self.maxlen = _check_positive_int("maxlen", maxlen)
        self.outbox_max = _check_positive_int("outbox_max", outbox_max)
        if flush_interval_s is not None and not flush_interval_s > 0:
            raise ValueError(f"flush_interval_s must be > 0 or None, got {flush_interval_s!r}")
        self.flush_interval_s = flush_interval_s
        self.retry_after_s = float(retry_after_s)
        self.outbox_dir = os.path.abspath(os.fspath(outbox_dir))
        os.makedirs(self.outbox_dir, exist_ok=True)

        self.delivered = 0          # entries XADDed (fresh and from the outbox)
        self.queued = 0             # events that went to the outbox
        self.dropped = 0            # events that will never be delivered (outbox full, rejected by Redis, unreadable)
        self._unreported_drops = 0
        self._lock = threading.RLock()
        self._closed = threading.Event()
        self._flusher: threading.Thread | None = None
        self._down_until = 0.0      # after a failure, skip Redis until then (events go straight to the outbox)
        self._uncertain: set[str] = set()   # outbox events whose delivery failed on the way (maybe applied)
        self._outbox: deque[str] = deque(self._load_outbox())
        self._next_seq = int(self._outbox[-1].split(".")[0]) + 1 if self._outbox else 0
        if self._outbox:
            log.warning("event outbox %s holds %d undelivered events", self.outbox_dir, len(self._outbox))
            self._ensure_flusher()
        metrics.record_outbox_depth(self.outbox_dir, len(self._outbox))

    # ---- public ----------------------------------------------------------------------------------------------------
    def emit(self, stream: str, fields: Mapping) -> str | None:
        """XADD to `stream`; returns the entry id, or None when the event was parked in the outbox."""
        stream, flat = _check_stream(stream), flatten_fields(fields)
        with self._lock:
            if self._outbox and time.monotonic() >= self._down_until:
                self._flush_locked()            # older events first: order is kept
            if self._outbox or time.monotonic() < self._down_until:
                self._enqueue(stream, flat)
                return None
            return self._send(stream, flat, on_unavailable=lambda: self._enqueue(stream, flat, uncertain=True))

    def flush(self) -> int:
        """Deliver the outbox in order; stops at the first failure. Returns the number delivered."""
        with self._lock:
            return self._flush_locked()

    @property
    def pending(self) -> int:
        return len(self._outbox)

    def stats(self) -> dict:
        return {"delivered": self.delivered, "queued": self.queued, "pending": self.pending, "dropped": self.dropped}

    def close(self) -> None:
        """Stop the background flusher after one last delivery attempt; the outbox stays on disk."""
        self._closed.set()
        t = self._flusher
        if t is not None and t is not threading.current_thread():
            t.join(timeout=10)
        with self._lock:
            if self._outbox:
                self._flush_locked()

    def __enter__(self) -> "EventSink":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- Redis -----------------------------------------------------------------------------------------------------
    def _send(self, stream: str, flat: dict[str, str], on_unavailable) -> str | None:
        try:
            entry_id = self.client.xadd(stream, flat, maxlen=self.maxlen, approximate=True)
        except _UNAVAILABLE as e:
            self._down_until = time.monotonic() + self.retry_after_s
            log.warning("Redis unavailable (%s: %s); events go to the outbox %s", type(e).__name__, e,
                        self.outbox_dir)
            on_unavailable()
            return None
        except redis.exceptions.RedisError as e:     # e.g. WRONGTYPE: retrying cannot help
            self._drop(f"Redis rejected an event for {stream}: {type(e).__name__}: {e}")
            return None
        self.delivered += 1
        return entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)

    def _flush_locked(self) -> int:
        try:
            return self._deliver_outbox()
        finally:
            metrics.record_outbox_depth(self.outbox_dir, len(self._outbox))

    def _deliver_outbox(self) -> int:
        sent = 0
        while self._outbox:
            name = self._outbox[0]
            path = os.path.join(self.outbox_dir, name)
            try:
                with open(path, encoding="utf-8") as f:
                    event = json.load(f)
                stream, flat = _check_stream(event["stream"]), flatten_fields(event["fields"])
            except FileNotFoundError:
                self._outbox.popleft()
                continue
            except (OSError, ValueError, KeyError, TypeError) as e:
                self._outbox.popleft()
                self._unlink(path)
                self._drop(f"unreadable outbox event {name}: {type(e).__name__}: {e}")
                continue
            failed = []
            if (event.get("uncertain") or name in self._uncertain) \
                    and self._in_stream(stream, flat, float(event.get("queued_at", 0.0)), failed):
                entry_id = "already delivered"
            elif not failed:
                entry_id = self._send(stream, flat, on_unavailable=lambda: failed.append(True))
            if failed:
                self._uncertain.add(name)           # the XADD may have reached Redis before the connection died
                return sent
            self._uncertain.discard(name)
            self._outbox.popleft()
            self._unlink(path)
            if entry_id is not None:
                sent += 1
        if self._unreported_drops:
            n = self._unreported_drops
            self._unreported_drops = 0
            failed = []
            self._send(ERRORS_STREAM, {"kind": "events_dropped", "count": str(n), "stage": "events",
                                       "error": f"{n} events were dropped (outbox full or rejected)"},
                       on_unavailable=lambda: failed.append(True))
            if failed:
                self._unreported_drops += n
        return sent

    def _in_stream(self, stream: str, flat: dict[str, str], queued_at: float, failed: list) -> bool:
        """Whether `stream` holds an entry with exactly these fields, written since shortly before queued_at."""
        since_ms = max(0, int((queued_at - UNCERTAIN_LOOKBACK_S) * 1000))
        try:
            entries = self.client.xrange(stream, min=f"{since_ms}-0", max="+", count=UNCERTAIN_SCAN_ENTRIES)
        except _UNAVAILABLE:
            self._down_until = time.monotonic() + self.retry_after_s
            failed.append(True)
            return False
        for _, fields in entries:
            decoded = {_text(k): _text(v) for k, v in fields.items()}
            if decoded == flat:
                return True
        return False

    # ---- outbox ----------------------------------------------------------------------------------------------------
    def _load_outbox(self) -> list[str]:
        names = []
        for name in os.listdir(self.outbox_dir):
            if name.startswith(".tmp-"):                 # a write that never finished
                self._unlink(os.path.join(self.outbox_dir, name))
            elif name.endswith(".json") and name.split(".")[0].isdigit():
                names.append(name)
        return sorted(names, key=lambda n: int(n.split(".")[0]))

    def _enqueue(self, stream: str, flat: dict[str, str], uncertain: bool = False) -> None:
        while len(self._outbox) >= self.outbox_max:
            oldest = self._outbox.popleft()
            self._unlink(os.path.join(self.outbox_dir, oldest))
            self._drop(f"event outbox full ({self.outbox_max} events): dropped the oldest ({oldest})")
        name = f"{self._next_seq:020d}.json"
        tmp = os.path.join(self.outbox_dir, f".tmp-{uuid.uuid4().hex}")
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump({"stream": stream, "fields": flat, "queued_at": time.time(), "uncertain": uncertain}, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, os.path.join(self.outbox_dir, name))
        except OSError as e:
            self._unlink(tmp)
            self._drop(f"could not write event for {stream} to the outbox {self.outbox_dir}: {e}")
            return
        self._next_seq += 1
        self._outbox.append(name)
        self.queued += 1
        metrics.record_outbox_depth(self.outbox_dir, len(self._outbox))
        self._ensure_flusher()

    def _drop(self, why: str) -> None:
        self.dropped += 1
        self._unreported_drops += 1
        metrics.record_events_dropped()
        log.error("event dropped (%d so far): %s", self.dropped, why)

    @staticmethod
    def _unlink(path: str) -> None:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass

    # ---- background delivery ---------------------------------------------------------------------------------------
    def _ensure_flusher(self) -> None:
        with self._lock:
            if self.flush_interval_s is None or self._closed.is_set():
                return
            if self._flusher is None or not self._flusher.is_alive():
                self._flusher = threading.Thread(target=self._flush_loop, name="tubescope-outbox", daemon=True)
                self._flusher.start()

    def _flush_loop(self) -> None:
        while not self._closed.wait(self.flush_interval_s):
            with self._lock:
                try:
                    self._flush_locked()
                except Exception:                         # keep the thread alive; the next round retries
                    log.exception("outbox flush failed")
                if not self._outbox:
                    self._flusher = None                  # under the lock: a new enqueue starts a fresh thread
                    return
