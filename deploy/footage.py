"""Footage for a question: which segments, grouped into which video blocks, with which prompt and M-RoPE positions.

Pure functions over index metadata (docs/architecture.md, "Temporal positions"): no model, no token bytes.

- `list_window` lists the segments of some sources overlapping [start, end) (metadata only, so hours are cheap).
- `group_blocks` makes ONE video block per run of a source's selected segments at one resolution, in time order.
- `temporal_ids` gives each tube of a block the id round(elapsed / tube_seconds), where elapsed is measured from the
  block's first tube with every gap longer than max_gap_seconds shortened to max_gap_seconds. One contiguous clip
  therefore gets 0, 1, 2, ... exactly as the reference get_rope_index; gaps keep their spacing up to the cap.
- `build_prompt` renders the chat template: the uploaded images (deploy/images.py) first, then per block a time
  label and the video, then the question; it splits the ids into the vision prefix (through the last
  <|vision_end|>) and the question suffix, so the prefix KV can be reused across questions. Special tokens split
  BPE, so prefix + suffix ids equal the ids of the whole text.
"""
from __future__ import annotations

import hashlib
import math
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import datetime, timezone

import torch

from pipeline.times import EPOCH_THRESHOLD_S
from qwen2vl.chat import IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER
from qwen2vl.rope import get_rope_index

VISION_END = "<|vision_end|>"
SPECIAL_MARKERS = ("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
                   "<|image_pad|>", "<|video_pad|>", "<|endoftext|>")


# ---- selecting ------------------------------------------------------------------------------------------------------

def check_window(sources, start, end) -> tuple[list[str], float | None, float | None]:
    """Validated (sources, start, end); ValueError says what was wrong."""
    if isinstance(sources, str):
        sources = [sources]
    if not isinstance(sources, (list, tuple)) or not sources:
        raise ValueError(f"sources must be a non-empty list of source ids, got {sources!r}")
    for s in sources:
        if not isinstance(s, str) or not s:
            raise ValueError(f"every source id must be a non-empty str, got {s!r}")
    sources = list(dict.fromkeys(sources))                     # drop repeats, keep order
    for name, value in (("start", start), ("end", end)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not math.isfinite(value)):
            raise ValueError(f"{name} must be a finite number of seconds or None, got {value!r}")
    if start is not None and end is not None and end <= start:
        raise ValueError(f"window end ({end}) must be after start ({start})")
    return sources, (None if start is None else float(start)), (None if end is None else float(end))


def list_window(index, sources, start: float | None, end: float | None, model_id: str) -> list[dict]:
    """Metadata rows of every segment of `sources` (under model_id) overlapping [start, end), sorted by (t0, source).

    LookupError for a source with nothing indexed under this model, or when the window holds no footage at all.
    """
    sources, start, end = check_window(sources, start, end)
    rows: list[dict] = []
    for source in sources:
        found = index.list(source, start, end, model_id=model_id)
        if not found and not index.list(source, model_id=model_id):
            others = {r["model_id"] for r in index.list(source)}
            if others:
                raise LookupError(f"source {source!r} is indexed only under other models {sorted(others)}, "
                                  f"not {model_id!r}; re-index it with this checkpoint")
            raise LookupError(f"unknown source {source!r}: nothing is indexed for it")
        rows.extend(found)
    if not rows:
        raise LookupError(f"no footage of {sources} in the window [{_fmt_bound(start)}, {_fmt_bound(end)})")
    rows.sort(key=lambda r: (r["t0"], r["source_id"]))
    return rows


def _fmt_bound(t: float | None) -> str:
    return "-inf" if t is None else f"{t:g}"


# ---- grouping and temporal ids ---------------------------------------------------------------------------------------

@dataclass
class VideoBlock:
    """One video item of the prompt: consecutive selected segments of one source at one resolution."""
    source_id: str
    segments: list[dict]                          # metadata rows, time order
    grid_thw: tuple[int, int, int]                # (sum of t, h, w) in patch units
    temporal_ids: list[int]                       # one per temporal patch, starting at 0
    spans: list[tuple[float, float]] = field(default_factory=list)   # contiguous (t0, t1) runs, for the label
    sampled: bool = False                         # tubes sampled from the segments (deploy.plans), not all of them

    @property
    def n_tokens(self) -> int:
        return sum(int(r["n_tokens"]) for r in self.segments)

    @property
    def segment_ids(self) -> list[str]:
        return [r["segment_id"] for r in self.segments]


