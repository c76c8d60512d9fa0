"""The measurements of bench/serve_gpu.py: each section's side with our model, with the reference, and its report.

A section's `ours` and `reference` functions take the Run and a model and return plain numbers; its report
function combines the two sides (the reference's None when it was not measured).
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from bench._common import gemm_peak_gflops, time_once
from bench._same_weights import write_vision_checkpoint
from bench.encoder import flops_per_patch
from pipeline.packing import gather_batch, pack_tubes
from pipeline.settings import Settings
from qwen2vl.geometry import FACTOR, PATCH_SIZE, smart_resize
from qwen2vl.rope import get_rope_index

GOALS = {"tower_fraction_of_gemm_peak": 0.45, "decode_32_concurrent_vs_single_stream": 10.0}
PREFILL_TUBE = (32, 32)           # patches of one 448x448 tube: 256 visual tokens
TOWER_SOURCES = {"448x448": (448, 448), "480p": (480, 640), "720p": (720, 1280), "1080p": (1080, 1920),
                 "720p portrait": (1280, 720)}
STREAM_SOURCES = {"448x448": (448, 448), "720p": (720, 1280)}
TEXT_IDS = 5000                   # prompt text: ordinary token ids below this


def log(message: str) -> None:
    print(f"[serve_gpu {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


@dataclass
class Run:
    """What the sections of one size share."""
    size: str
    config: object                          # qwen2vl Qwen2VLConfig
    device: torch.device
    dtype: torch.dtype
    attention: str                          # the reference's attn_implementation
    args: argparse.Namespace
    workdir: Path
    deadline: float                         # time.monotonic() when this size's share of the budget is spent
    peak: dict                              # the GEMM peak, measured once per process
    shared: dict = field(default_factory=dict)    # what ours leaves for the reference's report (logits, tokens)

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def timed(self, fn: Callable[[], object], what: str) -> list[float]:
        """fn once to warm up, then up to --reps timed runs (at least one) within --section-limit and the deadline."""
        log(f"[{self.size}] {what}")
        fn()
        stop = min(time.monotonic() + self.args.section_limit, self.deadline)
        seconds = []
        while len(seconds) < self.args.reps:
            seconds.append(time_once(fn, self.device).wall_s)
            if time.monotonic() >= stop:
                break
        return seconds


def stats(seconds: list[float]) -> dict:
    return {"seconds_median": round(statistics.median(seconds), 5), "seconds_best": round(min(seconds), 5),
            "runs": len(seconds)}


def goal(name: str, value: float) -> dict:
    """A section's goal check: {"name", "at_least", "met"}; serve_gpu copies `met` to the report's goals_met."""
    return {"name": name, "at_least": GOALS[name], "met": bool(value >= GOALS[name])}


def ratio(reference: dict | None, ours: dict, key: str = "seconds_median") -> float | None:
    return None if reference is None else round(reference[key] / ours[key], 3)


# ---- prefill -------------------------------------------------------------------------------------------------------

def prefill_inputs(run: Run) -> dict:
    """A system-like text head, one video block of stored tokens (tubes of 448x448 frames), the question."""
    cfg, merge = run.config, run.config.vision.spatial_merge_size ** 2
    per_tube = PREFILL_TUBE[0] * PREFILL_TUBE[1] // merge
    tubes = max(1, run.args.visual_tokens // per_tube)
    n_visual = tubes * per_tube
    gen = torch.Generator().manual_seed(run.args.seed)
    head = torch.randint(0, TEXT_IDS, (24,), generator=gen).tolist()
    question = torch.randint(0, TEXT_IDS, (24,), generator=gen).tolist()
    prefix = head + [cfg.vision_start_token_id] + [cfg.video_token_id] * n_visual + [cfg.vision_end_token_id]
    ids = torch.tensor([prefix + question])
    grid = torch.tensor([[tubes, *PREFILL_TUBE]])
    positions, deltas = get_rope_index(ids, None, grid, config=cfg)
    video = torch.randn(n_visual, cfg.text.hidden_size, generator=gen)
    on = {"device": run.device}
    return {"ids": ids.to(**on), "grid": grid.to(**on), "positions": positions.to(**on), "deltas": deltas.to(**on),
            "video": video.to(run.device, run.dtype), "prefix_len": len(prefix)}


def prefill_ours(run: Run, model) -> dict:
    from pipeline.kv import prefill_kv

    x = prefill_inputs(run)
    p = x["prefix_len"]

    def once():
        cache = prefill_kv(model, x["ids"][:, :p], x["video"], x["positions"][:, :, :p], x["deltas"])
        return model(x["ids"][:, p:], past_key_values=cache, use_cache=True, logits_to_keep=1).logits[0, -1]

    with torch.inference_mode():
        run.shared["prefill_logits"] = once().float().cpu()
        n = run.timed(once, f"prefill ours: {x['video'].shape[0]} visual tokens")
    return {**stats(n), "prompt_tokens": int(x["ids"].shape[1]), "visual_tokens": int(x["video"].shape[0])}


def prefill_reference(run: Run, ref) -> dict:
    x = prefill_inputs(run)
    mask = (x["ids"] == run.config.video_token_id)[..., None]

    def once():      # the decoder stack and the last position's logits, as ours: no 8k x vocab logits
        embeds = ref.get_input_embeddings()(x["ids"]).masked_scatter(mask, x["video"])
        out = ref.model(input_ids=x["ids"], inputs_embeds=embeds, video_grid_thw=x["grid"], use_cache=True)
        return ref.lm_head(out.last_hidden_state[:, -1:])[0, -1]

    with torch.inference_mode():
        logits = once().float().cpu()
        n = run.timed(once, "prefill reference")
    ours = run.shared.get("prefill_logits")
    return {**stats(n), "max_abs_logit_diff_vs_ours": None if ours is None else
            round(float((logits - ours).abs().max()), 5), "max_abs_logit": round(float(logits.abs().max()), 5)}


def prefill_report(run: Run, ours: dict, ref: dict | None) -> dict:
    return {"ours": ours, "reference": ref, "speedup_vs_reference": ratio(ref, ours)}


# ---- vision tower ----------------------------------------------------------------------------------------------------

def tube_grid(height: int, width: int) -> tuple[int, int, int]:
    """(1, h, w) patches of one tube of a source of this frame size, resized by the settings' default bounds."""
    fields = Settings.model_fields
    h, w = smart_resize(height, width, FACTOR, fields["min_pixels"].default, fields["max_pixels"].default)
    return 1, h // PATCH_SIZE, w // PATCH_SIZE


