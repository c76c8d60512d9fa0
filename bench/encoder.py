"""Vision tower throughput: ours (qwen2vl.vision) against the transformers 4.57.6 reference, same weights and batch.

    .venv/bin/python bench/encoder.py [--dtype fp32|bf16] [--device cpu|cuda] [--depth 2] [--width 1280] [--quick]

Prints one JSON object: GEMM peak of the dtype (same process, threads and dtype), patches/s of both towers on a
mixed-resolution packed batch (segments of video tubes at several aspect ratios), analytic model FLOPs per patch,
achieved GFLOP/s and fraction of the GEMM peak, max abs diff between the outputs, peak memory.
On cuda: bf16 by default, flash-attn varlen when installed, MFU against a stated dense bf16 peak.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench._common import DTYPES, RssPeak, current_rss_mb, gemm_peak_gflops, perturb_, time_once  # noqa: E402
from qwen2vl.config import VisionConfig  # noqa: E402
from qwen2vl.vision import VisionTransformer, flash_attn_varlen_func  # noqa: E402

H100_BF16_DENSE_TFLOPS = 989.0
# (h, w) in patches of one tube, five aspect ratios at roughly 400 patches each (16:9, 4:3, 1:1, 3:4, 8:3)
TUBE_SHAPES = [(16, 28), (18, 24), (20, 20), (24, 18), (12, 32)]


def mixed_batch(segments: int, tubes: int, shapes: list[tuple[int, int]], patch_dim: int, seed: int = 0):
    """One video item per segment: `tubes` temporal slices at that segment's frame size, shapes cycled."""
    grid = torch.tensor([[tubes, *shapes[i % len(shapes)]] for i in range(segments)], dtype=torch.long)
    n_rows = int((grid[:, 0] * grid[:, 1] * grid[:, 2]).sum())
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n_rows, patch_dim, generator=gen), grid


def flops_per_patch(cfg: VisionConfig, grid: torch.Tensor) -> dict:
    """Model FLOPs per input patch, counted analytically (2 per multiply-add): linear layers + attention."""
    e, n_rows = cfg.embed_dim, int((grid[:, 0] * grid[:, 1] * grid[:, 2]).sum())
    group = cfg.spatial_merge_size ** 2
    seq_sq = int((grid[:, 0] * (grid[:, 1] * grid[:, 2]) ** 2).sum())     # sum over slices of L^2
    linear_block = 2 * e * (3 * e + e + 2 * cfg.mlp_dim)                # qkv, proj, fc1, fc2
    attention_block = 4 * e * seq_sq / n_rows                            # QK^T and PV: 2 L^2 E each per slice
    merger = (2 * (group * e) ** 2 + 2 * group * e * cfg.hidden_size) / group
    patch_embed = 2 * cfg.patch_dim * e
    total = patch_embed + cfg.depth * (linear_block + attention_block) + merger
    return {"total": total, "patch_embed": patch_embed, "linear_per_block": linear_block,
            "attention_per_block": attention_block, "merger": merger}


