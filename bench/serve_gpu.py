"""Serving on one GPU: ours against transformers 4.57.6, random weights of the released 2B and 7B configs (JSON).

    python bench/serve_gpu.py --out serve_gpu.json              # CUDA: 2B then 7B in bf16, within 8 minutes
    python bench/serve_gpu.py --sizes 7B --sections prefill,tower --timeout-budget 300
    python bench/serve_gpu.py --tiny                            # no CUDA: the default; the tests' tiny config

Per size, ours is built from a seeded random state dict (bench/_same_weights.py) and measured, then freed; the
reference (Qwen2VLForConditionalGeneration, SDPA, or flash-attn 2 when installed) is built from the same tensors
and measured: the device never holds both (a 7B in bf16 is ~16 GB, plus activations). Sections (--sections):

  prefill   8k stored visual tokens (32 tubes of 448x448) and a question through the text decoder, as
            deploy/decoder.py prefills: video embeddings in, KV cache and the first token's logits out
  tower     vision tower patches/s on a packed variable-resolution batch (pipeline/packing.py, the encoder's
            token budget), tubes at five frame sizes; model FLOPs per patch from the config; the fraction of the
            bf16 GEMM peak measured in this run (a large torch.mm). Goal: ours >= 45%
  streams   live 2 fps streams one GPU encodes at 448x448 and at 720p: actors/encoder.py VisionEncoder end to end
            (uint8 rows from the host, normalised on the device, tokens back as fp16) at the frame size the
            settings' pixel bounds give; streams = patches/s / patches per stream-second
  generate  single-stream greedy decode tokens/s (batch 1, no stop id): our generate against HF generate

Timings are medians of up to --reps runs after a warm-up, fewer when a section passes --section-limit seconds;
a section that finds the size's share of --timeout-budget spent is skipped and listed. Progress goes to stderr,
the JSON report to stdout. Without CUDA the same code runs the tiny config on the CPU in fp32, and the report's
note says the GPU numbers are still to be measured.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench._same_weights import build_ours, build_reference, release  # noqa: E402
from bench._serve_sections import (GOALS, Run, decode_ours, generate_ours, generate_reference,  # noqa: E402
                                   generate_report, log, prefill_ours, prefill_reference, prefill_report, streams_ours,
                                   tower_ours, tower_reference, tower_report)
from qwen2vl.checkpoint import tiny_config  # noqa: E402
from qwen2vl.dtypes import resolve_dtype  # noqa: E402
from qwen2vl.sizes import released_config  # noqa: E402
from qwen2vl.vision import flash_attn_varlen_func  # noqa: E402

DEFAULTS = {  # option: (released sizes on a GPU, tiny)
    "visual_tokens": (8192, 1024), "tower_tubes": (16, 1), "stream_tubes": (48, 2), "new_tokens": (64, 8),
    "timeout_budget": (480.0, 300.0), "section_limit": (30.0, 10.0), "gemm_n": (8192, 1024),
}


# ---- sections ----------------------------------------------------------------------------------------------------

@dataclass
class Section:
    """`ours` runs with our model on the device; `reference` (None: ours only) after ours is freed, with the
    transformers model; `report` makes the section's JSON of the two (reference None when it was not measured)."""
    ours: Callable[[Run, object], dict]
    reference: Callable[[Run, object], dict] | None = None
    report: Callable[[Run, dict, dict | None], dict] = lambda run, ours, ref: ours


SECTIONS: dict[str, Section] = {
    "prefill": Section(prefill_ours, prefill_reference, prefill_report),
    "tower": Section(tower_ours, tower_reference, tower_report),
    "streams": Section(streams_ours),
    "generate": Section(generate_ours, generate_reference, generate_report),
    "decode": Section(decode_ours),          # ours only: the reference has no continuous batching to compare
}



def measured(run: Run, fn: Callable[[Run, object], dict], model) -> dict:
    """fn's result with the device memory it peaked at (CUDA)."""
    if run.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(run.device)
    result = fn(run, model)
    if run.device.type == "cuda":
        result["gpu_peak_gib"] = round(torch.cuda.max_memory_allocated(run.device) / 2**30, 2)
    return result


def measure_sections(run: Run, model, names: list[str], side: str, skipped: list[str]) -> dict[str, dict]:
    """Each named section's `side` ("ours" or "reference") on `model`, while the size's budget lasts; the rest go to
    `skipped`."""
    results = {}
    for name in names:
        if run.left() <= 0:
            skipped.append(f"{name}{'' if side == 'ours' else ' ' + side}: time budget spent")
            continue
        results[name] = measured(run, getattr(SECTIONS[name], side), model)
    return results


def run_size(run: Run, names: list[str]) -> dict:
    """Ours for every section, freed; then the reference for the sections that have one, freed; then the reports."""
    a = run.args
    out: dict = {"skipped": []}
    results: dict[str, dict] = {"ours": {}, "reference": {}}
    log(f"[{run.size}] building ours ({str(run.dtype).removeprefix('torch.')}, {run.device})")
    t0 = time.perf_counter()
    model, out["weights_checksum"] = build_ours(run.config, run.dtype, run.device, a.seed)
    out["build_s"] = {"ours": round(time.perf_counter() - t0, 2)}
    results["ours"] = measure_sections(run, model, names, "ours", out["skipped"])
    del model
    release(run.device)
    with_reference = [n for n in results["ours"] if SECTIONS[n].reference is not None]
    if with_reference and run.left() > 0:
        log(f"[{run.size}] building the reference ({run.attention})")
        t0 = time.perf_counter()
        ref, total = build_reference(run.config, run.dtype, run.device, a.seed, run.attention)
        out["build_s"]["reference"] = round(time.perf_counter() - t0, 2)
        if abs(total - out["weights_checksum"]) > 1e-6 * max(1.0, abs(total)):
            raise RuntimeError(f"the reference's weights differ from ours (checksums {total} and "
                               f"{out['weights_checksum']})")
        results["reference"] = measure_sections(run, ref, with_reference, "reference", out["skipped"])
        del ref
        release(run.device)
    elif with_reference:
        out["skipped"].append("reference: time budget spent")
    for name, ours in results["ours"].items():
        out[name] = SECTIONS[name].report(run, ours, results["reference"].get(name))
    return out