def uint8_rows(grid: tuple[int, int, int], patch_dim: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (grid[0] * grid[1] * grid[2], patch_dim), generator=gen, dtype=torch.uint8)


def tower_batches(run: Run) -> tuple[list, list]:
    """Packed batches (device rows in the model dtype, grid_thw) of --tower-tubes tubes per frame size, and the
    items' grids (segments of that many tubes, as an archive job hands them over)."""
    vcfg = run.config.vision
    grids = [(run.args.tower_tubes, *tube_grid(*hw)[1:]) for hw in TOWER_SOURCES.values()]
    rows = [uint8_rows(g, vcfg.patch_dim, i) for i, g in enumerate(grids)]
    budget = Settings.model_fields["encoder_token_budget"].default
    batches = []
    for batch in pack_tubes(grids, budget):
        pixel_rows, grid_thw = gather_batch(batch, rows)
        x = pixel_rows.to(run.device).float().div_(127.5).sub_(1.0).to(run.dtype)   # normalised, off the clock
        batches.append((x, grid_thw.to(run.device)))
    return batches, grids


def tower_side(run: Run, tower: Callable, who: str) -> dict:
    batches, grids = tower_batches(run)
    patches = sum(int(x.shape[0]) for x, _ in batches)

    def once():
        for x, grid in batches:
            tower(x, grid)

    with torch.inference_mode():
        n = run.timed(once, f"tower {who}: {patches} patches in {len(batches)} packed batches")
    return {**stats(n), "patches": patches, "batches": len(batches), "grids": grids}


def gemm_peak(run: Run) -> float:
    if "gflops" not in run.peak:
        log(f"GEMM peak: torch.mm {run.args.gemm_n}^2 in {str(run.dtype).removeprefix('torch.')}")
        run.peak["gflops"] = gemm_peak_gflops(run.dtype, run.device, run.args.gemm_n)[0]
    return run.peak["gflops"]


def tower_ours(run: Run, model) -> dict:
    gemm_peak(run)
    return tower_side(run, model.visual, "ours")


def tower_reference(run: Run, ref) -> dict:
    return tower_side(run, lambda x, grid: ref.model.visual(x, grid_thw=grid), "reference")


def tower_report(run: Run, ours: dict, ref: dict | None) -> dict:
    grids = ours.pop("grids")
    if ref is not None:
        ref.pop("grids")
    flops = flops_per_patch(run.config.vision, torch.tensor(grids))
    peak = gemm_peak(run)
    sides = {"ours": ours, "reference": ref}
    for side in (s for s in sides.values() if s is not None):
        side["patches_per_s"] = round(side["patches"] / side["seconds_median"], 1)
        achieved = flops["total"] * side["patches"] / side["seconds_median"] / 1e9
        side["achieved_gflops"] = round(achieved, 1)
        side["fraction_of_gemm_peak"] = round(achieved / peak, 4)
    fraction = ours["fraction_of_gemm_peak"]
    return {**sides, "speedup_vs_reference": ratio(ref, ours), "gemm_peak_gflops": round(peak, 1),
            "segments": {name: list(g) for name, g in zip(TOWER_SOURCES, grids)},
            "flops_per_patch_mflop": {k: round(v / 1e6, 3) for k, v in flops.items()},
            "goal": goal("tower_fraction_of_gemm_peak", fraction)}