def temporal_ids(tube_ts: list[float], tube_seconds: float, max_gap_seconds: float) -> list[int]:
    """Temporal M-RoPE offsets of tubes starting at tube_ts (increasing), relative to the first tube.

    elapsed(k) = elapsed(k-1) + tube_seconds + min(gap, max_gap_seconds), gap = time between the end of tube k-1 and
    the start of tube k; id(k) = round(elapsed(k) / tube_seconds), kept strictly increasing.
    """
    if not tube_seconds > 0 or not max_gap_seconds > 0:
        raise ValueError(f"tube_seconds and max_gap_seconds must be > 0, got {tube_seconds}, {max_gap_seconds}")
    ids: list[int] = []
    elapsed = 0.0
    for k, ts in enumerate(tube_ts):
        if k:
            step = float(ts) - float(tube_ts[k - 1])
            if step < 0:
                raise ValueError(f"tube start times must not decrease: {ts} after {tube_ts[k - 1]}")
            gap = max(0.0, step - tube_seconds)
            elapsed += step - gap + min(gap, max_gap_seconds)
        tid = round(elapsed / tube_seconds)
        ids.append(max(tid, ids[-1] + 1) if ids else tid)
    return ids


def group_blocks(rows: list[dict], tube_seconds: float, max_gap_seconds: float) -> list[VideoBlock]:
    """Rows (any order) -> video blocks ordered by start time (then source); a resolution change starts a block."""
    by_source: dict[str, list[dict]] = {}
    for r in sorted(rows, key=lambda r: (r["t0"], r["source_id"])):
        by_source.setdefault(r["source_id"], []).append(r)
    runs: list[list[dict]] = []
    for source_rows in by_source.values():
        run: list[dict] = []
        for r in source_rows:
            if run and tuple(r["grid_thw"][1:]) != tuple(run[-1]["grid_thw"][1:]):
                runs.append(run)
                run = []
            run.append(r)
        runs.append(run)
    blocks = []
    for run in runs:
        tube_ts = [float(ts) for r in run for ts in r["tube_ts"]]
        _, h, w = run[0]["grid_thw"]
        blocks.append(VideoBlock(source_id=run[0]["source_id"], segments=run,
                                 grid_thw=(sum(int(r["grid_thw"][0]) for r in run), int(h), int(w)),
                                 temporal_ids=temporal_ids(tube_ts, tube_seconds, max_gap_seconds),
                                 spans=_spans(run, tube_seconds), sampled=any("tubes" in r for r in run)))
    blocks.sort(key=lambda b: (b.segments[0]["t0"], b.source_id))
    return blocks


def _spans(run: list[dict], tube_seconds: float) -> list[tuple[float, float]]:
    """Merge segments that touch (next t0 within half a tube of the previous t1) into (t0, t1) spans."""
    spans: list[list[float]] = []
    for r in run:
        if spans and r["t0"] <= spans[-1][1] + tube_seconds / 2:
            spans[-1][1] = max(spans[-1][1], r["t1"])
        else:
            spans.append([r["t0"], r["t1"]])
    return [(a, b) for a, b in spans]


# ---- labels ----------------------------------------------------------------------------------------------------------

def format_span(t0: float, t1: float) -> str:
    """'2026-11-26 12:00:08-12:01:12 UTC' for epoch seconds, '0:00:08-0:01:12' for media seconds."""
    if t0 >= EPOCH_THRESHOLD_S:
        a = datetime.fromtimestamp(math.floor(t0), tz=timezone.utc)
        b = datetime.fromtimestamp(math.ceil(t1), tz=timezone.utc)
        end = b.strftime("%H:%M:%S") if a.date() == b.date() else b.strftime("%Y-%m-%d %H:%M:%S")
        return f"{a.strftime('%Y-%m-%d %H:%M:%S')}-{end} UTC"
    return f"{_media(math.floor(t0))}-{_media(math.ceil(t1))}"


