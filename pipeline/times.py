"""Times as people write them, and as they are shown back (docs/architecture.md, "Times").

Footage has two clocks: live feeds are stamped in epoch seconds (wall clock), archives in media seconds from the
start of their file. A time written by a person becomes seconds on the same axis:
  1765000000, 1765000000.5, "1765000000"      epoch seconds (or media seconds for archives: any plain number)
  "2026-12-06T14:00:00+01:00", "2026-12-06 14:00"   ISO 8601; without an offset, in the configured time zone
  "now", "-2h", "-90m", "-30s", "-1d", "-1w"  relative to now
  "today", "yesterday", "today 14:00", "yesterday 14:00:30", "14:00"   midnight or a time of day in the zone
  "mm:ss", "h:mm:ss" with a leading "+" ("+1:30")   media time into an archive
A time that is none of these is a ValueError naming the field. Times shown back are ISO 8601 with the zone's offset
for wall-clock seconds, and "m:ss" / "h:mm:ss" for media seconds.
"""
from __future__ import annotations

import math
import re
import time as _time
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

EPOCH_THRESHOLD_S = 1e9           # seconds at or after 2001-09-09 are wall-clock (live feeds), below: media time
_RELATIVE = re.compile(r"-(\d+(?:\.\d+)?)\s*([smhdw])")
_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}
_DAY = re.compile(r"(today|yesterday)?\s*(?:(\d{1,2}):(\d{2})(?::(\d{2}))?)?")
_MEDIA = re.compile(r"\+(?:(\d+):)?(\d{1,2}):(\d{2}(?:\.\d+)?)")


def zone(name: str) -> ZoneInfo:
    """The IANA time zone `name`; ValueError when unknown."""
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown time zone {name!r} (an IANA name such as 'UTC' or 'Europe/Berlin')") from None


def parse_time(value, field: str = "time", *, tz: str = "UTC", now: float | None = None) -> float | None:
    """Seconds for a time written as in the module docstring; None stays None. ValueError names `field`."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError(f"{field} must be a time, got {value!r}")
    if isinstance(value, (int, float)):
        return _finite(field, float(value))
    if not isinstance(value, str):
        raise ValueError(f"{field} must be a number of seconds or a time string, got {type(value).__name__}")
    text = value.strip().lower()
    if not text or len(text) > 64:
        raise ValueError(f"{field} must be a time such as 1765000000, 2026-12-06T14:00+01:00, -2h or "
                         f"'yesterday 14:00', got {value!r}")
    now = _time.time() if now is None else float(now)
    try:
        return _finite(field, float(text))
    except ValueError:
        pass
    if text == "now":
        return now
    m = _RELATIVE.fullmatch(text)
    if m:
        return now - float(m.group(1)) * _UNITS[m.group(2)]
    m = _MEDIA.fullmatch(text)
    if m:
        return int(m.group(1) or 0) * 3600.0 + int(m.group(2)) * 60.0 + float(m.group(3))
    m = _DAY.fullmatch(text)
    if m and (m.group(1) or m.group(2)):
        day, hh, mm, ss = m.groups()
        local = datetime.fromtimestamp(now, zone(tz))
        base = local.date() - timedelta(days=1 if day == "yesterday" else 0)
        h, mi, s = int(hh or 0), int(mm or 0), int(ss or 0)
        if h > 23 or mi > 59 or s > 59:
            raise ValueError(f"{field}: {value!r} is not a time of day")
        return datetime(base.year, base.month, base.day, h, mi, s, tzinfo=zone(tz)).timestamp()
    try:
        parsed = datetime.fromisoformat(value.strip())
    except ValueError:
        raise ValueError(f"{field} must be a time such as 1765000000, 2026-12-06T14:00+01:00, -2h or "
                         f"'yesterday 14:00', got {value!r}") from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=zone(tz))
    return parsed.timestamp()


def _finite(field: str, seconds: float) -> float:
    if not math.isfinite(seconds):
        raise ValueError(f"{field} must be a finite number of seconds, got {seconds!r}")
    return seconds


def format_time(seconds: float, tz: str = "UTC") -> str:
    """ISO 8601 with the zone's offset for wall-clock seconds; 'm:ss' or 'h:mm:ss' for media seconds."""
    if seconds >= EPOCH_THRESHOLD_S:
        return datetime.fromtimestamp(seconds, zone(tz)).isoformat(timespec="milliseconds" if seconds % 1 else
                                                                   "seconds")
    whole = int(math.floor(seconds))
    sign, whole = ("-", -whole) if whole < 0 else ("", whole)
    h, m, s = whole // 3600, whole // 60 % 60, whole % 60
    return f"{sign}{h}:{m:02d}:{s:02d}" if h else f"{sign}{m}:{s:02d}"


def with_times(row: dict, tz: str = "UTC") -> dict:
    """A row with t0/t1 seconds, plus `start` and `end` as people read them."""
    return {**row, "start": format_time(row["t0"], tz), "end": format_time(row["t1"], tz)}