# ---- live streams --------------------------------------------------------------------------------------------------

def streams_ours(run: Run, model) -> dict:
    from actors.encoder import VisionEncoder

    log(f"[{run.size}] streams: writing the tower's checkpoint and loading it as the encoder actors do")
    folder = write_vision_checkpoint(model, run.workdir / f"vision-{run.size}")
    budget = Settings.model_fields["encoder_token_budget"].default
    encoder = VisionEncoder(str(folder), token_budget=budget, dtype=run.dtype, device=str(run.device),
                            pipeline="live")
    fps = Settings.model_fields["fps"].default
    out = {}
    for i, (name, (height, width)) in enumerate(STREAM_SOURCES.items()):
        grid = tube_grid(height, width)
        n = run.args.stream_tubes                        # one tube (a stream-second at 2 fps) of n streams each
        rows = [uint8_rows(grid, run.config.vision.patch_dim, 100 * i + k) for k in range(n)]
        seconds = run.timed(lambda: encoder.encode(rows, [grid] * n), f"streams at {name}: {n} tubes of {grid}")
        per_stream = grid[1] * grid[2] * fps / run.config.vision.temporal_patch_size
        patches_per_s = n * grid[1] * grid[2] / statistics.median(seconds)
        out[name] = {**stats(seconds), "frame_size": [grid[1] * PATCH_SIZE, grid[2] * PATCH_SIZE],
                     "tube_grid": list(grid), "patches_per_stream_second": per_stream,
                     "patches_per_s": round(patches_per_s, 1), "streams": round(patches_per_s / per_stream, 1)}
    return out


# ---- single-stream decode ------------------------------------------------------------------------------------------

def generate_side(run: Run, call: Callable[[torch.Tensor, int], torch.Tensor], who: str) -> dict:
    """Tokens/s of decode steps alone: (N - 1) / (time of N new tokens - time of 1), each call with its prefill."""
    gen = torch.Generator().manual_seed(run.args.seed + 1)
    ids = torch.randint(0, TEXT_IDS, (1, run.args.prompt_tokens), generator=gen).to(run.device)
    n = run.args.new_tokens
    with torch.inference_mode():
        tokens = call(ids, n).cpu()
        full = run.timed(lambda: call(ids, n), f"generate {who}: {n} new tokens")
        one = run.timed(lambda: call(ids, 1), f"generate {who}: 1 new token")
    step = max(statistics.median(full) - statistics.median(one), 1e-9) / (n - 1)
    return {"new_tokens": n, "prompt_tokens": run.args.prompt_tokens, "call": stats(full), "one_token": stats(one),
            "decode_tokens_per_s": round(1 / step, 2), "tokens": tokens.view(-1).tolist()}


def generate_ours(run: Run, model) -> dict:
    return generate_side(run, lambda ids, n: model.generate(ids, max_new_tokens=n, eos_token_id=[]), "ours")


def generate_reference(run: Run, ref) -> dict:
    config = copy.deepcopy(ref.generation_config)
    config.eos_token_id, config.do_sample = None, False                 # exactly N tokens, as ours without stop ids

    def call(ids, n):
        out = ref.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                           generation_config=config)
        return out[:, ids.shape[1]:]
    return generate_side(run, call, "reference")


def generate_report(run: Run, ours: dict, ref: dict | None) -> dict:
    report = {"ours": ours, "reference": ref}
    if ref is not None:
        a, b = ours.pop("tokens"), ref.pop("tokens")
        report["speedup_vs_reference"] = round(ours["decode_tokens_per_s"] / ref["decode_tokens_per_s"], 3)
        report["first_token_difference"] = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
    else:
        ours.pop("tokens")
    return report


# ---- concurrent decode ---------------------------------------------------------------------------------------------

def decode_ours(run: Run, model) -> dict:
    """Aggregate decode tokens/s of 1, 8 and 32 questions through the continuous-batching scheduler, against the same
    questions asked one by one in the same run (bench/batching.py). Answers run to their full length (no stop id),
    so every level decodes the same number of tokens per question."""
    from bench.batching import concurrent_decode

    stop = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = [-1]                       # an id no token has
    levels = {}
    try:
        for n in run.args.decode_levels:
            if run.left() <= 0:
                break
            log(f"[{run.size}] decode: {n} concurrent questions, {run.args.new_tokens} new tokens each")
            levels[str(n)] = concurrent_decode(model, n, max_new_tokens=run.args.new_tokens,
                                               prefix_tokens=run.args.prompt_tokens, suffix_tokens=8,
                                               rounds=run.args.reps)
    finally:
        model.generation_config.eos_token_id = stop
    report = {"levels": levels}
    if "1" in levels and "32" in levels:
        single = levels["1"]["concurrent_tok_s"]
        report["aggregate_32_vs_single_stream"] = round(levels["32"]["concurrent_tok_s"] / single, 2)
        report["goal"] = goal("decode_32_concurrent_vs_single_stream", report["aggregate_32_vs_single_stream"])
    return report