def machine(device: torch.device) -> dict:
    import transformers

    info = {"device": torch.cuda.get_device_name(device) if device.type == "cuda"
            else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
            "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "cpus": os.cpu_count(), "load_avg_1m": os.getloadavg()[0]}
    if device.type == "cuda":
        info["cuda"] = torch.version.cuda
        info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(device).total_memory / 2**30, 1)
    return info


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="the tests' tiny config (the default without CUDA)")
    ap.add_argument("--sizes", default="2B,7B", help="released configs to run, comma separated (2B, 7B)")
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"comma separated, of {', '.join(SECTIONS)}")
    ap.add_argument("--dtype", default="auto", help="auto: bf16 on a GPU that has it, else fp32")
    ap.add_argument("--visual-tokens", type=int, help="prefill's stored visual tokens (8192; tiny 1024)")
    ap.add_argument("--tower-tubes", type=int, help="tubes per frame size in the tower's batch (16; tiny 1)")
    ap.add_argument("--stream-tubes", type=int, help="streams encoded at once per resolution (48; tiny 2)")
    ap.add_argument("--new-tokens", type=int, help="new tokens per generate call (64; tiny 8)")
    ap.add_argument("--prompt-tokens", type=int, default=128, help="generate's text prompt (decode: the cached prefix)")
    ap.add_argument("--decode-levels", type=int, nargs="+", default=[1, 8, 32],
                    help="concurrent questions of the decode section")
    ap.add_argument("--reps", type=int, default=3, help="timed runs per measurement, after a warm-up")
    ap.add_argument("--timeout-budget", type=float, help="seconds for the whole run, shared evenly by the sizes "
                                                         "(480; tiny 300)")
    ap.add_argument("--section-limit", type=float, help="seconds of timed runs per measurement (30; tiny 10)")
    ap.add_argument("--gemm-n", type=int, help="side of the GEMM peak's square matmul (8192; tiny 1024)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, help="also write the report here, after every size (a cut-off run keeps "
                                             "the sizes it finished)")
    args = ap.parse_args(argv)
    args.tiny = args.tiny or not torch.cuda.is_available()
    for name, (real, tiny) in DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, tiny if args.tiny else real)
    args.sections = [s for s in args.sections.split(",") if s]
    unknown = [s for s in args.sections if s not in SECTIONS]
    if unknown or not args.sections:
        ap.error(f"--sections: unknown {unknown}; choose from {', '.join(SECTIONS)}")
    args.sizes = ["tiny"] if args.tiny else [s for s in args.sizes.split(",") if s]
    if not args.tiny and (not args.sizes or any(s not in ("2B", "7B") for s in args.sizes)):
        ap.error(f"--sizes: 2B and/or 7B, got {args.sizes}")
    if args.new_tokens < 2 or args.visual_tokens < 1 or min(args.tower_tubes, args.stream_tubes, args.reps) < 1:
        ap.error("--new-tokens must be >= 2; --visual-tokens, --tower-tubes, --stream-tubes and --reps >= 1")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    import transformers

    transformers.logging.set_verbosity_error()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    dtype = resolve_dtype(args.dtype, device)
    use_flash = device.type == "cuda" and flash_attn_varlen_func is not None and dtype != torch.float32
    attention = "flash_attention_2" if use_flash else "sdpa"
    started = time.monotonic()
    report = {"bench": "serve_gpu", "machine": machine(device), "tiny": args.tiny,
              "dtype": str(dtype).removeprefix("torch."), "reference_attention": attention,
              "goals": dict(GOALS), "sections": args.sections, "sizes": {}, "goals_met": {}}
    if device.type != "cuda":
        report["note"] = (f"no CUDA device: the tiny config on the CPU in {report['dtype']}, the same code paths; "
                          "the GPU numbers (2B and 7B in bf16) are still to be measured")
    peak: dict = {}
    with tempfile.TemporaryDirectory(prefix="serve-gpu-") as work:
        for i, size in enumerate(args.sizes):
            share = (args.timeout_budget - (time.monotonic() - started)) / (len(args.sizes) - i)
            config = tiny_config() if size == "tiny" else released_config(size)
            run = Run(size, config, device, dtype, attention, args, Path(work), time.monotonic() + share, peak)
            try:
                result = run_size(run, args.sections)
            except Exception as e:            # e.g. out of memory: the other sizes' numbers still count
                log(f"[{size}] failed: {type(e).__name__}: {e}")
                result = {"error": f"{type(e).__name__}: {e}"}
                release(device)
            report["sizes"][size] = result
            met = {r["goal"]["name"]: r["goal"]["met"] for r in result.values() if isinstance(r, dict) and "goal" in r}
            if met:
                report["goals_met"][size] = met
            report["seconds"] = round(time.monotonic() - started, 1)
            if args.out is not None:
                args.out.write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    result = main()
    print(json.dumps(result, indent=1))
    sys.exit(1 if any("error" in size for size in result["sizes"].values()) else 0)