def build_towers(cfg: VisionConfig, dtype: torch.dtype, device: torch.device, attn_impl: str):
    from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLVisionConfig
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel

    ref_cfg = Qwen2VLVisionConfig(depth=cfg.depth, embed_dim=cfg.embed_dim, num_heads=cfg.num_heads,
                                  hidden_size=cfg.hidden_size, mlp_ratio=cfg.mlp_ratio, in_channels=cfg.in_channels,
                                  patch_size=cfg.patch_size, temporal_patch_size=cfg.temporal_patch_size,
                                  spatial_merge_size=cfg.spatial_merge_size, hidden_act=cfg.hidden_act)
    ref_cfg._attn_implementation = attn_impl
    ref = Qwen2VisionTransformerPretrainedModel(ref_cfg).eval()
    perturb_(ref, seed=1, scale=0.02)
    ref = ref.to(device=device, dtype=dtype)
    ours = VisionTransformer(cfg).eval()
    ours.load_state_dict({k: v.float() for k, v in ref.state_dict().items()})
    return ref, ours.to(device=device, dtype=dtype)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default=None, help="default: fp32 on cpu, bf16 on cuda")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--depth", type=int, default=2)
    ap.add_argument("--width", type=int, default=1280)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=3584, help="merger output width (LLM hidden; 7B: 3584)")
    ap.add_argument("--segments", type=int, default=8)
    ap.add_argument("--tubes", type=int, default=8, help="temporal slices per segment")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--no-reference", action="store_true", help="time only ours")
    ap.add_argument("--quick", action="store_true", help="tiny smoke run (seconds)")
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device visible")
    dtype = DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    shapes, gemm_n = TUBE_SHAPES, (8192 if device.type == "cuda" else 4096)
    if args.quick:
        args.depth, args.width, args.heads, args.hidden = 1, 256, 4, 512
        args.segments, args.tubes, args.reps = 5, 2, 2
        shapes, gemm_n = [(h // 2 + h // 2 % 2, w // 2 + w // 2 % 2) for h, w in TUBE_SHAPES], 1024

    cfg = VisionConfig(depth=args.depth, embed_dim=args.width, num_heads=args.heads, hidden_size=args.hidden)
    use_flash = device.type == "cuda" and flash_attn_varlen_func is not None and dtype != torch.float32
    attn_impl = "flash_attention_2" if use_flash else "sdpa"
    peak_before, peak_cpu_before = gemm_peak_gflops(dtype, device, gemm_n)
    ref, ours = build_towers(cfg, dtype, device, attn_impl)
    pixels, grid = mixed_batch(args.segments, args.tubes, shapes, cfg.patch_dim)
    n_patches = pixels.shape[0]
    pixels_dev, grid_dev = pixels.to(device), grid.to(device)

    towers = {"ours": lambda: ours(pixels_dev, grid_dev)}
    if not args.no_reference:
        towers["reference"] = lambda: ref(pixels_dev.to(dtype), grid_dev)
    rss_before = current_rss_mb()
    outputs, seconds, rss_peak, gpu_peak = {}, {name: [] for name in towers}, {}, {}
    with torch.inference_mode():
        for rep in range(args.reps + 1):             # rep 0 warms up; towers alternate so load noise hits both
            for name, fn in towers.items():
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                with RssPeak() as rss:
                    if rep == 0:
                        outputs[name] = fn()
                    else:
                        seconds[name].append(time_once(fn, device))
                rss_peak[name] = max(rss_peak.get(name, 0.0), rss.peak_mb)
                if device.type == "cuda":
                    gpu_peak[name] = max(gpu_peak.get(name, 0.0), torch.cuda.max_memory_allocated(device) / 2**20)
    peak_after, peak_cpu_after = gemm_peak_gflops(dtype, device, gemm_n)
    peak = max(peak_before, peak_after)      # the conservative denominator on a shared machine
    peak_cpu = max(peak_cpu_before, peak_cpu_after)

    flops = flops_per_patch(cfg, grid)

    def tower_report(name: str) -> dict:
        walls = [r.wall_s for r in seconds[name]]
        t, best = statistics.median(walls), min(walls)
        cpu_per_thread = statistics.median(r.cpu_s for r in seconds[name]) / torch.get_num_threads()
        achieved = flops["total"] * n_patches / t / 1e9
        report = {"seconds_median": round(t, 4), "seconds_best": round(best, 4),
                  "patches_per_s": round(n_patches / t, 1), "patches_per_s_best": round(n_patches / best, 1),
                  "achieved_gflops": round(achieved, 1), "fraction_of_gemm_peak": round(achieved / peak, 3),
                  "fraction_of_gemm_peak_best": round(flops["total"] * n_patches / best / 1e9 / peak, 3),
                  "peak_rss_mb": round(rss_peak[name], 1)}
        if device.type == "cpu":      # same ratio by CPU time per thread: robust to other processes on the cores
            report["fraction_of_gemm_peak_cpu_time"] = round(
                flops["total"] * n_patches / cpu_per_thread / 1e9 / peak_cpu, 3)
        if device.type == "cuda":
            report["mfu_vs_h100_bf16_dense"] = round(achieved / (H100_BF16_DENSE_TFLOPS * 1e3), 4)
            report["max_gpu_mem_mb"] = round(gpu_peak[name], 1)
        return report

    result = {
        "device": device.type, "dtype": str(dtype).removeprefix("torch."), "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
        "load_avg_1m": os.getloadavg()[0],
        "config": {"depth": cfg.depth, "width": cfg.embed_dim, "heads": cfg.num_heads, "hidden": cfg.hidden_size},
        "batch": {"patches": n_patches, "items": len(grid), "slices": int(grid[:, 0].sum()),
                  "tube_shapes": sorted({f"{h}x{w}" for _, h, w in grid.tolist()})},
        "gemm_peak_gflops": round(peak, 1), "gemm_peak_gflops_before_after": [round(peak_before, 1), round(peak_after, 1)],
        "gemm_peak_gflops_cpu_time": round(peak_cpu, 1),
        "flops_per_patch_mflop": {k: round(v / 1e6, 3) for k, v in flops.items()},
        "rss_mb_before_runs": round(rss_before, 1),
        "ours": {**tower_report("ours"),
                 "attention": "flash_attn_varlen" if use_flash else "sdpa, equal-length slices batched"},
    }
    if "reference" in towers:
        result["reference"] = {"impl": f"transformers {transformers_version()} "
                                       f"Qwen2VisionTransformerPretrainedModel ({attn_impl})",
                               **tower_report("reference")}
        result["speedup_vs_reference"] = round(statistics.median(r.wall_s for r in seconds["reference"]) /
                                               statistics.median(r.wall_s for r in seconds["ours"]), 3)
        if device.type == "cpu":
            result["speedup_vs_reference_cpu_time"] = round(statistics.median(r.cpu_s for r in seconds["reference"]) /
                                                            statistics.median(r.cpu_s for r in seconds["ours"]), 3)
        result["max_abs_diff"] = float((outputs["ours"].float() - outputs["reference"].float()).abs().max())
        result["max_abs_output"] = float(outputs["reference"].float().abs().max())
    print(json.dumps(result, indent=1))
    return result


def transformers_version() -> str:
    import transformers
    return transformers.__version__


if __name__ == "__main__":
    main()
