"""Forward and forward+backward tokens/s: nanoseek against transformers' DeepseekV3, same weights and inputs.

    python benchmarks/model_speed.py                      # tiny and small, fp32 and bf16 autocast
    python benchmarks/model_speed.py --presets small --batch 8 --seq 256

Both models are loaded from one model dir written by nanoseek and run the same inputs through
each library's own path: `model(x)` for the forward; for forward+backward the training loss
(`model.loss` with MTP off, since transformers has no MTP training, against
`DeepseekV3ForCausalLM(input_ids, labels=...)`) and its backward. Runs alternate between the two so drift hits both alike. The
achieved FLOP/s are given as a share of this CPU's matmul peak, measured in the same run.
Needs the `dev` extra (transformers).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile
import time

import torch

from nanoseek import Transformer, load_model, preset, save_model
from nanoseek.cost import estimate
from nanoseek.perf import host_line, host_peaks


def step_fn(kind: str, model, x, hf: bool):
    """One call of each library's own path: logits for fwd, the training loss and its backward."""
    targets = torch.cat((x[:, 1:], torch.full_like(x[:, :1], -100)), 1)  # next tokens
    if kind == "fwd":
        def run():
            with torch.no_grad():
                model(x)
    elif hf:
        def run():
            model(input_ids=x, labels=x).loss.backward()  # transformers shifts labels itself
            model.zero_grad(set_to_none=True)
    else:
        def run():
            model.loss(x, targets, mtp_weight=0.0).loss.backward()  # MTP off: transformers has none
            model.zero_grad(set_to_none=True)
    return run


def time_pair(fns: dict, autocast: bool, repeats: int, min_seconds: float) -> dict[str, float]:
    """Median seconds per call for each function, interleaving them round by round."""
    ctx = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if autocast else contextlib.nullcontext
    times: dict[str, list[float]] = {k: [] for k in fns}
    with ctx():
        for fn in fns.values():  # warm-up
            fn()
            fn()
        start = time.perf_counter()
        while len(times[next(iter(fns))]) < repeats or time.perf_counter() - start < min_seconds:
            for name, fn in fns.items():
                t = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t)
            if len(times[next(iter(fns))]) >= 50:
                break
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=["tiny", "small"], help="model presets to compare")
    ap.add_argument("--batch", type=int, default=8, help="sequences per step (default 8)")
    ap.add_argument("--seq", type=int, default=256, help="tokens per sequence (default 256)")
    ap.add_argument("--repeats", type=int, default=5, help="minimum timed calls per case (default 5)")
    ap.add_argument("--min-seconds", type=float, default=3.0, help="minimum time per case (default 3)")
    args = ap.parse_args()

    import transformers
    transformers.logging.set_verbosity_error()

    torch.manual_seed(0)
    peak = host_peaks()
    print(f"{host_line(peak)}; transformers {transformers.__version__}\n")
    header = ("| model | pass | precision | nanoseek tok/s | transformers tok/s | ratio | "
              "nanoseek GFLOP/s (% of peak) |")
    print(header)
    print("|" + "---|" * 7)
    for name in args.presets:
        cfg = preset(name)
        model = Transformer(cfg)
        with tempfile.TemporaryDirectory() as d:
            save_model(model, d)
            ours = load_model(d).train()
            theirs = transformers.DeepseekV3ForCausalLM.from_pretrained(d, dtype=torch.float32).train()
        x = torch.randint(0, cfg.vocab_size, (args.batch, args.seq))
        tokens = args.batch * args.seq
        flops = estimate(cfg.replace(num_nextn_predict_layers=0), seq_len=args.seq)
        for kind in ("fwd", "fwd+bwd"):
            for precision in ("fp32", "bf16"):
                fns = {"ours": step_fn(kind, ours, x, hf=False), "hf": step_fn(kind, theirs, x, hf=True)}
                t = time_pair(fns, precision == "bf16", args.repeats, args.min_seconds)
                per_token = flops.flops_per_token_forward if kind == "fwd" else flops.flops_per_token_train
                achieved = per_token * tokens / t["ours"]
                print(f"| {name} | {kind} | {precision if precision == 'fp32' else 'bf16 autocast'} | "
                      f"{tokens / t['ours']:,.0f} | {tokens / t['hf']:,.0f} | {t['hf'] / t['ours']:.2f}x | "
                      f"{achieved / 1e9:.1f} ({achieved / peak[precision]:.0%}) |", flush=True)


if __name__ == "__main__":
    main()
