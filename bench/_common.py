"""Small helpers shared by the benchmark scripts: timing, GEMM peak, memory."""
from __future__ import annotations

import resource
import statistics
import sys
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def ensure_repo_on_path() -> None:
    """Scripts run as `python bench/x.py` see bench/ on sys.path, not the repository root."""
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_once(fn, device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def median_seconds(fn, device: torch.device, reps: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        time_once(fn, device)
    return statistics.median(time_once(fn, device) for _ in range(reps))


def gemm_peak_gflops(dtype: torch.dtype, device: torch.device, n: int, reps: int = 5) -> float:
    """Throughput of one large square matmul in this process, threads and dtype: the practical peak."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    seconds = median_seconds(lambda: torch.mm(a, b), device, reps=reps, warmup=2)
    return 2 * n**3 / seconds / 1e9


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@torch.no_grad()
def perturb_(module: torch.nn.Module, seed: int, scale: float) -> None:
    """Add N(0, scale^2) noise to every parameter: reference inits zero biases and set norms to one, hiding bugs."""
    gen = torch.Generator().manual_seed(seed)
    for p in module.parameters():
        p.add_((torch.randn(p.shape, generator=gen) * scale).to(p.dtype).to(p.device))
