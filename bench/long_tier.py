"""What the long-video tier costs the encoder: VisionEncoder.encode_tiers (both tiers, one packed call, resize
included) against encode (the index resolution only), same encoder, same segments, interleaved reps.

    .venv/bin/python bench/long_tier.py                  # 2 vision blocks of width 1280 (the real width), fp32
    .venv/bin/python bench/long_tier.py --quick          # a smoke run of a few seconds

Segments are 8 s at 2 fps (8 tubes) of random frames at 360p and 720p (sized by the video pixel budget, as the
archive decoder sizes them); the long tier is `long_pixels` per frame (default the video minimum, 128 tokens).
Prints one JSON object: per resolution the tokens per tube of each tier, the patch ratio (tier work / index work)
and the measured time ratio (both tiers / index only, best of reps; median beside it).
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from actors.encoder import VisionEncoder  # noqa: E402
from pipeline.tubes import long_grid, patchify_uint8  # noqa: E402
from qwen2vl.checkpoint import write_tiny_checkpoint  # noqa: E402
from qwen2vl.geometry import VIDEO_MAX_PIXELS, VIDEO_MIN_PIXELS, smart_resize  # noqa: E402

SOURCES = {"360p": (360, 640), "720p": (720, 1280)}


def segments(height: int, width: int, n: int, frames: int, seed: int = 0):
    h, w = smart_resize(height, width, min_pixels=VIDEO_MIN_PIXELS, max_pixels=VIDEO_MAX_PIXELS)
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        rows, grid = patchify_uint8(rng.integers(0, 256, (frames, h, w, 3), dtype=np.uint8))
        out.append((torch.from_numpy(rows), grid))
    return out


def best_and_median(times: list[float]) -> dict:
    return {"best_s": round(min(times), 4), "median_s": round(statistics.median(times), 4)}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--depth", type=int, default=2)
    ap.add_argument("--width", type=int, default=1280)
    ap.add_argument("--segments", type=int, default=4)
    ap.add_argument("--long-pixels", type=int, default=VIDEO_MIN_PIXELS)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    if args.quick:
        args.depth, args.width, args.segments, args.reps = 1, 64, 1, 1
    heads = max(1, args.width // 80)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = write_tiny_checkpoint(Path(tmp) / "ckpt", vision_config={
            "depth": args.depth, "embed_dim": args.width, "num_heads": heads, "mlp_ratio": 4.0})
        enc = VisionEncoder(str(ckpt), token_budget=16384, long_pixels=args.long_pixels)
        report = {"machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                  "vision": {"depth": args.depth, "width": args.width}, "long_pixels": args.long_pixels,
                  "segments": args.segments, "results": {}}
        for name, (h, w) in SOURCES.items():
            segs = segments(h, w, args.segments, 16)
            rows, grids = [r for r, _ in segs], [g for _, g in segs]
            full_patches = sum(t * gh * gw for t, gh, gw in grids)
            low = [long_grid(g, args.long_pixels) for g in grids]
            long_patches = sum(t * gh * gw for t, gh, gw in low)
            enc.encode(rows, grids)                                   # warm up both paths
            enc.encode_tiers(rows, grids)
            index_only, both = [], []
            for _ in range(args.reps):
                t0 = time.perf_counter()
                enc.encode(rows, grids)
                index_only.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                enc.encode_tiers(rows, grids)
                both.append(time.perf_counter() - t0)
            report["results"][name] = {
                "grid": list(grids[0]), "long_grid": list(low[0]),
                "tokens_per_tube": grids[0][1] * grids[0][2] // 4, "long_tokens_per_tube": low[0][1] * low[0][2] // 4,
                "patch_ratio": round(long_patches / full_patches, 3),
                "index_only": best_and_median(index_only), "both_tiers": best_and_median(both),
                "time_ratio": round(min(both) / min(index_only), 3),
            }
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
