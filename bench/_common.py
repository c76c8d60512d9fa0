"""Small helpers shared by the benchmark scripts: timing, GEMM peak, memory."""
from __future__ import annotations

import os
import statistics
import sys
import threading
import time
from dataclasses import dataclass
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


@dataclass
class Timing:
    wall_s: float
    cpu_s: float      # CPU time of all this process's threads: on a shared machine, less hurt by other load


def time_once(fn, device: torch.device) -> Timing:
    synchronize(device)
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    synchronize(device)
    return Timing(time.perf_counter() - wall, time.process_time() - cpu)


def gemm_peak_gflops(dtype: torch.dtype, device: torch.device, n: int, reps: int = 5) -> tuple[float, float]:
    """Throughput of one large square matmul in this process, threads and dtype: the practical peak.

    Returns (GFLOP/s by wall clock, GFLOP/s by CPU time per thread), both from the median run.
    """
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    for _ in range(2):
        time_once(lambda: torch.mm(a, b), device)
    runs = [time_once(lambda: torch.mm(a, b), device) for _ in range(reps)]
    flop = 2 * n**3
    wall = statistics.median(r.wall_s for r in runs)
    cpu_per_thread = statistics.median(r.cpu_s for r in runs) / torch.get_num_threads()
    return flop / wall / 1e9, flop / cpu_per_thread / 1e9


@torch.no_grad()
def perturb_(module: torch.nn.Module, seed: int, scale: float) -> None:
    """Add N(0, scale^2) noise to every parameter: reference inits zero biases and set norms to one, hiding bugs."""
    gen = torch.Generator().manual_seed(seed)
    for p in module.parameters():
        p.add_((torch.randn(p.shape, generator=gen) * scale).to(p.dtype).to(p.device))


def current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class RssPeak:
    """Highest RSS seen while the block runs (polled every few ms; ru_maxrss cannot be reset per phase)."""

    def __init__(self, interval_s: float = 0.002):
        self.interval_s, self.peak_mb, self.start_mb = interval_s, 0.0, 0.0
        self._stop = threading.Event()

    def _poll(self) -> None:
        while not self._stop.is_set():
            self.peak_mb = max(self.peak_mb, current_rss_mb())
            self._stop.wait(self.interval_s)

    def __enter__(self) -> "RssPeak":
        self.start_mb = self.peak_mb = current_rss_mb()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_mb = max(self.peak_mb, current_rss_mb())