def _media(seconds: int) -> str:
    sign = "-" if seconds < 0 else ""
    seconds = abs(seconds)
    return f"{sign}{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def block_label(block: VideoBlock) -> str:
    """'[source cam1, 12:00:08-12:01:12 UTC]'; a block with gaps lists each contiguous span; a block of sampled tubes
    names its whole span and how often a moment was taken: '[source cam1, 08:00:00-14:00:00 UTC, 128 moments about
    every 2m49s]'."""
    if block.sampled:
        t0, t1 = block.spans[0][0], block.spans[-1][1]
        n = block.grid_thw[0]
        every = (t1 - t0) / n
        return f"[source {block.source_id}, {format_span(t0, t1)}, {n} moments about every {_duration(every)}]"
    return f"[source {block.source_id}, {', '.join(format_span(a, b) for a, b in block.spans)}]"


def _duration(seconds: float) -> str:
    seconds = max(1, round(seconds))
    h, m, s = seconds // 3600, seconds // 60 % 60, seconds % 60
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


# ---- the prompt ------------------------------------------------------------------------------------------------------

@dataclass
class PromptPlan:
    """Token ids and positions of one question over some video blocks."""
    blocks: list[VideoBlock]
    prefix_ids: list[int]                  # through the last <|vision_end|>: what the prefix KV cache holds
    suffix_ids: list[int]                  # the question, end of turn and assistant header
    video_grid_thw: torch.Tensor | None    # (n_blocks, 3) long; None without footage
    video_temporal_ids: list[torch.Tensor]  # one (t,) long per block
    prefix_positions: torch.Tensor         # (3, 1, len(prefix_ids))
    prefix_rope_deltas: torch.Tensor       # (1, 1)
    images: list = field(default_factory=list)   # deploy.images.ImageTokens, in prompt order (before the blocks)

    @property
    def image_grid_thw(self) -> torch.Tensor | None:
        return torch.tensor([im.grid_thw for im in self.images], dtype=torch.long) if self.images else None

    @property
    def input_ids(self) -> list[int]:
        return self.prefix_ids + self.suffix_ids

    @property
    def segment_ids(self) -> list[str]:
        return [sid for b in self.blocks for sid in b.segment_ids]

    @property
    def segments(self) -> list[dict]:
        return [r for b in self.blocks for r in b.segments]

    @property
    def visual_tokens(self) -> int:
        return sum(b.n_tokens for b in self.blocks) + sum(im.n_tokens for im in self.images)

    def prefix_key(self, model_id: str, dtype: torch.dtype) -> tuple:
        """What the prefix KV depends on: model, images (their bytes' digests), segments with their tier and tubes,
        positions, dtype (and a digest of the prefix ids, which holds the labels and any caption lines)."""
        digest = hashlib.sha1(torch.tensor(self.prefix_ids, dtype=torch.int64).numpy().tobytes()).hexdigest()
        tiers = tuple((r.get("tier", "full"), tuple(r.get("tubes", ()))) for r in self.segments)
        return (model_id, tuple(self.segment_ids), tiers, tuple(tuple(b.temporal_ids) for b in self.blocks),
                str(dtype), digest, tuple(im.digest for im in self.images))


def check_question(question) -> str:
    if not isinstance(question, str) or not question.strip():
        raise ValueError(f"the question must be a non-empty string, got {question!r}")
    for marker in SPECIAL_MARKERS:
        if marker in question:
            raise ValueError(f"the question must not contain the special token {marker}")
    return question


def strip_markers(text: str) -> str:
    for marker in SPECIAL_MARKERS:
        text = text.replace(marker, "")
    return text


UNSEEN_NOTES = "Captions of footage not shown, by time:"
WINDOW_NOTES = "Captions of this footage, by time:"


