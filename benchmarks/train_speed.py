"""Training speed against transformers, MTP's cost, and what bias balancing does to expert load.

    python benchmarks/train_speed.py                        # tiny and small, then 500 balance steps
    python benchmarks/train_speed.py --balance-steps 100    # quicker

Part 1, same config, optimizer (AdamW, same hyper-parameters) and inputs: one full training step
(forward, backward, optimizer step) of nanoseek's Trainer -- with and without the MTP loss, and
without it under `--compile` (each block's attention and norms through torch.compile; its compile
time, paid in an untimed first step, is printed) -- against transformers' DeepseekV3ForCausalLM(labels=...)
+ torch AdamW (fused, as nanoseek's) in its default eager mode, alternating call by call; fp32 and bf16 autocast. MFU against this CPU's matmul peak for the precision, measured in the
same run (its CPU flags and both peaks head the output). After the table, what `--precision auto` picks at
each preset's shape, with the rates it measured.

Part 2: pretrain `--balance-preset` on a generated, curated corpus for `--balance-steps` steps
twice from the same seed -- bias balancing on (gamma = 0.001) and off (gamma = 0) -- and report
max/mean tokens per expert per MoE layer, averaged over the last 50 steps.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from nanoseek import Transformer, load_model, preset, save_model
from nanoseek.cost import estimate
from nanoseek.perf import host_line, host_peaks
from nanoseek.train.common import LossConfig, OptimConfig, Trainer, build_optimizer
from nanoseek.train.dist import World
from nanoseek.train.precision import choose, measure


def speed(name: str, batch: int, seq: int, rounds: int, peak: dict, auto_picks: list[str],
          compile_s: dict[str, float]) -> None:
    import transformers

    cfg = preset(name)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as d:
        save_model(Transformer(cfg), d)
        ours = {v: load_model(d) for v in ("mtp", "plain", "compiled")}
        theirs = transformers.DeepseekV3ForCausalLM.from_pretrained(d, dtype=torch.float32)
    # fresh tokens every round (the same for every side within it): the experts' row counts then change
    # from step to step as in training, and bf16 pays for the GEMM shapes that are new (docs/training.md)
    gen = torch.Generator().manual_seed(0)
    xs = [torch.randint(0, cfg.vocab_size, (batch, seq), generator=gen) for _ in range(rounds + 1)]
    ys = [torch.cat((x[:, 1:], torch.full_like(x[:, :1], -100)), 1) for x in xs]
    oc = OptimConfig(warmup=1, lr=1e-4)
    flops = estimate(cfg.replace(num_nextn_predict_layers=0), seq_len=seq).flops_per_token_train
    for precision in ("fp32", "bf16"):
        trainers = {v: Trainer(m, build_optimizer(m, oc), oc, LossConfig(mtp_weight=0.3 if v == "mtp" else 0.0),
                               10**6, World(), precision, compile=v == "compiled") for v, m in ours.items()}
        hf_opt = torch.optim.AdamW(theirs.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
        amp = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if precision == "bf16" else contextlib.nullcontext

        def hf_step(x, y):
            theirs.train()
            with amp():
                loss = theirs(input_ids=x, labels=x).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(theirs.parameters(), 1.0)
            hf_opt.step()
            hf_opt.zero_grad(set_to_none=True)

        fns = {"ours+mtp": lambda x, y: trainers["mtp"].step([(x, y)]),
               "ours": lambda x, y: trainers["plain"].step([(x, y)]),
               "compiled": lambda x, y: trainers["compiled"].step([(x, y)]), "hf": hf_step}
        times = {k: [] for k in fns}
        for k, f in fns.items():
            t = time.perf_counter()
            f(xs[0], ys[0])
            if k == "compiled":
                compile_s[f"{name} {precision}"] = time.perf_counter() - t
        for x, y in zip(xs[1:], ys[1:]):
            for k, f in fns.items():
                t = time.perf_counter()
                f(x, y)
                times[k].append(time.perf_counter() - t)
        tok_s = {k: batch * seq / statistics.median(v) for k, v in times.items()}
        mfu = flops * tok_s["ours"] / peak[precision]
        print(f"| {name} | {precision if precision == 'fp32' else 'bf16 autocast'} | {tok_s['ours']:,.0f} | "
              f"{tok_s['ours+mtp']:,.0f} | {tok_s['compiled']:,.0f} | {tok_s['hf']:,.0f} | "
              f"{tok_s['ours'] / tok_s['hf']:.2f}x | {tok_s['compiled'] / tok_s['hf']:.2f}x | {mfu:.0%} |", flush=True)
    cpu = torch.device("cpu")
    auto = choose("auto", cpu, lambda: measure(ours["mtp"], cpu, batch, seq), shape=f"batch {batch} x {seq} tokens")
    auto_picks.append(f"{name}: `--precision auto` picks {auto.name} ({auto.reason})")


def balance(preset_name: str, steps: int, work: Path) -> None:
    from nanoseek.cli import main as cli
    from nanoseek.data.corpus import write_corpus

    write_corpus(work / "raw", 8, seed=0)
    cli(["curate", "--input", str(work / "raw"), "--out", str(work / "data"), "--quiet"])
    cli(["tokenizer", "--input", str(work / "data"), "--vocab-size", "4096", "--out", str(work / "tok"), "--quiet"])
    cli(["tokenize", "--input", str(work / "data"), "--tokenizer", str(work / "tok"), "--out", str(work / "tokens"),
         "--quiet"])
    results = {}
    for label, gamma in (("bias balancing on (gamma 0.001)", "0.001"), ("off (gamma 0)", "0")):
        run = work / f"run-{gamma}"
        t = time.perf_counter()
        cli(["pretrain", "--preset", preset_name, "--data", str(work / "tokens"), "--tokenizer", str(work / "tok"),
             "--out", str(run), "--steps", str(steps), "--save-every", str(steps), "--bias-gamma", gamma,
             "--quiet"])
        rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()][-50:]
        layers = len(rows[-1]["expert_load_max_over_mean"])
        per_layer = [statistics.mean(r["expert_load_max_over_mean"][i] for r in rows) for i in range(layers)]
        results[label] = (per_layer, rows[-1]["lm_loss"], time.perf_counter() - t)
    print(f"\n{preset_name}, {steps} steps; max/mean tokens per expert, mean of the last 50 steps, per MoE layer:\n")
    print("| balancing | max/mean per layer | mean over layers | final lm loss |")
    print("|---|---|---|---|")
    for label, (per_layer, loss, _) in results.items():
        print(f"| {label} | {', '.join(f'{v:.2f}' for v in per_layer)} | {statistics.mean(per_layer):.2f} | "
              f"{loss:.3f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=["tiny", "small"], help="presets for the speed table")
    ap.add_argument("--batch", type=int, default=8, help="sequences per step (default 8)")
    ap.add_argument("--seq", type=int, default=256, help="tokens per sequence (default 256)")
    ap.add_argument("--rounds", type=int, default=8, help="timed steps per variant (default 8)")
    ap.add_argument("--balance-preset", default="small", help="model for the balance runs (default small)")
    ap.add_argument("--balance-steps", type=int, default=500, help="steps per balance run (default 500; 0 skips)")
    args = ap.parse_args()

    import transformers
    transformers.logging.set_verbosity_error()
    peak = host_peaks()
    print(f"{host_line(peak)}; transformers {transformers.__version__}; batch {args.batch} x {args.seq} tokens\n")
    print("| model | precision | nanoseek tok/s | nanoseek + MTP tok/s | nanoseek --compile tok/s | transformers tok/s | "
          "ratio (no MTP) | ratio --compile | nanoseek MFU |")
    print("|---|---|---|---|---|---|---|---|---|")
    auto_picks: list[str] = []
    compile_s: dict[str, float] = {}
    for name in args.presets:
        speed(name, args.batch, args.seq, args.rounds, peak, auto_picks, compile_s)
    print("\n" + "\n".join(auto_picks))
    print("--compile's first step (compiling included): " + ", ".join(f"{k} {v:.0f} s" for k, v in compile_s.items()))
    if args.balance_steps:
        with tempfile.TemporaryDirectory() as d:
            balance(args.balance_preset, args.balance_steps, Path(d))


if __name__ == "__main__":
    main()
