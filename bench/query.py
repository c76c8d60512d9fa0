"""Question answering over indexed footage: deploy.decoder.Decoder against transformers 4.57.6 `generate`.

    .venv/bin/python bench/query.py            # 179M-parameter text config, ~2048-token prompt, fp32
    .venv/bin/python bench/query.py --quick    # a smoke run of a few seconds

Same weights (a transformers Qwen2-VL built here, perturbed, saved with save_pretrained and loaded by ours), same
prompt ids, same dtype, same process; runs interleave so background load hits both. Prints one JSON object:
  cold      our time to first token with an empty prefix cache (listing, token reads, prefill, first token)
            vs the reference prefill (one forward over the prompt; it computes logits at every position)
  warm      our time to first token for a NEW question over the same footage (cached video prefix) vs cold
  decode    tokens/s after the first token, ours (Decoder.ask) vs the reference generate (greedy, same max tokens);
            ours picks each fp32 argmax through qwen2vl.argmax_head (exact; `answers_equal` checks the text)
Headline numbers are the best rep of each side (other processes share the cores); medians are printed beside them.
  plans     asks over 1 hour and 24 hours of indexed footage (450 segments of 8 s an hour, with their long tier):
            the plan each took (deploy/plans.py), tubes looked at, time to first token, total; and the 24 hours
            again with long_max_stride_seconds=60, which makes it a retrieval plan (search narrows it)
The footage is a SYNTHETIC index: random pixel rows encoded by the checkpoint's own tiny vision tower (depth 1,
width 32) into fp16 tokens of the text width. The reference receives the same pixel rows and runs its own copy of
that tower inside its prefill (timed separately: `reference.vision_tower_s`).
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

import torch  # noqa: E402

from bench._common import perturb_  # noqa: E402

LONG_PIXELS = 4 * 28 * 28        # the synthetic footage's frames are 56x112: its long tier is 28x56 (2 tokens)
FULL = dict(hidden_size=1024, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2,
            intermediate_size=2816, vocab_size=151936, mrope_section=[16, 24, 24], tie_word_embeddings=True)
QUICK = dict(hidden_size=128, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
             intermediate_size=256, vocab_size=151936, mrope_section=[8, 12, 12], tie_word_embeddings=True)
VISION = dict(depth=1, embed_dim=32, num_heads=2, mlp_ratio=4)
SPECIAL = dict(image_token_id=151655, video_token_id=151656, vision_start_token_id=151652,
               vision_end_token_id=151653, bos_token_id=151643, eos_token_id=151645, pad_token_id=151643)
PATCH_DIM = 1176


def build_checkpoint(folder: Path, text: dict) -> "object":
    """A transformers Qwen2-VL with perturbed weights saved in the HF layout, plus our tokenizer/processor files."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    from qwen2vl.processor import write_preprocessor_config
    from qwen2vl.tokenizer import write_tiny_tokenizer

    t = dict(text)
    mrope = t.pop("mrope_section")
    cfg = Qwen2VLConfig(vision_config={**VISION, "hidden_size": t["hidden_size"]},
                        rope_scaling={"type": "mrope", "mrope_section": mrope}, rope_theta=1e6, rms_norm_eps=1e-6,
                        **SPECIAL, **t)
    torch.manual_seed(0)
    ref = Qwen2VLForConditionalGeneration(cfg).eval()
    perturb_(ref, seed=1, scale=0.02)           # reference init zeroes biases and sets norms to 1
    ref.generation_config.eos_token_id = [151645, 151643]
    ref.save_pretrained(folder, safe_serialization=True)
    write_tiny_tokenizer(folder)
    write_preprocessor_config(folder)
    return ref


def segment_records(tower, source: str, n: int, grid: tuple[int, int, int], seconds: float, mid: str,
                    distinct: int, seed: int) -> tuple[list, dict[str, torch.Tensor]]:
    """n contiguous segments of `seconds` each; tokens from the tower over random pixel rows (cycled `distinct`)."""
    from pipeline.records import IndexedSegment

    gen = torch.Generator().manual_seed(seed)
    t, h, w = grid
    pixels, tokens = [], []
    with torch.no_grad():
        for _ in range(min(n, distinct)):
            rows = torch.randn(t * h * w, PATCH_DIM, generator=gen)
            pixels.append(rows)
            tokens.append(tower(rows, torch.tensor([grid])).half())
    tube_s = seconds / t
    records = [IndexedSegment(segment_id="", source_id=source, t0=k * seconds, t1=(k + 1) * seconds, grid_thw=grid,
                              tube_ts=[k * seconds + j * tube_s for j in range(t)], tokens=tokens[k % distinct],
                              model_id=mid) for k in range(n)]
    return records, {r.segment_id: pixels[k % distinct] for k, r in enumerate(records)}


