"""Which footage a question looks at, and at which resolution (docs/architecture.md, "Plans").

Pure functions over index metadata: no model, no token bytes. Per question, in order:

- full       the window's segments at the index resolution, when their visual tokens fit ask_token_budget;
- long       the long tier (pipeline/long_tier.py: every tube at ~long_pixels per frame), every tube when they fit,
             else tubes sampled evenly over the window's footage down to the budget, never more than the reference
             video utilities' frame cap (FPS_MAX_FRAMES frames = 384 tubes), as long as the sampled tubes are at
             most long_max_stride_seconds apart;
- retrieval  windows too long for that (days): the decoder's search picks the best segments at the index
             resolution, and the captions of the window's other segments go into the prompt as timestamped lines.

Every plan's tubes keep their true times: deploy.footage gives them temporal M-RoPE ids with gaps capped.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from deploy.footage import UNSEEN_NOTES
from deploy.search import evenly_spaced
from pipeline.tubes import long_grid
from qwen2vl.geometry import FPS_MAX_FRAMES, PATCH_SIZE, PATCHES_PER_TOKEN, TEMPORAL_PATCH_SIZE

MAX_PLAN_TUBES = FPS_MAX_FRAMES // TEMPORAL_PATCH_SIZE     # 384: the reference caps a video at 768 frames
PLAN_KINDS = ("full", "long", "retrieval")


@dataclass
class WindowPlan:
    """What one question looks at. `rows` are footage rows as the prompt shows them: each carries `tier` ("full" or
    "long"), and a row of sampled tubes carries `tubes` (their indices in the segment) with its grid and tube_ts cut
    to them."""
    kind: str
    rows: list[dict]
    window_segments: int                      # segments of the window (any tier)
    stride_s: float | None = None             # seconds between sampled tubes (long plans that sample)
    long_missing: int = 0                     # segments of the window without their long tier yet
    notes: list[str] = field(default_factory=list)     # caption lines of footage not shown (retrieval plans)
    notes_title: str = UNSEEN_NOTES                      # or WINDOW_NOTES: captions of the footage shown

    @property
    def tubes(self) -> int:
        return sum(int(r["grid_thw"][0]) for r in self.rows)

    @property
    def visual_tokens(self) -> int:
        return sum(int(r["n_tokens"]) for r in self.rows)

    def summary(self) -> dict:
        """The `plan` field of an answer: kind, tubes and their resolutions, coverage of the window."""
        sizes = sorted({(int(r["grid_thw"][1]) * PATCH_SIZE, int(r["grid_thw"][2]) * PATCH_SIZE) for r in self.rows})
        return {"kind": self.kind, "tier": "long" if self.kind == "long" else "full", "tubes": self.tubes,
                "resolutions": [f"{w}x{h}" for h, w in sizes], "visual_tokens": self.visual_tokens,
                "segments": len(self.rows), "window_segments": self.window_segments, "stride_s": self.stride_s,
                "long_missing": self.long_missing, "caption_lines": len(self.notes)}


def tokens_per_tube(grid_thw) -> int:
    return int(grid_thw[1]) * int(grid_thw[2]) // PATCHES_PER_TOKEN


def as_long(row: dict, long_pixels: int) -> dict:
    """A footage row as its long tier: the long grid and its token count, every tube."""
    grid = long_grid(row["grid_thw"], long_pixels)
    return {**row, "tier": "long", "grid_thw": grid, "n_tokens": grid[0] * tokens_per_tube(grid),
            "index_grid_thw": tuple(row["grid_thw"])}


def sample_tubes(rows: list[dict], n: int) -> list[dict]:
    """n tubes spread evenly over the rows' tubes in time order (first and last included), as rows cut to the tubes
    they keep; rows left with no tube are dropped."""
    tubes = sorted(((float(ts), i, k) for i, r in enumerate(rows) for k, ts in enumerate(r["tube_ts"])))
    keep: dict[int, list[int]] = {}
    for j in evenly_spaced(len(tubes), n):
        _, i, k = tubes[j]
        keep.setdefault(i, []).append(k)
    out = []
    for i, ks in sorted(keep.items(), key=lambda kv: (rows[kv[0]]["t0"], rows[kv[0]]["source_id"])):
        r = rows[i]
        ks = sorted(ks)
        _, h, w = r["grid_thw"]
        out.append({**r, "tubes": ks, "grid_thw": (len(ks), h, w), "tube_ts": [float(r["tube_ts"][k]) for k in ks],
                    "n_tokens": len(ks) * tokens_per_tube(r["grid_thw"])})
    return out


def footage_seconds(rows: list[dict]) -> float:
    """From the first segment's start to the last one's end."""
    return max(r["t1"] for r in rows) - min(r["t0"] for r in rows)


def plan_window(rows: list[dict], *, budget: int, long_pixels: int, long_present: set[str],
                max_stride_s: float, tube_seconds: float) -> WindowPlan:
    """The full or long plan of a window's footage rows (SegmentIndex.list), or a retrieval plan with no rows yet
    (the decoder fills it by search). long_present: segment ids whose long tier exists (LongTier.present)."""
    n = len(rows)
    if sum(int(r["n_tokens"]) for r in rows) <= budget:
        return WindowPlan("full", [{**r, "tier": "full"} for r in rows], n)
    if not long_pixels:
        return WindowPlan("retrieval", [], n)
    candidates = [as_long(r, long_pixels) for r in rows if r["segment_id"] in long_present]
    missing = n - len(candidates)
    if not candidates:
        return WindowPlan("retrieval", [], n, long_missing=missing)
    per_tube = max(tokens_per_tube(r["grid_thw"]) for r in candidates)
    cap = min(budget // per_tube, MAX_PLAN_TUBES)
    total = sum(int(r["grid_thw"][0]) for r in candidates)
    if cap >= total and sum(int(r["n_tokens"]) for r in candidates) <= budget:
        return WindowPlan("long", candidates, n, stride_s=tube_seconds, long_missing=missing)
    if cap < 1:
        return WindowPlan("retrieval", [], n, long_missing=missing)
    stride = footage_seconds(candidates) / cap
    if stride > max_stride_s:
        return WindowPlan("retrieval", [], n, stride_s=stride, long_missing=missing)
    return WindowPlan("long", sample_tubes(candidates, cap), n, stride_s=stride, long_missing=missing)


def caption_lines(rows: list[dict], captions: dict[str, str], seen: set[str], limit: int, fmt) -> list[str]:
    """Timestamped caption lines of the rows not in `seen`: runs of one source with the same caption merge into one
    line; at most `limit` lines, spread evenly in time. fmt(t0, t1) writes a time span."""
    runs: list[list] = []                      # [source, t0, t1, caption]
    last: dict[str, list] = {}
    for r in sorted(rows, key=lambda r: (r["t0"], r["source_id"])):
        text = captions.get(r["segment_id"])
        if r["segment_id"] in seen or not text:
            last.pop(r["source_id"], None)
            continue
        prev = last.get(r["source_id"])
        if prev is not None and prev[3] == text:
            prev[2] = r["t1"]
            continue
        run = [r["source_id"], r["t0"], r["t1"], text]
        runs.append(run)
        last[r["source_id"]] = run
    return [f"[{s} {fmt(t0, t1)}] {text}" for s, t0, t1, text in (runs[i] for i in evenly_spaced(len(runs), limit))] \
        if limit else []
