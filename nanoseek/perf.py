"""This machine's measured matmul peak, for MFU and for benchmarks' share-of-peak figures."""

from __future__ import annotations

import time

import torch


def matmul_peak(dtype: torch.dtype = torch.float32, n: int = 1024, seconds: float = 0.5,
                device: str | torch.device = "cpu") -> float:
    """Best FLOP/s of an n x n x n matmul over `seconds`."""
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    for _ in range(3):
        a @ b
    best, end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        if a.is_cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        a @ b
        if a.is_cuda:
            torch.cuda.synchronize()
        best = max(best, 2 * n**3 / (time.perf_counter() - t))
    return best


MATMUL_FLAGS = ("avx2", "avx512_bf16", "amx_bf16")


def cpu_flag_set() -> set[str]:
    """Which of MATMUL_FLAGS /proc/cpuinfo lists (empty where it cannot be read)."""
    try:
        with open("/proc/cpuinfo") as f:
            return set(f.read().split()) & set(MATMUL_FLAGS)
    except OSError:
        return set()


def cpu_flags() -> str:
    """MATMUL_FLAGS this CPU has, for a benchmark's header."""
    flags = cpu_flag_set()
    return " ".join(f for f in MATMUL_FLAGS if f in flags) or "none of " + "/".join(MATMUL_FLAGS)


def host_peaks(seconds: float = 1.0) -> dict[str, float]:
    """This CPU's fp32 and bf16 matmul peaks (FLOP/s), keyed "fp32" and "bf16"."""
    return {"fp32": matmul_peak(torch.float32, seconds=seconds), "bf16": matmul_peak(torch.bfloat16, seconds=seconds)}


def host_line(peaks: dict[str, float]) -> str:
    """One line for a benchmark's header: torch, threads, CPU flags and the fp32 and bf16 matmul peaks."""
    return (f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU flags: {cpu_flags()}; "
            f"matmul peak (1024-cube) fp32 {peaks['fp32'] / 1e9:,.0f}, bf16 {peaks['bf16'] / 1e9:,.0f} GFLOP/s")
