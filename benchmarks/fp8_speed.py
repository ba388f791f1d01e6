"""FP8 GEMMs (train/fp8.py): the real scaled GEMM against the exact simulation, and its speed against bf16.

    python benchmarks/fp8_speed.py                     # on a Hopper GPU: check and time; elsewhere: time the simulation
    python benchmarks/fp8_speed.py --out gpu/fp8.json

For each shape (M tokens, K in, N out; DeepSeek-V3's expert and attention shapes, and `small`'s) and each
of a linear layer's three GEMMs (forward: 1x128 tiles x 128x128 blocks; dgrad: the same with W
transposed; wgrad: tiles of 128 tokens on both sides):

- on a GPU with FP8 GEMMs (sm_90): whether torch's blockwise `_scaled_mm` takes the shape, and the
  largest difference between its output and the simulation's, relative to the output's largest
  magnitude (its bf16 output alone rounds at 2^-9 = 0.2%); then TFLOP/s of the bf16 GEMM, the FP8 GEMM
  on operands already quantised, and the FP8 GEMM with its quantisation, in alternating rounds;
- on the CPU: the simulation's time against the fp32 GEMM's (the simulation is slower by design).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from nanoseek.train import fp8

SHAPES = {  # name: (M, K, N)
    "V3 expert up (7168 -> 2x2048)": (4096, 7168, 4096),
    "V3 expert down (2048 -> 7168)": (4096, 2048, 7168),
    "V3 q_b (1536 -> 128 heads x 192)": (4096, 1536, 24576),
    "small expert up (256 -> 2x128)": (2048, 256, 256),
}


def gemm_operands(M: int, K: int, N: int, device) -> dict[str, tuple]:
    """The three GEMMs of a linear layer (in, out) = (K, N) over M tokens, as matmul_nt operands."""
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(M, K, generator=g).to(device)
    x[::97, ::31] *= 20  # some outliers, as activations have
    w = (torch.randn(N, K, generator=g) * K ** -0.5).to(device)
    dy = (torch.randn(M, N, generator=g) * 1e-3).to(device)
    return {"forward": (x, w, "tile", "block"), "dgrad": (dy, w.T, "tile", "block"),
            "wgrad": (dy.T, x.T, "tile", "tile")}


def timed(fns: dict, device, rounds: int) -> dict[str, float]:
    """Median seconds per call of each function, alternating them round by round."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = {k: [] for k in fns}
    for fn in fns.values():
        fn()
        fn()
    for _ in range(rounds):
        for k, fn in fns.items():
            sync()
            t = time.perf_counter()
            fn()
            sync()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def prequantised(a, b, ka, kb):
    """The real GEMM alone: operands quantised once, in the layouts `_scaled_mm` takes (fp8._scaled_mm)."""
    qa, sa = fp8.quantize(a, *fp8.groups("fine", a.shape, ka))
    qb, sb = fp8.quantize(b, *fp8.groups("fine", b.shape, kb))
    sa = sa.t().contiguous().t() if ka == "tile" else sa.contiguous()
    sb = sb.t().contiguous().t() if kb == "tile" else sb.contiguous()
    qa, qb = qa.contiguous(), qb.contiguous()
    return lambda: torch._scaled_mm(qa, qb.t(), sa, sb.t(), out_dtype=torch.bfloat16)


def run(device: torch.device, shapes: dict, rounds: int) -> list[dict]:
    real = fp8.has_fp8_gemm(device)
    sim = fp8.Recipe("fine", "simulate")
    rows = []
    for name, (M, K, N) in shapes.items():
        for gemm, (a, b, ka, kb) in gemm_operands(M, K, N, device).items():
            flops = 2 * a.shape[0] * a.shape[1] * b.shape[0]
            row = {"shape": name, "gemm": gemm, "m_k_n": [a.shape[0], a.shape[1], b.shape[0]]}
            want = fp8.matmul_nt(a, b, ka, kb, sim)
            if real:
                got = fp8._scaled_mm(a, ka, b, kb)
                row["kernel_takes_it"] = got is not None
                if got is not None:
                    row["max_rel_diff_vs_simulation"] = ((got.float() - want).abs().max() / want.abs().max()).item()
                    a16, b16 = a.bfloat16(), b.bfloat16().T.contiguous()
                    t = timed({"bf16": lambda: a16 @ b16, "fp8": prequantised(a, b, ka, kb),
                               "fp8+quantise": lambda: fp8._scaled_mm(a, ka, b, kb)}, device, rounds)
                    row.update({f"{k}_tflops": flops / v / 1e12 for k, v in t.items()})
                    row["fp8_over_bf16"] = t["bf16"] / t["fp8"]
                    row["fp8_quantise_over_bf16"] = t["bf16"] / t["fp8+quantise"]
            else:
                bt = b.T.contiguous()
                t = timed({"fp32": lambda: a @ bt, "simulated fp8": lambda: fp8.matmul_nt(a, b, ka, kb, sim)},
                          device, rounds)
                row.update({"fp32_gflops": flops / t["fp32"] / 1e9, "simulated_gflops": flops / t["simulated fp8"] / 1e9,
                            "simulated_over_fp32": t["fp32"] / t["simulated fp8"]})
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda or cpu")
    p.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=None,
                   help="shapes to run (default: all on a GPU, small's alone on the CPU)")
    p.add_argument("--rounds", type=int, default=10, help="timed rounds per GEMM (default 10)")
    p.add_argument("--out", metavar="JSON", help="also write the rows here")
    a = p.parse_args(argv)
    device = torch.device(a.device)
    names = a.shapes or (list(SHAPES) if device.type == "cuda" else [n for n in SHAPES if n.startswith("small")])
    info = {"torch": torch.__version__, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "fp8_gemm": fp8.has_fp8_gemm(device)}
    print(json.dumps(info), flush=True)
    rows = run(device, {n: SHAPES[n] for n in names}, a.rounds)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps({**info, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