class FirstTokenClock:
    """transformers streamer: generate puts the prompt first, then each new token; keeps the time of each put."""

    def __init__(self):
        self.times: list[float] = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def param_count(model) -> int:
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny config and prompt, one rep: a smoke run")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--hours", default="1,24", help="windows of indexed footage to ask over, in hours")
    args = ap.parse_args(argv)
    text = QUICK if args.quick else FULL
    prompt_grid = (8, 8, 8) if args.quick else (8, 16, 30)       # 2 segments: 256 / 1920 visual tokens
    hour_grid = (8, 4, 4) if args.quick else (8, 4, 8)          # 32 / 64 tokens per 8 s segment
    if args.quick:
        args.reps, args.new_tokens, args.hours = 1, 8, "0.25,1"

    work = Path(tempfile.mkdtemp(prefix="tubescope-bench-query-"))
    try:
        return run(args, work, text, prompt_grid, hour_grid)
    finally:
        shutil.rmtree(work, ignore_errors=True)          # the checkpoint alone is ~0.7 GB


def run(args, work: Path, text: dict, prompt_grid: tuple, hour_grid: tuple) -> dict:
    from deploy.decoder import Decoder
    from deploy.plans import tokens_per_tube
    from pipeline.long_tier import LongTier
    from pipeline.tubes import long_grid
    from deploy.footage import build_prompt, group_blocks, list_window
    from pipeline.checkpoints import model_id
    from pipeline.index import SegmentIndex
    from pipeline.settings import load_settings
    from qwen2vl.checkpoint import load_pretrained

    ckpt = work / "model"
    ref = build_checkpoint(ckpt, text)
    mid = model_id(ckpt)
    tower = load_pretrained(ckpt).visual                        # the checkpoint's own (tiny) vision tower
    index = SegmentIndex(work / "index")
    cam, cam_pixels = segment_records(tower, "cam", 2, prompt_grid, 8.0, mid, distinct=2, seed=1)
    t_index = time.perf_counter()
    index.add(cam)
    hours = [float(h) for h in args.hours.split(",")]
    for h in hours:
        n = round(h * 450)
        footage, _ = segment_records(tower, f"{h:g}h", n, hour_grid, 8.0, mid, distinct=30, seed=2)
        low, _ = segment_records(tower, f"{h:g}h", n, long_grid(hour_grid, LONG_PIXELS), 8.0, mid, distinct=30,
                                 seed=3)
        index.add(footage)
        LongTier(index, LONG_PIXELS).add(low)
    index_s = time.perf_counter() - t_index
    del tower

    settings = load_settings(data_dir=work / "data", model_path=ckpt, long_pixels=LONG_PIXELS)
    dec = Decoder(settings, ckpt, index=index, dtype=torch.float32, device="cpu")
    question = "What happens near the door, and when does it happen?"
    plan = build_prompt(dec.processor, group_blocks(list_window(index, ["cam"], None, None, mid), dec.tube_seconds,
                                                    settings.max_gap_seconds), question, dec.model.config)
    ids = torch.tensor([plan.input_ids])
    pixels = torch.cat([cam_pixels[s] for s in plan.segment_ids])
    grid = plan.video_grid_thw
    n_new = args.new_tokens

    def ours_cold() -> dict:
        dec.prefix_cache.clear()
        return dec.ask(question, ["cam"], max_new_tokens=n_new)

    warm_k = [0]

    def ours_warm() -> dict:
        warm_k[0] += 1
        return dec.ask(f"Question {warm_k[0]}: is a person visible near the door?", ["cam"], max_new_tokens=n_new)

    def ref_prefill() -> float:
        start = time.perf_counter()
        ref(input_ids=ids, pixel_values_videos=pixels, video_grid_thw=grid)
        return time.perf_counter() - start

    def ref_tower() -> float:
        start = time.perf_counter()
        ref.model.visual(pixels, grid_thw=grid)
        return time.perf_counter() - start

    def ref_generate() -> tuple[float, float, list[int]]:
        clock = FirstTokenClock()
        start = time.perf_counter()
        out = ref.generate(input_ids=ids, pixel_values_videos=pixels, video_grid_thw=grid, max_new_tokens=n_new,
                           do_sample=False, streamer=clock)
        end = time.perf_counter()
        new = out[0, ids.shape[1]:].tolist()
        first = clock.times[1] if len(clock.times) > 1 else end
        return first - start, (len(new) - 1) / (end - first) if len(new) > 1 and end > first else 0.0, new

    cold, warm, ref_pre, ref_vis, ref_gen = [], [], [], [], []
    load_seen = [os.getloadavg()[0]]
    with torch.inference_mode():
        ours_cold(), ours_warm(), ref_prefill(), ref_generate()          # warm-up: allocator, thread pools
        for _ in range(args.reps):                                        # interleaved
            cold.append(ours_cold())
            ref_pre.append(ref_prefill())
            warm.append(ours_warm())
            ref_vis.append(ref_tower())
            ref_gen.append(ref_generate())
            load_seen.append(os.getloadavg()[0])

        def window_ask(source: str, q: str) -> dict:
            scored_before = dec.ranker.segments_scored
            r = dec.ask(q, [source], max_new_tokens=n_new)
            t = r["timings"]
            return {"plan": r["plan"]["kind"], "tubes": r["plan"]["tubes"], "resolutions": r["plan"]["resolutions"],
                    "segments_seen": r["plan"]["segments"], "window_segments": r["plan"]["window_segments"],
                    "stride_s": r["plan"]["stride_s"] and round(r["plan"]["stride_s"], 2),
                    "visual_tokens": t["visual_tokens"], "segments_scored_by_search":
                    dec.ranker.segments_scored - scored_before,
                    **{k: round(t[k], 4) for k in ("select_s", "prefill_s", "ttft_s", "total_s")},
                    "prefix_cache": t["prefix_cache"]}
        plans = {}
        for h in hours:
            plans[f"{h:g}h"] = {"first_ask": window_ask(f"{h:g}h", "When does a truck arrive at the gate?"),
                                "second_ask_other_question": window_ask(f"{h:g}h", "When does the truck leave?")}
        long_window = f"{max(hours):g}h"
        dec.settings = settings.model_copy(update={"long_max_stride_seconds": 60.0})
        plans[f"{long_window} with long_max_stride_seconds=60"] = {
            "first_ask": window_ask(long_window, "When does a truck arrive at the gate?")}
        dec.settings = settings

    med = statistics.median
    # Other processes share these cores: the best rep of each side is the headline (as in bench/decode.py),
    # medians are reported beside it.
    cold_all = [r["timings"]["ttft_s"] for r in cold]
    warm_all = [r["timings"]["ttft_s"] for r in warm]
    ours_tps_all = [(r["timings"]["new_tokens"] - 1) / r["timings"]["decode_s"] for r in warm + cold
                    if r["timings"]["new_tokens"] > 1]
    ref_tps_all = [g[1] for g in ref_gen]
    cold_ttft, warm_ttft, ours_tps, ref_tps, ref_prefill_s = (min(cold_all), min(warm_all), max(ours_tps_all),
                                                              max(ref_tps_all), min(ref_pre))
    tok = dec.processor.tokenizer
    ref_answer = tok.decode([t for t in ref_gen[0][2] if t not in (151645, 151643)], skip_special_tokens=True)
    result = {
        "device": "cpu", "dtype": "float32", "threads": torch.get_num_threads(), "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(), "load_avg_1m": [round(x, 2) for x in load_seen],
        "config": {**text, "text_params_m": round((param_count(ref) - param_count(ref.model.visual)) / 1e6, 1),
                   "vision": VISION},
        "footage": "synthetic: random pixel rows through the checkpoint's tiny vision tower, fp16 tokens",
        "prompt_tokens": len(plan.input_ids), "visual_tokens": plan.visual_tokens, "new_tokens": n_new,
        "index_write_s": round(index_s, 2),
        "cold": {"ours_ttft_s": round(cold_ttft, 4), "reference_prefill_s": round(ref_prefill_s, 4),
                 "reference_ttft_in_generate_s": round(min(g[0] for g in ref_gen), 4),
                 "speedup_vs_reference_prefill": round(ref_prefill_s / cold_ttft, 2),
                 "median": {"ours_ttft_s": round(med(cold_all), 4), "reference_prefill_s": round(med(ref_pre), 4),
                            "speedup_vs_reference_prefill": round(med(ref_pre) / med(cold_all), 2)},
                 "ours_breakdown_s": {k: round(min(r["timings"][k] for r in cold), 4)
                                      for k in ("select_s", "prefill_s")}},
        "warm": {"ours_ttft_s": round(warm_ttft, 4), "speedup_vs_cold": round(cold_ttft / warm_ttft, 1),
                 "median": {"ours_ttft_s": round(med(warm_all), 4),
                            "speedup_vs_cold": round(med(cold_all) / med(warm_all), 1)},
                 "ours_breakdown_s": {k: round(min(r["timings"][k] for r in warm), 4)
                                      for k in ("select_s", "prefill_s")},
                 "prefix_cache": [r["timings"]["prefix_cache"] for r in warm]},
        "decode": {"ours_tokens_per_s": round(ours_tps, 2), "reference_tokens_per_s": round(ref_tps, 2),
                   "speedup": round(ours_tps / ref_tps, 2) if ref_tps else None,
                   "median": {"ours_tokens_per_s": round(med(ours_tps_all), 2),
                              "reference_tokens_per_s": round(med(ref_tps_all), 2)}},
        "reference": {"impl": f"transformers {__import__('transformers').__version__} generate (eager attention "
                              "default, fp32)", "vision_tower_s": round(med(ref_vis), 4)},
        "answers_equal": cold[0]["answer"] == ref_answer,
        "plans": {"tokens_per_segment": hour_grid[0] * hour_grid[1] * hour_grid[2] // 4,
                  "long_tokens_per_tube": tokens_per_tube(long_grid(hour_grid, LONG_PIXELS)),
                  "ask_token_budget": settings.ask_token_budget, "long_pixels": LONG_PIXELS, **plans},
        "prefix_cache": dec.prefix_cache.stats(),
    }
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
