"""Summaries of a window of any length, built bottom up (docs/architecture.md, "Summaries").

Per source:
  periods  the window cut at multiples of `granularity` (5 minutes by default; coarser when the window would hold
           more than MAX_PERIODS); each period with footage is asked about by the decoder, which plans it like any
           question (the long tier when it holds more than the budget at the index resolution), with the captions
           of the period's segments as timestamped lines;
  hours    when periods are shorter than an hour and the window is longer, the lines of each clock hour are
           summarised as text (no video) into one line;
  window   the top lines are summarised into the window's summary (one line of them is used as it is).
Every line carries its span and cites its times. A finished period's line is cached in Redis per (model, source,
level, span, granularity, length), so a second call over the same morning reuses the hours already summarised; a
period of a live source is finished once it lies two segments in the past (media-time footage always is).
"""
from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass
from typing import Callable

from deploy.footage import format_span, list_window
from pipeline.times import EPOCH_THRESHOLD_S, with_times

PERIOD_QUESTION = "Summarize what happens in this footage in one or two sentences."
ROLLUP_PROMPT = ("Summaries of consecutive periods of camera footage from source {source}, each after its time "
                 "span:\n{lines}\nSummarize {span} in two or three sentences, citing the times of what happened.")
DEFAULT_GRANULARITY_S = 300.0
MIN_GRANULARITY_S = 60.0
HOUR_S = 3600.0
MAX_PERIODS = 288                 # per source and call: a day at 5 minutes; longer windows take longer periods
CACHE_PREFIX = "tubescope:summary:"
CACHE_TTL_S = 30 * 86_400
LEVELS = ("period", "hour", "window")


@dataclass
class SummaryLine:
    level: str                    # "period", "hour" or "window"
    source: str
    t0: float
    t1: float
    text: str
    cached: bool = False

    def to_dict(self, time_zone: str) -> dict:
        return with_times({"level": self.level, "source": self.source, "t0": self.t0, "t1": self.t1,
                           "text": self.text, "cached": self.cached}, time_zone)

    def cited(self) -> str:
        return f"[{format_span(self.t0, self.t1)}] {self.text}"


def check_granularity(granularity) -> float:
    if granularity is None:
        return DEFAULT_GRANULARITY_S
    if isinstance(granularity, bool) or not isinstance(granularity, (int, float)) or not math.isfinite(granularity) \
            or not MIN_GRANULARITY_S <= granularity <= 86_400:
        raise ValueError(f"granularity must be seconds in [{MIN_GRANULARITY_S:g}, 86400], got {granularity!r}")
    return float(granularity)


def period_size(granularity: float, t0: float, t1: float) -> float:
    """`granularity`, or the smallest whole number of minutes that keeps the window within MAX_PERIODS."""
    needed = (t1 - t0) / MAX_PERIODS
    if needed <= granularity:
        return granularity
    return math.ceil(needed / 60.0) * 60.0


def periods(t0: float, t1: float, size: float) -> list[tuple[float, float]]:
    """[t0, t1) cut at the multiples of `size` (aligned, so two windows share their inner periods)."""
    out, a = [], t0
    while a < t1:
        b = min(t1, (math.floor(a / size) + 1) * size)
        out.append((a, b))
        a = b
    return out


class Summarizer:
    """Summaries through a Decoder (deploy/decoder.py); cache and stream in Redis when a client is given."""

    def __init__(self, decoder, redis=None, events=None):
        self.decoder, self.redis, self.events = decoder, redis, events
        self.settings = decoder.settings

    def summarize(self, sources, start: float | None, end: float | None, granularity=None,
                  max_new_tokens: int = 64, on_line: Callable[[dict], None] | None = None) -> dict:
        """{"summaries": {source: text}, "lines": [every line, bottom up], "granularity", "model"}. LookupError for
        an unknown source or an empty window, ValueError for bad arguments."""
        granularity = check_granularity(granularity)
        rows = list_window(self.decoder.index, sources, start, end, self.decoder.model_id)
        tz = self.settings.time_zone
        lines: list[dict] = []

        def emit(line: SummaryLine) -> SummaryLine:
            out = line.to_dict(tz)
            lines.append(out)
            if on_line is not None:
                on_line(out)
            return line

        summaries, size = {}, granularity
        for source in dict.fromkeys(r["source_id"] for r in rows):
            own = [r for r in rows if r["source_id"] == source]
            t0 = max(start, own[0]["t0"]) if start is not None else own[0]["t0"]
            t1 = min(end, max(r["t1"] for r in own)) if end is not None else max(r["t1"] for r in own)
            size = period_size(granularity, t0, t1)
            key = (source, size, max_new_tokens)
            level = [emit(self._period(key, a, b))
                     for a, b in periods(t0, t1, size) if any(r["t0"] < b and r["t1"] > a for r in own)]
            if size < HOUR_S and t1 - t0 > HOUR_S:
                level = [emit(self._rollup(key, "hour", group)) if len(group) > 1 else group[0]
                         for group in _by_hour(level)]
            top = level[0] if len(level) == 1 else emit(self._rollup(key, "window", level))
            summaries[source] = top.text
        result = {"summaries": summaries, "lines": lines, "granularity": size, "model": self.decoder.model_id}
        if self.events is not None:
            from pipeline.events import SUMMARIES_STREAM

            self.events.emit(SUMMARIES_STREAM, {"sources": list(summaries), "start": start, "end": end,
                                                "granularity": size, "summaries": summaries, "lines": lines,
                                                "model": self.decoder.model_id})
        return result

    # ---- one line ------------------------------------------------------------------------------------------------
    def _period(self, key: tuple, a: float, b: float) -> SummaryLine:
        source, _, max_new = key
        return self._cached(key, "period", a, b, lambda: self.decoder.ask(
            PERIOD_QUESTION, [source], start=a, end=b, max_new_tokens=max_new, record=False,
            with_captions=True)["answer"])

    def _rollup(self, key: tuple, level: str, lines: list[SummaryLine]) -> SummaryLine:
        source, _, max_new = key
        a, b = lines[0].t0, lines[-1].t1
        prompt = ROLLUP_PROMPT.format(source=source, lines="\n".join(line.cited() for line in lines),
                                      span=format_span(a, b))
        return self._cached(key, level, a, b, lambda: self.decoder.complete(prompt, max_new_tokens=2 * max_new))

    def _cached(self, key: tuple, level: str, a: float, b: float, make: Callable[[], str]) -> SummaryLine:
        source = key[0]
        finished = b < EPOCH_THRESHOLD_S or time.time() > b + 2 * self.settings.segment_seconds
        name = CACHE_PREFIX + hashlib.sha1(repr((self.decoder.model_id, level, a, b) + key).encode()).hexdigest()
        cache = self.redis if finished else None
        if cache is not None:
            text = _quietly(lambda: cache.get(name))       # Redis down: summarise again, never fail for a cache
            if text is not None:
                return SummaryLine(level, source, a, b, text.decode() if isinstance(text, bytes) else text, True)
        text = make().strip()
        if cache is not None:
            _quietly(lambda: cache.set(name, text, ex=CACHE_TTL_S))
        return SummaryLine(level, source, a, b, text)


def _quietly(call):
    import redis

    try:
        return call()
    except redis.RedisError:
        return None


def _by_hour(lines: list[SummaryLine]) -> list[list[SummaryLine]]:
    groups: dict[int, list[SummaryLine]] = {}
    for line in lines:
        groups.setdefault(math.floor(line.t0 / HOUR_S), []).append(line)
    return [groups[k] for k in sorted(groups)]