def render_messages(blocks: list[VideoBlock], question: str, notes: list[str] = (),
                    notes_title: str = UNSEEN_NOTES, n_images: int = 0) -> list[dict]:
    """The user turn: the images, caption lines of footage not shown (if any), each block's label and video, the
    question."""
    content: list[dict] = [{"type": "image"} for _ in range(n_images)]
    if notes:
        content.append({"type": "text", "text": notes_title + "\n" + "\n".join(notes) + "\n"})
    for block in blocks:
        content.append({"type": "text", "text": block_label(block)})
        content.append({"type": "video"})
    content.append({"type": "text", "text": "\n" + question})
    return [{"role": "user", "content": content}]


class PrefixMemo:
    """Bounded LRU of tokenized prefixes and their positions: a repeated question over the same footage (and every
    search over already seen segments) skips tokenizing thousands of pad tokens and the position scan."""

    def __init__(self, max_entries: int = 4096):
        self.max_entries = max_entries
        self._entries: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key):
        with self._lock:
            value = self._entries.get(key)
            if value is not None:
                self._entries.move_to_end(key)
            return value

    def put(self, key, value) -> None:
        with self._lock:
            self._entries[key] = value
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)


def build_prompt(processor, blocks: list[VideoBlock], question: str, config,
                 memo: PrefixMemo | None = None, notes: list[str] = (), notes_title: str = UNSEEN_NOTES,
                 images: list = ()) -> PromptPlan:
    """Chat-template prompt over `images`, then `blocks`, then `question`, split into prefix/suffix ids, with
    prefix positions.

    `processor` is a qwen2vl.Processor (expands each image and video pad from its grid alone); `config` a
    Qwen2VLConfig. images: deploy.images.ImageTokens (only their grids and digests are read here), each an image
    item of the reference layout (temporal position constant, model.md §8). notes: caption lines placed before the
    blocks (inside the cached prefix) under notes_title: of footage the blocks do not show (retrieval plans), or of
    the window's own footage (summaries).
    """
    check_question(question)
    if not blocks and not images:
        raise ValueError("a prompt needs at least one video block or image")
    notes = [strip_markers(n) for n in notes]          # a caption must never smuggle a special token in
    text = processor.apply_chat_template(render_messages(blocks, question, notes, notes_title, len(images)),
                                         add_generation_prompt=True)
    cut = text.rindex(VISION_END) + len(VISION_END)
    if text.count(VIDEO_PLACEHOLDER) != len(blocks) or text.count(IMAGE_PLACEHOLDER) != len(images):
        raise ValueError("the chat template did not emit one placeholder per image and video block")
    grid = torch.tensor([b.grid_thw for b in blocks], dtype=torch.long) if blocks else None
    image_grid = torch.tensor([im.grid_thw for im in images], dtype=torch.long) if images else None
    tids = [torch.tensor(b.temporal_ids, dtype=torch.long) for b in blocks]
    memo_key = (text[:cut], tuple(b.grid_thw for b in blocks), tuple(tuple(b.temporal_ids) for b in blocks),
                tuple(im.grid_thw for im in images))
    cached = memo.get(memo_key) if memo is not None else None
    if cached is None:
        prefix_ids = processor.encode_with_grids(text[:cut], image_grid_thw=image_grid, video_grid_thw=grid,
                                                 return_tensors=None)["input_ids"][0]
        positions, deltas = get_rope_index(torch.tensor([prefix_ids]), image_grid, grid, config=config,
                                           video_temporal_ids=tids if blocks else None)
        cached = (prefix_ids, positions, deltas)
        if memo is not None:
            memo.put(memo_key, cached)
    prefix_ids, positions, deltas = cached
    suffix_ids = processor.tokenizer.encode(text[cut:])
    return PromptPlan(blocks=blocks, prefix_ids=list(prefix_ids), suffix_ids=suffix_ids, video_grid_thw=grid,
                      video_temporal_ids=tids, prefix_positions=positions, prefix_rope_deltas=deltas,
                      images=list(images))


def full_positions(plan: PromptPlan, config) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions (3, 1, S) and rope_deltas of the whole prompt (prefix + suffix), as one get_rope_index call."""
    return get_rope_index(torch.tensor([plan.input_ids]), plan.image_grid_thw, plan.video_grid_thw, config=config,
                          video_temporal_ids=plan.video_temporal_ids if plan.blocks else None)
