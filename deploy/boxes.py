"""Boxes of an answer: the model's grounding markup (qwen2vl.grounding) placed on the footage it looked at.

docs/architecture.md, "Boxes". Each box becomes {label, x1, y1, x2, y2, t, segment_id}:
- pixels of the source frame: the 0..1000 coordinates scaled by the segment's source frame size (`source_size`,
  width and height as the camera or file delivered them, upright), or by the indexed frame size (the grid times
  14 px) for footage indexed before sizes were recorded: the same aspect ratio up to the 28 px rounding, in the
  model's pixels rather than the camera's;
- `t` and `segment_id` of one tube the model was shown: the first tube (in evidence order) covering the last time
  the answer cited before the box; else the evidence's first tube (with a single segment shown, that segment's).
Pure functions over plan rows (index metadata); no model.
"""
from __future__ import annotations

import re
from datetime import datetime, timezone

from pipeline.times import EPOCH_THRESHOLD_S
from qwen2vl.geometry import PATCH_SIZE
from qwen2vl.grounding import COORD_MAX, GroundedBox

# 12:00:08, 0:03, 2026-11-26 12:00:08; a range "A-B" counts as its start A.
_TIME = re.compile(r"(?<![\d:.])(?:(\d{4})-(\d{2})-(\d{2})[ T])?(\d{1,2}):(\d{2})(?::(\d{2}))?(?![\d:])")


def frame_size(row: dict) -> tuple[int, int]:
    """(width, height) in pixels that the box coordinates of this segment scale to (see the module docstring)."""
    size = row.get("source_size")
    if size is not None and len(size) == 2 and min(int(v) for v in size) > 0:
        return int(size[0]), int(size[1])
    _, h, w = row.get("index_grid_thw") or row["grid_thw"]
    return int(w) * PATCH_SIZE, int(h) * PATCH_SIZE


def cited_times(text: str) -> list[tuple[int, tuple]]:
    """Times cited in `text`, in order: (offset where the citation starts, (date or None, h_or_m, m_or_s, s or None)).
    The end of a range ("0:00:08-0:00:14") is not a citation of its own."""
    out = []
    for m in _TIME.finditer(text):
        if m.start() > 0 and text[m.start() - 1] == "-" and out and out[-1][2] == m.start() - 1:
            continue
        y, mo, d, a, b, c = m.groups()
        date = (int(y), int(mo), int(d)) if y else None
        out.append((m.start(), (date, int(a), int(b), None if c is None else int(c)), m.end()))
    return [(start, spec) for start, spec, _ in out]


def _covers(spec: tuple, ts: float, tube_seconds: float) -> bool:
    """Whether the cited time `spec` overlaps the tube [ts, ts + tube_seconds) on the tube's own clock."""
    date, a, b, c = spec
    if ts >= EPOCH_THRESHOLD_S:         # wall clock: labels are UTC; a citation without a date means the tube's day
        day = datetime.fromtimestamp(ts, tz=timezone.utc)
        y, mo, d = date or (day.year, day.month, day.day)
        try:
            at = datetime(y, mo, d, a, b, c or 0, tzinfo=timezone.utc).timestamp()
        except ValueError:
            return False
        width = 1.0 if c is not None else 60.0
    else:                               # media time: h:mm:ss, or m:ss
        if date is not None:
            return False
        at = float(a * 3600 + b * 60 + c) if c is not None else float(a * 60 + b)
        width = 1.0
    return at < ts + tube_seconds and ts < at + width


def _tubes(rows: list[dict]):
    """(row, tube start) of every shown tube, rows in evidence order."""
    for row in rows:
        for ts in row["tube_ts"]:
            yield row, float(ts)


def tube_for(offset: int, text: str, rows: list[dict], citations: list[tuple[int, tuple]],
             tube_seconds: float) -> tuple[dict, float]:
    """The (row, tube start) a box at `offset` of the clean text refers to (the rule in the module docstring)."""
    before = [spec for start, spec in citations if start < offset]
    if before:
        for row, ts in _tubes(rows):
            if _covers(before[-1], ts, tube_seconds):
                return row, ts
    return rows[0], float(rows[0]["tube_ts"][0])


def answer_boxes(boxes: list[GroundedBox], text: str, rows: list[dict], tube_seconds: float) -> list[dict]:
    """The answer's boxes over the rows it looked at (plan rows sorted as the evidence: by t0, then source)."""
    if not boxes or not rows:
        return []
    citations = cited_times(text)
    out = []
    for b in boxes:
        row, ts = tube_for(b.offset, text, rows, citations, tube_seconds)
        w, h = frame_size(row)
        out.append({"label": b.label, "x1": round(b.x1 * w / COORD_MAX), "y1": round(b.y1 * h / COORD_MAX),
                    "x2": round(b.x2 * w / COORD_MAX), "y2": round(b.y2 * h / COORD_MAX),
                    "t": round(ts, 3), "segment_id": row["segment_id"]})
    return out
