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
