"""FP8 training against higher precision: the same model, data and steps in each precision.

    python experiments/fp8.py --data runs/x/data/tokens --tokenizer runs/x/tokenizer --out runs/fp8 --steps 300

Pretrains the `--preset` model once per arm, from the same seed on the same batches:

    fp32         the reference
    bf16         bf16 autocast
    fp8          DeepSeek-V3's FP8 linears with fine-grained scaling (1x128 tiles, 128x128 blocks)
    fp8-tensor   FP8 linears with one scale per GEMM operand

and writes OUT/results.json, OUT/results.md (each arm's final loss, the mean of its last `--tail` steps,
and its relative difference from fp32's) and OUT/loss.png (the loss curves). On a GPU the runs use it
(the FP8 GEMMs as real ones on Hopper where torch takes the shapes). An arm whose run dir is complete
is not run again, so a rerun continues. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

ARMS = {  # name: (precision, fp8 scaling)
    "fp32": ("fp32", "fine"),
    "bf16": ("bf16", "fine"),
    "fp8": ("fp8", "fine"),
    "fp8-tensor": ("fp8", "tensor"),
}


def losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def train(a, name: str) -> dict:
    from nanoseek.train import fp8, pretrain
    from nanoseek.train.args import PretrainConfig, TrainConfig

    precision, scaling = ARMS[name]
    run = Path(a.out) / name
    if (run / "model.safetensors").exists() or any(run.glob("model-*.safetensors")):
        return json.loads((run / "arm.json").read_text())
    before = dict(fp8.GEMMS)
    t0 = time.perf_counter()
    tc = TrainConfig(out=str(run), steps=a.steps, lr=a.lr, batch_size=a.batch_size, seq_len=a.seq_len,
                     precision=precision, fp8_scaling=scaling, seed=a.seed, save_every=max(a.steps, 1),
                     keep=1, quiet=a.quiet)
    pretrain.run(PretrainConfig(data=a.data, tokenizer=a.tokenizer, preset=a.preset, train=tc))
    arm = {"precision": precision, "fp8_scaling": scaling if precision == "fp8" else None, "seed": a.seed,
           "seconds": time.perf_counter() - t0, "gemms": {k: fp8.GEMMS[k] - before[k] for k in before}}
    (run / "arm.json").write_text(json.dumps(arm, indent=2))
    return arm


def summarise(a, arms: dict[str, dict]) -> dict:
    ref = statistics.fmean(losses(Path(a.out) / "fp32")[-a.tail:])
    rows = {}
    for name, arm in arms.items():
        if "diverged" in arm:
            rows[name] = {**arm, "final_loss": math.nan, "tail_loss": math.nan, "relative_to_fp32": math.nan}
            continue
        curve = losses(Path(a.out) / name)
        tail = statistics.fmean(curve[-a.tail:])
        rows[name] = {**arm, "final_loss": curve[-1], "tail_loss": tail, "relative_to_fp32": tail / ref - 1}
    return rows


def table(rows: dict[str, dict], a) -> str:
    out = [f"`{a.preset}`, {a.steps} steps of batch {a.batch_size} x {a.seq_len}, lr {a.lr}; loss = the mean of "
           f"the last {a.tail} steps' training loss.", "",
           "| arm | loss | vs fp32 | final step's loss | seconds | FP8 GEMMs (kernel / simulated) |",
           "|---|---|---|---|---|---|"]
    for name, r in rows.items():
        if "diverged" in r:
            out.append(f"| {name} | diverged: {r['diverged']} | | | | |")
            continue
        g = r["gemms"]
        gemms = f"{g['kernel']:,} / {g['simulated']:,}" if r["precision"] == "fp8" else ""
        out.append(f"| {name} | {r['tail_loss']:.4f} | {100 * r['relative_to_fp32']:+.2f}% | {r['final_loss']:.4f} "
                   f"| {r['seconds']:.0f} | {gemms} |")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, metavar="DIR", help="token shards (a speedrun's data/tokens)")
    p.add_argument("--tokenizer", required=True, metavar="DIR", help="their tokenizer (a speedrun's tokenizer/)")
    p.add_argument("--out", required=True, metavar="DIR", help="where the runs and results go")
    p.add_argument("--preset", default="small", help="model shape (default small)")
    p.add_argument("--steps", type=int, default=300, help="pretraining steps per arm (default 300)")
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (default 3e-3)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per step (default 8)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per sequence (default 256)")
    p.add_argument("--seed", type=int, default=0, help="the seed of every arm: the same init and batches (default 0)")
    p.add_argument("--tail", type=int, default=20, help="steps averaged for an arm's loss (default 20)")
    p.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(ARMS), help="arms to run (default all)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    a = p.parse_args(argv)
    if "fp32" not in a.arms:
        p.error("--arms must include fp32, the reference")
    Path(a.out).mkdir(parents=True, exist_ok=True)
    arms = {}
    for name in a.arms:
        print(f"{name} ...", file=sys.stderr, flush=True)
        try:
            arms[name] = train(a, name)
        except FloatingPointError as e:  # a precision that diverges is a result, not a crash
            print(f"{name}: {e}", file=sys.stderr, flush=True)
            arms[name] = {"precision": ARMS[name][0], "fp8_scaling": ARMS[name][1], "diverged": str(e)}
    rows = summarise(a, arms)
    (Path(a.out) / "results.json").write_text(json.dumps({"settings": vars(a), "arms": rows}, indent=2))
    (Path(a.out) / "results.md").write_text(table(rows, a))
    from nanoseek.plot import plot_losses
    plot_losses({name: Path(a.out) / name for name in rows if "diverged" not in rows[name]}, Path(a.out) / "loss.png")
    print(table(rows, a))
    return 0


if __name__ == "__main__":
    sys.exit(main())
