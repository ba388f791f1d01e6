"""Where a training step's time goes, and what bf16 could buy at the model's own GEMM shapes.

    python benchmarks/train_profile.py                      # small, fp32 and bf16 autocast
    python benchmarks/train_profile.py --preset tiny --steps 3

One full step of nanoseek's Trainer (forward with MTP, backward, clip, AdamW), as the speedrun's
pretraining runs it, under torch.profiler for each precision. Prints, per precision:

- the step's time split into GEMMs (aten::mm, addmm, bmm), attention, and everything else;
- the GEMM shapes that take the most time, with the rate each achieved inside the step, and the
  rate the same shape reaches alone in fp32 and in bf16 (best of a few calls), so the table says
  whether a shape is slow in the step or slow on this CPU;
- the other operators that take the most time of their own;
- "bf16 GEMMs at their standalone rate": the step time if every GEMM ran at its measured bf16
  rate and nothing else changed, the ceiling of a bf16 path that only speeds GEMMs up.

The host's fp32 and bf16 matmul peaks (1024-cube) and its avx2 / avx512_bf16 flags head the output.
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from nanoseek import Transformer, preset
from nanoseek.perf import host_line, host_peaks
from nanoseek.train.common import LossConfig, OptimConfig, Trainer, build_optimizer
from nanoseek.train.dist import World

GEMMS = ("aten::mm", "aten::addmm", "aten::bmm")
ATTENTION = "aten::_scaled_dot_product_flash_attention_for_cpu"


def gemm_shape(name: str, shapes: list) -> tuple[int, int, int, int] | None:
    """(batch, M, N, K) of a profiled GEMM from its input shapes; None where they do not parse."""
    try:
        if name == "aten::mm":
            (m, k), (_, n) = shapes[0], shapes[1]
            return 1, m, n, k
        if name == "aten::addmm":
            (m, k), (_, n) = shapes[1], shapes[2]
            return 1, m, n, k
        if name == "aten::bmm":
            (b, m, k), (_, _, n) = shapes[0], shapes[1]
            return b, m, n, k
    except (ValueError, IndexError, TypeError):
        return None
    return None


def standalone_rate(b: int, m: int, n: int, k: int, dtype: torch.dtype, seconds: float = 0.05) -> float:
    """Best FLOP/s of one (b, m, k) @ (b, k, n) product alone, in `dtype`."""
    x = torch.randn(b, m, k, dtype=dtype).squeeze(0)
    w = torch.randn(b, k, n, dtype=dtype).squeeze(0)
    f = torch.bmm if b > 1 else torch.mm
    for _ in range(3):
        f(x, w)
    best, end = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < end:
        t = time.perf_counter()
        f(x, w)
        best = min(best, time.perf_counter() - t)
    return 2 * b * m * n * k / best


def profile_step(name: str, precision: str, batch: int, seq: int, steps: int, top: int) -> None:
    cfg = preset(name)
    torch.manual_seed(0)
    model = Transformer(cfg)
    oc = OptimConfig(warmup=1, lr=1e-4)
    trainer = Trainer(model, build_optimizer(model, oc), oc, LossConfig(), 10**6, World(), precision)
    gen = torch.Generator().manual_seed(0)

    def batch_():
        x = torch.randint(0, cfg.vocab_size, (batch, seq), generator=gen)
        return [(x, torch.roll(x, -1, 1))]

    for _ in range(2):
        trainer.step(batch_())
    batches = [batch_() for _ in range(steps)]
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        t = time.perf_counter()
        for b in batches:
            trainer.step(b)
        wall = (time.perf_counter() - t) / steps

    gemm_time, attn_time = 0.0, 0.0
    by_shape: dict[tuple, list[float]] = defaultdict(lambda: [0.0, 0])
    for ev in prof.events():
        if ev.name in GEMMS:
            us = ev.cpu_time_total  # includes the BLAS / oneDNN call beneath it
            gemm_time += us
            shape = gemm_shape(ev.name, ev.input_shapes)
            if shape:
                by_shape[shape][0] += us
                by_shape[shape][1] += 1
        elif ev.name.startswith(ATTENTION):  # the fused kernel, forward and backward; no GEMM events inside
            attn_time += ev.cpu_time_total
    gemm_s, attn_s = gemm_time / 1e6 / steps, attn_time / 1e6 / steps
    label = precision if precision == "fp32" else "bf16 autocast"
    print(f"\n### {name}, {label}: {batch * seq / wall:,.0f} tok/s, {wall * 1e3:.0f} ms per step\n")
    print(f"GEMMs {gemm_s * 1e3:.0f} ms ({gemm_s / wall:.0%}), attention {attn_s * 1e3:.0f} ms ({attn_s / wall:.0%}), "
          f"the rest {max(0.0, wall - gemm_s - attn_s) * 1e3:.0f} ms ({max(0.0, 1 - (gemm_s + attn_s) / wall):.0%})\n")
    dtype = torch.float32 if precision == "fp32" else torch.bfloat16
    print("| b x M x N x K | calls per step | ms per step | GFLOP/s in the step | fp32 alone | bf16 alone |")
    print("|---|---|---|---|---|---|")
    ceiling = wall - gemm_s
    rows = sorted(by_shape.items(), key=lambda kv: -kv[1][0])
    for i, ((b, m, n, k), (us, calls)) in enumerate(rows):
        flops = 2 * b * m * n * k * calls / steps
        in_step = flops / (us / 1e6 / steps)
        alone = {dt: standalone_rate(b, m, n, k, dt) for dt in (torch.float32, torch.bfloat16)}
        ceiling += flops / max(alone[torch.bfloat16], in_step if dtype == torch.bfloat16 else 0.0)
        if i < top:
            print(f"| {b} x {m} x {n} x {k} | {calls / steps:.0f} | {us / 1e3 / steps:.1f} | {in_step / 1e9:.0f} | "
                  f"{alone[torch.float32] / 1e9:.0f} | {alone[torch.bfloat16] / 1e9:.0f} |")
    others = sorted((ev for ev in prof.key_averages() if ev.key not in GEMMS and not ev.key.startswith(ATTENTION)),
                    key=lambda ev: -ev.self_cpu_time_total)[:top]
    print("\nOther operators by their own time (not counting operators they call): " + ", ".join(
        f"{ev.key} {ev.self_cpu_time_total / 1e3 / steps:.0f} ms ({ev.count // steps})" for ev in others))
    print(f"\n{len(rows)} GEMM shapes; bf16 GEMMs at their standalone rate (nothing else changed): "
          f"{ceiling * 1e3:.0f} ms per step, {batch * seq / ceiling:,.0f} tok/s ({wall / ceiling:.2f}x this row)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small", help="model preset (default small, the speedrun's)")
    ap.add_argument("--batch", type=int, default=8, help="sequences per step (default 8, as the speedrun)")
    ap.add_argument("--seq", type=int, default=256, help="tokens per sequence (default 256)")
    ap.add_argument("--steps", type=int, default=3, help="profiled steps per precision (default 3)")
    ap.add_argument("--top", type=int, default=12, help="GEMM shapes listed (default 12)")
    ap.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"],
                    help="precisions to profile (default both; bf16 is autocast)")
    a = ap.parse_args()
    print(f"{host_line(host_peaks())}; batch {a.batch} x {a.seq}")
    for precision in a.precisions:
        profile_step(a.preset, precision, a.batch, a.seq, a.steps, a.top)


if __name__ == "__main__":
    main()
