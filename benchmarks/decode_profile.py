"""Where a batched decode step spends its time: the share in GEMMs and the rate each GEMM shape reaches.

    python benchmarks/decode_profile.py                        # medium, batch 16, compiled
    python benchmarks/decode_profile.py --preset small --eager

The engine decodes --batch random prompts of --prompt tokens; after a warm-up (the compile, when
compiled) and 8 steps, 10 steps are timed and 10 more profiled. The compiled graph is built with
inductor's Python wrapper and a profiler event per generated kernel (the engine itself uses the C++
wrapper, whose kernels the profiler cannot see), so its extern GEMMs show as aten::mm / aten::bmm.
The header gives the host's matmul peaks and its memory read rate, the two ceilings a step meets.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from nanoseek import Transformer, load_model, preset, save_model
from nanoseek.engine.engine import Engine
from nanoseek.engine.sampling import SamplingParams
from nanoseek.perf import host_line, host_peaks
from nanoseek.tokenizer import Tokenizer

GEMMS = {"aten::mm": lambda a, b: 2 * a[0] * a[1] * b[1], "aten::bmm": lambda a, b: 2 * a[0] * a[1] * a[2] * b[2]}


def read_rate(mb: int = 400) -> float:
    """GB/s of summing a tensor far larger than the caches (median of 5)."""
    a = torch.randn(mb * 2**20 // 4)
    times = []
    for _ in range(5):
        t = time.perf_counter()
        a.sum()
        times.append(time.perf_counter() - t)
    return a.numel() * 4 / statistics.median(times) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="medium", help="model shape (default medium)")
    ap.add_argument("--batch", type=int, default=16, help="sequences decoded together (default 16)")
    ap.add_argument("--prompt", type=int, default=128, help="prompt tokens per sequence (default 128)")
    ap.add_argument("--eager", action="store_true", help="profile the eager decode step instead of the compiled one")
    ap.add_argument("--rows", type=int, default=12, help="GEMM shapes to list (default 12)")
    args = ap.parse_args()

    if not args.eager:
        import torch._inductor.config as inductor
        inductor.cpp.enable_kernel_profile = True
        compile_ = torch.compile

        def python_wrapper(fn, **kw):  # the engine asks for the C++ wrapper; the profile needs the Python one
            return compile_(fn, **{**kw, "options": {"cpp_wrapper": False}})
        torch.compile = python_wrapper
    print(f"{host_line(host_peaks())}; memory read rate {read_rate():.1f} GB/s")
    cfg = preset(args.preset)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as d:
        save_model(Transformer(cfg), d)
        model = load_model(d)
    steps = 8 + 10 + 10
    engine = Engine(model, Tokenizer.byte_level(), max_running=args.batch, compile=not args.eager,
                    num_blocks=args.batch * -(-(args.prompt + steps + 4) // 16))
    t = time.perf_counter()
    if not args.eager:
        engine.warm_up()
        print(f"compiled in {time.perf_counter() - t:.0f} s")
    gen = torch.Generator().manual_seed(0)
    for row in torch.randint(0, cfg.vocab_size, (args.batch, args.prompt), generator=gen).tolist():
        engine.add(row, SamplingParams(temperature=0, max_tokens=steps + 2, ignore_eos=True))
    from torch.profiler import ProfilerActivity, profile
    with torch.inference_mode():
        for _ in range(9):  # the prefill, then 8 decode steps
            engine.step()
        times = []
        for _ in range(10):
            t = time.perf_counter()
            engine.step()
            times.append(time.perf_counter() - t)
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            for _ in range(10):
                engine.step()
    step = statistics.median(times)
    print(f"{args.preset}, batch {args.batch}, {'eager' if args.eager else 'compiled'}: a decode step takes "
          f"{step * 1e3:.1f} ms ({args.batch / step:,.0f} tok/s)\n")
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    print(events.table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=60))
    gemms = [e for e in prof.key_averages(group_by_input_shape=True) if e.key in GEMMS]
    print("| op | shapes | ms per step | calls per step | GFLOP/s |\n|---|---|---|---|---|")
    for e in sorted(gemms, key=lambda e: -e.self_cpu_time_total)[:args.rows]:
        a, b = e.input_shapes[:2]
        rate = GEMMS[e.key](a, b) * e.count / (e.self_cpu_time_total * 1e-6) / 1e9
        print(f"| {e.key} | {a} x {b} | {e.self_cpu_time_total / 1e4:.2f} | {e.count / 10:g} | {rate:.0f} |")
    share = sum(e.self_cpu_time_total for e in gemms) / total
    print(f"\nGEMMs: {share:.0%} of the profiled time ({total / 1e4:.1f} ms per step under the profiler)")


if __name__ == "__main__":
    main()
