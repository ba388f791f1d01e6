"""Which precision a training run computes in: fp32, bf16 autocast or FP8 linears; `auto` measures.

`--precision auto` cannot go by CPU flags alone: on a host with AVX512-BF16 a 1024-cube bf16 matmul
is several times fp32's, yet a small MoE model's many small GEMMs, plus autocast's casts, can make
bf16 training slower than fp32 (docs/log.md). So `auto` times a few forward+backward passes of the
run's own model at its own batch shape in both precisions and keeps the faster one; bf16 must win
by `MARGIN` to be taken, since fp32 is the more exact of the two. GPUs with bf16 take it unmeasured.
A resumed run keeps the precision it started with, so its steps stay bit-exact. `fp8` is asked for,
never picked: the linear layers' GEMMs in FP8 (fp8.py) and the rest as V3 keeps it, bf16 on a GPU
and fp32 on the CPU, where FP8 is simulated.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch

from ..perf import cpu_flag_set

MARGIN = 1.1  # bf16 must be this much faster than fp32 to be chosen
NAMES = {None: "fp32", torch.bfloat16: "bf16"}


@dataclass
class Choice:
    dtype: torch.dtype | None  # the autocast dtype; None: plain fp32
    reason: str
    rates: dict[str, float] | None = None  # tokens/s of forward+backward, where measured
    fp8: bool = False  # the linear layers' GEMMs in FP8

    @property
    def name(self) -> str:
        return "fp8" if self.fp8 else NAMES[self.dtype]


def cpu_has_bf16() -> bool:
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flag_set())


def measure(model, device: torch.device, batch_size: int, seq_len: int, mtp_weight: float = 0.3,
            balance_weight: float = 1e-4, rounds: int = 3) -> dict[str, float]:
    """Tokens/s of forward+backward of `model` on random tokens of shape (batch_size, seq_len), in
    fp32 and in bf16 autocast, alternated; the median of `rounds` timed passes each after two warm-up passes.
    Leaves the model's weights, gradients and the global RNG as they were."""
    gen = torch.Generator().manual_seed(0)
    grads = [p.grad for p in model.parameters()]
    was_training = model.training
    model.train()

    def one(dtype: torch.dtype | None) -> float:
        for p in model.parameters():
            p.grad = None
        # fresh tokens each pass: the experts' batch sizes then change as in training, and a backend
        # that compiles a kernel per GEMM shape (oneDNN's bf16) pays for it here as it would there
        x = torch.randint(model.cfg.vocab_size, (batch_size, seq_len), generator=gen).to(device)
        y = torch.roll(x, -1, dims=1)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            out = model.loss(x, y, mtp_weight, balance_weight)
        out.loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t

    times = {"fp32": [], "bf16": []}
    try:
        for _ in range(2):  # warm-up: a cold process's first passes are slow in either precision
            one(None), one(torch.bfloat16)
        for _ in range(rounds):
            times["fp32"].append(one(None))
            times["bf16"].append(one(torch.bfloat16))
    finally:
        for p, g in zip(model.parameters(), grads):
            p.grad = g
        model.train(was_training)
    return {k: batch_size * seq_len / statistics.median(v) for k, v in times.items()}


def decide(rates: dict[str, float], shape: str) -> Choice:
    """bf16 where measured at least MARGIN times fp32's rate, else fp32; the reason names both rates."""
    fp32, bf16 = rates["fp32"], rates["bf16"]
    dtype = torch.bfloat16 if bf16 >= MARGIN * fp32 else None
    why = (f"forward+backward at {shape}: fp32 {fp32:,.0f} tok/s, bf16 autocast {bf16:,.0f} tok/s "
           f"({bf16 / fp32:.2f}x; bf16 is taken from {MARGIN:.2f}x)")
    return Choice(dtype, why, rates)


def choose(requested: str, device: torch.device, rates_fn, shape: str = "the run's batch shape",
           resumed: str | None = None) -> Choice:
    """The precision for a run. `rates_fn()` measures (see `measure`); it is called only for 'auto'
    on a CPU that has bf16 instructions. `resumed`: the precision a resumed run started with."""
    if requested == "fp32":
        return Choice(None, "--precision fp32")
    if requested == "bf16":
        return Choice(torch.bfloat16, "--precision bf16")
    if requested == "fp8":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return Choice(torch.bfloat16, "--precision fp8: FP8 linear layers, bf16 elsewhere", fp8=True)
        return Choice(None, "--precision fp8: FP8 linear layers (simulated off Hopper GPUs), fp32 elsewhere",
                      fp8=True)
    if requested != "auto":
        raise ValueError(f"precision must be auto, fp32, bf16 or fp8 (got {requested!r})")
    if resumed is not None:
        return Choice(torch.bfloat16 if resumed == "bf16" else None, "the precision this run started with")
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return Choice(torch.bfloat16, "this GPU supports bf16")
        return Choice(None, "this GPU has no bf16")
    if device.type != "cpu":
        return Choice(None, f"no bf16 measurement for {device.type} devices")
    if not (torch.backends.mkldnn.is_available() and cpu_has_bf16()):
        return Choice(None, "this CPU has no avx512_bf16 or amx_bf16 instructions")
    return decide(rates_fn(), shape)
