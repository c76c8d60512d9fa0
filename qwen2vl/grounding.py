"""Grounding markup in generated text: object references and boxes (docs/model.md §15).

Qwen2-VL writes a box as `<|box_start|>(x1,y1),(x2,y2)<|box_end|>`, coordinates 0..1000 relative to the image,
usually after the name of what it boxes, `<|object_ref_start|>a red car<|object_ref_end|>`. One box markup may hold
several corner pairs, `(x1,y1),(x2,y2),(x3,y3),(x4,y4)` is two boxes, and several box markups may follow one
reference; a box with no reference before it has no label.

`parse_grounding(text)` turns such text into what a reader sees (the label in place of the reference, nothing in
place of a box) and the boxes, each with the offset in that clean text where it stood. Malformed markup (our rule):
- a box whose content is not whole corner pairs of numbers is not a box, and its content stays in the text as
  written (the markers go, as skip_special_tokens would drop them);
- a box not closed by the end of the text (a length cut) is the same: not a box, content kept;
- numbers outside 0..1000 are clamped to it, and corners are ordered so x1 <= x2 and y1 <= y2;
- a reference that is never closed shows its text; stray end markers are removed.
`final=False` is for text still being generated: everything after an open `<|box_start|>` is held back, so the
clean text only ever grows as tokens arrive (what a stream may already have shown never changes).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

REF_START, REF_END = "<|object_ref_start|>", "<|object_ref_end|>"
BOX_START, BOX_END = "<|box_start|>", "<|box_end|>"
MARKERS = (REF_START, REF_END, BOX_START, BOX_END)
COORD_MAX = 1000

_SPLIT = re.compile("(" + "|".join(re.escape(m) for m in MARKERS) + ")")
_NUMBER = r"\s*(-?\d+(?:\.\d+)?)\s*"
_POINT = re.compile(r"\s*\(" + _NUMBER + "," + _NUMBER + r"\)\s*")


@dataclass(frozen=True)
class GroundedBox:
    """One box as the model wrote it: corners in 0..1000 of the image, its label (None without a reference) and
    where it stood in the clean text (characters from the start)."""
    label: str | None
    x1: float
    y1: float
    x2: float
    y2: float
    offset: int


@dataclass(frozen=True)
class Grounded:
    text: str                       # what a reader sees: labels in place of references, no box markup
    boxes: list[GroundedBox]


def parse_corners(content: str) -> list[tuple[float, float, float, float]] | None:
    """'(x1,y1),(x2,y2)[,(x3,y3),(x4,y4)...]' -> boxes (clamped to 0..1000, corners ordered); None when the content
    is not a non-empty run of whole corner pairs."""
    points, pos = [], 0
    while pos < len(content):
        m = _POINT.match(content, pos)
        if m is None:
            return None
        points.append((_clamp(float(m.group(1))), _clamp(float(m.group(2)))))
        pos = m.end()
        if pos < len(content):
            if content[pos] != ",":
                return None
            pos += 1
            if pos == len(content):             # a trailing comma
                return None
    if not points or len(points) % 2:
        return None
    boxes = []
    for (ax, ay), (bx, by) in zip(points[::2], points[1::2]):
        boxes.append((min(ax, bx), min(ay, by), max(ax, bx), max(ay, by)))
    return boxes


def _clamp(v: float) -> float:
    return min(max(v, 0.0), float(COORD_MAX))


def parse_grounding(text: str, final: bool = True) -> Grounded:
    """The clean text and the boxes of `text` (rules in the module docstring)."""
    if not isinstance(text, str):
        raise ValueError(f"parse_grounding expects a str, got {type(text).__name__}")
    out: list[str] = []
    length = 0
    boxes: list[GroundedBox] = []
    label: str | None = None            # the last closed reference: labels the boxes right after it
    ref: list[str] | None = None        # text of an open reference
    box: list[str] | None = None        # content of an open box
    for part in _SPLIT.split(text):
        if not part:
            continue
        if box is not None and part not in MARKERS:
            box.append(part)
            continue
        if box is not None:
            content, box = "".join(box), None
            corners = parse_corners(content) if part == BOX_END else None
            if corners is None:         # not coordinates, or another marker inside the box: keep what it held
                length = _emit(out, length, content)
            else:
                boxes.extend(GroundedBox(label, *c, offset=length) for c in corners)
            if part == BOX_END:
                continue
        if part == BOX_START:
            if ref is not None:         # a box inside an open reference closes it
                label, ref = "".join(ref).strip() or None, None
            box = []
        elif part in MARKERS:
            label, ref = _marker(part, label, ref)
        else:
            if ref is not None:
                ref.append(part)
            elif part.strip():          # words between a reference and its boxes end the reference's reach
                label = None
            length = _emit(out, length, part)
    if box is not None and final:       # never closed: not a box
        length = _emit(out, length, "".join(box))
    return Grounded("".join(out), boxes)


def _marker(part: str, label: str | None, ref: list[str] | None) -> tuple[str | None, list[str] | None]:
    """State after a reference marker (or a stray box end): (label for the next boxes, open reference text)."""
    if part == REF_START:
        return None, []
    if part == REF_END and ref is not None:
        return "".join(ref).strip() or None, None
    return label, ref


def _emit(out: list[str], length: int, piece: str) -> int:
    out.append(piece)
    return length + len(piece)


def strip_grounding(text: str) -> str:
    """Only the clean text of `text`."""
    return parse_grounding(text).text
