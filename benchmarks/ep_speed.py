"""Expert parallelism against data parallelism, and what node-limited routing saves in all-to-all traffic.

    python benchmarks/ep_speed.py                  # small, 2 processes, 30 steps each
    python benchmarks/ep_speed.py --steps 60 --batch-size 4

Runs `torchrun --nproc_per_node=2 -m nanoseek pretrain` on the same generated tokens four ways: data
parallel (every rank holds every expert), and --expert-parallel 2 with `topk_group` 1, 2 and 4 of
`small`'s 4 expert groups (2 per rank, so topk_group 1 sends a token to one rank at most; 4 is no
limit). For each: the median training tokens/s of the steps after the first five, and per token and
MoE layer the hidden-state copies sent to the other rank (dispatch) and the expert outputs sent
back (combine), with their bytes at bf16 (hidden 256 x 2 bytes a row). The runs go one after the
other, so compare them within one run of this script.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def data(root: Path) -> Path:
    from nanoseek.data.corpus import write_corpus
    from nanoseek.data.curate import curate
    from nanoseek.data.shards import tokenize_dir
    from nanoseek.tokenizer import Tokenizer

    write_corpus(root / "raw", 1.0, seed=0)
    curate([root / "raw"], root / "curated", workers=1)
    Tokenizer.byte_level().save(root / "tok")
    tokenize_dir(root / "curated", root / "tok", root / "tokens", workers=1)
    return root


def run(root: Path, name: str, a, topk_group: int | None) -> dict:
    from nanoseek import preset

    cfg = preset("small").to_hf_dict()
    if topk_group is not None:
        cfg["topk_group"] = topk_group
    (root / f"{name}.json").write_text(json.dumps(cfg))
    argv = ["pretrain", "--config", str(root / f"{name}.json"), "--data", str(root / "tokens"), "--tokenizer",
            str(root / "tok"), "--out", str(root / name), "--steps", str(a.steps), "--batch-size", str(a.batch_size),
            "--seq-len", str(a.seq_len), "--precision", "fp32", "--save-every", str(10 * a.steps), "--quiet"]
    if topk_group is not None:
        argv += ["--expert-parallel", "2"]
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads)}
    subprocess.run([str(torchrun), "--standalone", "--nproc_per_node=2", "-m", "nanoseek", *argv], check=True,
                   env=env, stdout=subprocess.DEVNULL)
    rows = [json.loads(x) for x in (root / name / "metrics.jsonl").read_text().splitlines()][5:]
    out = {"tokens_per_s": statistics.median(r["tokens_per_s"] for r in rows)}
    if topk_group is not None:
        d, c = (statistics.fmean(r[k] for r in rows) for k in ("ep_remote_ranks_per_token", "ep_returned_per_token"))
        out.update({"dispatch_rows": d, "combine_rows": c, "bytes_bf16": (d + c) * cfg["hidden_size"] * 2,
                    "most_ranks": max(r["ep_most_ranks_per_token"] for r in rows)})
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=30, help="steps per run (default 30)")
    p.add_argument("--batch-size", type=int, default=4, help="sequences per rank per step (default 4)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per sequence (default 256)")
    p.add_argument("--threads", type=int, default=1, help="threads per process (default 1: 2 processes, 2 cores)")
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        root = data(Path(tmp))
        arms = {"data parallel": None, "EP, topk_group 1": 1, "EP, topk_group 2": 2, "EP, topk_group 4 (no limit)": 4}
        results = {}
        for i, (name, k) in enumerate(arms.items()):
            print(f"{name} ...", file=sys.stderr, flush=True)
            results[name] = run(root, f"arm{i}", a, k)
    dp = results["data parallel"]["tokens_per_s"]
    print(f"small, 2 processes x {a.threads} thread(s), batch {a.batch_size} x {a.seq_len} per rank, {a.steps} steps\n")
    print("| run | tokens/s | vs data parallel | most ranks a token visited | dispatch rows / token / layer "
          "| combine rows | bytes / token / layer (bf16) |")
    print("|---|---|---|---|---|---|---|")
    for name, r in results.items():
        ep = (f"{r['most_ranks']} | {r['dispatch_rows']:.2f} | {r['combine_rows']:.2f} | {r['bytes_bf16']:,.0f}"
              if "dispatch_rows" in r else "| | |")
        print(f"| {name} | {r['tokens_per_s']:,.0f} | {r['tokens_per_s'] / dp:.2f}x | {ep} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
