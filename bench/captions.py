"""Captioning throughput of pipeline.captioner.Captioner: batched vs one segment at a time (JSON on stdout).

    .venv/bin/python bench/captions.py            # 32 segments of 8 tubes x 26x46 patches (2,392 tokens each)
    .venv/bin/python bench/captions.py --quick    # 8 small segments, few tokens: a smoke run of a few seconds
    .venv/bin/python bench/captions.py --grid 1,8,8    # short prefixes (16 tokens): decode-bound

The tiny random checkpoint (qwen2vl.write_tiny_checkpoint: hidden 64, 2 layers, vocab 151,680), fp32 on the CPU.
Segments are SYNTHETIC stored tokens (fp16, random) of a typical grid; both contenders describe the same segments:
  batched   one describe(all segments): batches of batch_size, each prefix prefilled once, the embedding prompt,
            the caption prompt and every decode step run for the whole batch
  single    describe([segment]) for each segment in turn
Each result is a caption (greedy, at most max_new_tokens) and an embedding vector; `outputs_equal` checks the two
contenders agree (captions exactly, vectors to 1e-5). Reps interleave so background load hits both; the best rep
of each is the headline (other processes share the cores), medians beside it. Throughput is segments per second.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

GOAL = 4.0                        # batched segments/s over single segments/s


def segments(n: int, grid: tuple[int, int, int], width: int, seed: int = 0) -> list:
    gen = torch.Generator().manual_seed(seed)
    t, h, w = grid
    return [((torch.randn(t * h * w // 4, width, generator=gen) * 2).half(), grid, [8.0 * k + j for j in range(t)])
            for k in range(n)]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="8 small segments, one rep: a smoke run")
    ap.add_argument("--segments", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=32, help="max_new_tokens of each caption")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--grid", default="8,26,46", help="t,h,w in patches of every segment (default: 8 s of 360p)")
    args = ap.parse_args(argv)
    grid = tuple(int(x) for x in args.grid.split(","))
    if args.quick:
        grid, args.segments, args.new_tokens, args.reps = (8, 8, 8), 8, 8, 1
    work = Path(tempfile.mkdtemp(prefix="tubescope-bench-captions-"))
    try:
        return run(args, work, grid)
    finally:
        shutil.rmtree(work, ignore_errors=True)


@torch.no_grad()
def phases(cap, items) -> dict:
    """Where a segment's time goes, alone and in one batch: the video prefix (prefill), the embedding prompt, the
    caption (greedy decode). Batching shares the decode and embedding steps across segments; the prefill is one
    pass over the segment's own tokens either way (on the tiny model its attention is most of it)."""
    from pipeline.kv import suffix_hidden
    from qwen2vl.generate import generate

    checked = [cap._check_item(k, item) for k, item in enumerate(items[:cap.batch_size])]

    def split(batch) -> list[float]:
        t0 = time.perf_counter()
        cache = cap._prefill(batch)
        t1 = time.perf_counter()
        n = cache.seq_len
        suffix_hidden(cap.model, torch.tensor([cap.embed_suffix] * len(batch)), cache)
        cache.crop(n)
        t2 = time.perf_counter()
        generate(cap.model, torch.tensor([cap.caption_suffix] * len(batch)), past_key_values=cache,
                 max_new_tokens=cap.max_new_tokens)
        t3 = time.perf_counter()
        return [(b - a) * 1000.0 / len(batch) for a, b in ((t0, t1), (t1, t2), (t2, t3))]

    single = [split([one]) for one in checked[:4]]
    batched = split(checked)
    names = ("prefill", "embedding", "caption")
    return {"single": {k: round(statistics.mean(x[i] for x in single), 2) for i, k in enumerate(names)},
            f"batch_of_{len(checked)}": {k: round(batched[i], 2) for i, k in enumerate(names)}}


def run(args, work: Path, grid: tuple[int, int, int]) -> dict:
    import qwen2vl
    from pipeline.captioner import Captioner

    cap = Captioner(qwen2vl.write_tiny_checkpoint(work / "tiny"), dtype="float32", device="cpu",
                    max_new_tokens=args.new_tokens, batch_size=args.batch_size)
    items = segments(args.segments, grid, cap.hidden_size)

    def timed(fn) -> tuple[float, float, list]:
        wall, cpu = time.perf_counter(), time.process_time()
        out = fn()
        return time.perf_counter() - wall, time.process_time() - cpu, out

    def batched():
        return cap.describe(items)

    def single():
        return [cap.describe([item])[0] for item in items]

    cap.describe(items[:2]), cap.describe(items[:1])          # warm-up: allocator, thread pools, the greedy head
    runs = {"batched": [], "single": []}
    load_seen = [os.getloadavg()[0]]
    for _ in range(args.reps):                                  # interleaved
        for name, fn in (("batched", batched), ("single", single)):
            runs[name].append(timed(fn))
        load_seen.append(os.getloadavg()[0])

    (_, _, b_out), (_, _, s_out) = runs["batched"][0], runs["single"][0]
    vector_diff = max(float(np.abs(a[1] - b[1]).max()) for a, b in zip(b_out, s_out))
    rate = {name: [args.segments / wall for wall, _, _ in r] for name, r in runs.items()}
    cpu_rate = {name: [args.segments / cpu for _, cpu, _ in r] for name, r in runs.items()}
    best = {name: max(v) for name, v in rate.items()}
    med = {name: statistics.median(v) for name, v in rate.items()}
    ratio = best["batched"] / best["single"]
    result = {
        "device": "cpu", "dtype": "float32", "threads": torch.get_num_threads(), "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(), "load_avg_1m": [round(x, 2) for x in load_seen],
        "model": "tiny random checkpoint (qwen2vl.write_tiny_checkpoint)",
        "config": {"hidden_size": cap.hidden_size, "layers": cap.model.config.text.num_hidden_layers,
                   "vocab_size": cap.model.config.text.vocab_size},
        "footage": "synthetic stored tokens (fp16, random)",
        "segments": args.segments, "grid_thw": list(grid), "tokens_per_segment": grid[0] * grid[1] * grid[2] // 4,
        "batch_size": args.batch_size, "max_new_tokens": args.new_tokens, "reps": args.reps,
        "batched_segments_per_s": round(best["batched"], 2), "single_segments_per_s": round(best["single"], 2),
        "speedup": round(ratio, 2), "goal": GOAL, "meets_goal": ratio >= GOAL,
        "median": {"batched_segments_per_s": round(med["batched"], 2),
                   "single_segments_per_s": round(med["single"], 2),
                   "speedup": round(med["batched"] / med["single"], 2)},
        "by_cpu_time": {"batched_segments_per_s": round(max(cpu_rate["batched"]), 2),
                        "single_segments_per_s": round(max(cpu_rate["single"]), 2)},
        "outputs_equal": [c for c, _ in b_out] == [c for c, _ in s_out] and vector_diff <= 1e-5,
        "max_vector_diff": vector_diff,
        "mean_caption_chars": round(statistics.mean(len(c) for c, _ in b_out), 1),
        "phases_ms_per_segment": phases(cap, items),
    }
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
