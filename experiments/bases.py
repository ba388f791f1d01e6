"""How much does the pretrained base vary over seeds? The speedrun's pretraining for several seeds, each base
scored under the speedrun's protocol, with the mean and standard error over seeds.

    python experiments/bases.py --data runs/first --out runs/bases --seeds 0 1 2
    python experiments/bases.py --data runs/first --out runs/bases-d4 --seeds 0 1 2 --decay-frac 0.4 --parallel 2
    python experiments/bases.py --data runs/first --out runs/bases-fp32 --precision fp32 --parallel 3 \
        --compare runs/bases-bf16          # two precisions' training curves side by side

--data is a speedrun dir whose data, tokenizer and tokens stages have run; its speedrun.json gives the plan
(preset, steps, lr, mix, curriculum, MTP-gate balancing), and the flags override parts of it. Each seed
pretrains into OUT/seedN (resumed after a stop) and is scored like the speedrun's `base` stage: greedy
pass@1 and pass@k per task and level, under the plain and the R1-Zero template, the better one counting.
With --parallel N, N seeds train side by side, one thread each: a different thread count is a different
trajectory (docs/log.md), so compare seeds only within one setting of --parallel.

OUT/results.json holds every number, OUT/results.md the table, OUT/loss.png every seed's training loss.
Not part of the test suite: one seed of the full plan takes about 40 minutes on 2 CPU cores in fp32; three
side by side in bf16 took 92 minutes on a host with AMX.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from nanoseek.io import write_atomic
from nanoseek.plot import plot_losses, read_metrics
from nanoseek.rl import recipe
from nanoseek.rl.recipe import Protocol
from nanoseek.speedrun import headline
from r1 import mean_se  # experiments/r1.py, beside this script


def settings(a) -> dict:
    plan = json.loads((Path(a.data) / "speedrun.json").read_text())["plan"]
    if a.steps:
        plan["pretrain_steps"] = a.steps
    if a.lr:
        plan["pretrain_lr"] = a.lr
    return {"plan": plan, "decay_frac": a.decay_frac, "precision": a.precision or plan.get("precision", "fp32"),
            "parallel": a.parallel, "n": a.n, "k": a.k, "max_tokens": a.max_tokens}


def train_seed(a, seed: int, s: dict) -> None:
    """Pretrain one seed under settings `s` (see `settings`), resumed after a stop."""
    plan = s["plan"]
    recipe.pretrain(a.data, Path(a.out) / f"seed{seed}", plan["pretrain_steps"], plan, seed=seed, quiet=True,
                    train={"decay_frac": s["decay_frac"], "precision": s["precision"]}, preset=plan["preset"])


def loss_windows(run: Path, width: int = 250) -> dict[str, float]:
    """Mean next-token loss over each `width` steps: when the loss drops tells when the base learned to read."""
    rows = [r for r in read_metrics(run) if "lm_loss" in r]
    out = {}
    for start in range(0, rows[-1]["step"] if rows else 0, width):
        w = [r["lm_loss"] for r in rows if start < r["step"] <= start + width]
        if w:
            out[f"{start + 1}-{start + width}"] = sum(w) / len(w)
    return out


def table(results: dict, tasks: list[str], k: int) -> str:
    seeds = sorted(results, key=int)
    lines = [f"# The plan's base over {len(seeds)} seed(s)", "",
             f"Greedy pass@1 / pass@{k} (temperature 1), in %; the template the base scored better in.", "",
             "| seed | " + " | ".join(tasks) + " | last loss window |", "|---|" + "---|" * (len(tasks) + 1)]
    for s in seeds:
        ev, windows = results[s]["eval"], results[s]["loss"]
        last = f"{list(windows.values())[-1]:.3f}" if windows else "–"
        lines.append(f"| {s} | " + " | ".join(f"{100 * ev[t]['pass1']:.1f} / {100 * ev[t]['pass_k']:.1f}"
                                              for t in tasks) + f" | {last} |")
    if len(seeds) > 1:
        lines.append("| mean ± s.e. | " + " | ".join(
            f"{mean_se([results[s]['eval'][t]['pass1'] for s in seeds])} / "
            f"{mean_se([results[s]['eval'][t]['pass_k'] for s in seeds])}" for t in tasks) + " | |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, metavar="DIR", help="a speedrun dir with data/, tokenizer/, speedrun.json")
    p.add_argument("--out", required=True, metavar="DIR", help="where the runs and results go")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds (default 0 1 2)")
    p.add_argument("--steps", type=int, help="pretraining steps (default: the plan's)")
    p.add_argument("--lr", type=float, help="peak learning rate (default: the plan's)")
    p.add_argument("--decay-frac", type=float, default=0.2, help="share of the steps the WSD schedule decays over "
                                                                   "(default 0.2, as the speedrun)")
    p.add_argument("--precision", choices=["fp32", "bf16", "auto"],
                   help="training precision (default: the plan's; `auto` measures at start, and seeds measured side "
                        "by side can choose differently)")
    p.add_argument("--parallel", type=int, default=1, help="seeds trained side by side, one thread each (default 1)")
    p.add_argument("--n", type=int, default=150, help="test problems per task (default 150, as the speedrun)")
    p.add_argument("--k", type=int, default=8, help="samples per test problem for pass@k (default 8)")
    p.add_argument("--max-tokens", type=int, default=200, help="longest completion (default 200)")
    p.add_argument("--compare", metavar="DIR", help="another OUT of this script with the same seeds (e.g. another "
                   "--precision): also plot both sets' next-token loss into OUT/loss-vs-NAME.png and tabulate it every "
                   "1,000 steps, with the paired difference of the last window; seeds that only one set holds are "
                   "drawn and listed too, as the seed-to-seed noise to read the difference against")
    p.add_argument("--train-seed", type=int, help=argparse.SUPPRESS)  # a --parallel child: train one seed
    a = p.parse_args(argv)
    out = Path(a.out)
    if not (Path(a.data) / "speedrun.json").exists():
        p.error(f"{a.data}: no speedrun.json; run `nanoseek speedrun --out {a.data}` at least past its tokens stage")
    for flag, value, ok in (("--parallel", a.parallel, a.parallel >= 1), ("--steps", a.steps, (a.steps or 1) >= 1),
                            ("--lr", a.lr, (a.lr or 1) > 0), ("--decay-frac", a.decay_frac, 0 < a.decay_frac <= 1)):
        if not ok:
            p.error(f"{flag} {value} is out of range (--parallel, --steps >= 1; --lr > 0; 0 < --decay-frac <= 1)")
    mine = settings(a)
    if a.train_seed is not None:
        train_seed(a, a.train_seed, mine)
        return 0
    out.mkdir(parents=True, exist_ok=True)
    saved = out / "settings.json"
    if saved.exists() and json.loads(saved.read_text()) != mine:
        p.error(f"{out} holds bases of other settings ({saved}); pick a new --out")
    write_atomic(saved, json.dumps(mine, indent=2))
    path = out / "results.json"
    results = json.loads(path.read_text()) if path.exists() else {}

    todo = [s for s in a.seeds if not any((out / f"seed{s}").glob("*.safetensors"))]  # finished runs are kept
    t0 = time.perf_counter()
    if a.parallel == 1:
        for s in todo:
            print(f"seed {s}: pretraining ...", flush=True)
            train_seed(a, s, mine)
    else:
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        for i in range(0, len(todo), a.parallel):
            batch = todo[i:i + a.parallel]
            print(f"seeds {batch}: pretraining side by side ...", flush=True)
            procs = [subprocess.Popen([sys.executable, __file__, *(argv if argv is not None else sys.argv[1:]),
                                       "--train-seed", str(s)], env=env) for s in batch]
            if any(proc.wait() for proc in procs):
                print("a seed's pretraining failed (its error is printed above); rerun to continue", file=sys.stderr)
                return 1
    print(f"pretraining: {time.perf_counter() - t0:.0f} s", flush=True)

    plan = mine["plan"]
    first = headline(plan["task"])
    protocol = Protocol.build(a.n, first, list(plan["levels"]), list(plan["eval_tasks"]), k=a.k,
                              task_levels=plan.get("eval_levels", ()),
                              max_tokens=a.max_tokens)
    templates = recipe.base_templates(bool(plan.get("corpus_chat")))
    for s in a.seeds:
        if str(s) in results:
            continue
        run = out / f"seed{s}"
        print(f"seed {s}: scoring ...", flush=True)
        results[str(s)] = {**recipe.score_base(run, protocol, first, templates=templates), "loss": loss_windows(run)}
        write_atomic(path, json.dumps(results, indent=2))
    tasks = list(dict.fromkeys([first, *plan["eval_tasks"]]))
    write_atomic(out / "results.md", table(results, tasks, a.k))
    plot_losses({f"seed {s}": out / f"seed{s}" for s in a.seeds}, out / "loss.png", smooth=50)
    print((out / "results.md").read_text())
    if a.compare:
        print(compare(out, Path(a.compare), a.seeds))
    return 0


def compare(out: Path, other: Path, seeds: list[int]) -> str:
    """Both sets' next-token loss in one plot, and their loss windows side by side (markdown). `seeds` must have
    run in both; any further seeds either set holds are drawn and tabulated too, unpaired, since a seed's spread
    within one set is the noise a difference between the sets is read against."""
    missing = [str(other / f"seed{s}") for s in seeds if not (other / f"seed{s}" / "metrics.jsonl").exists()]
    if missing:
        raise SystemExit(f"--compare {other}: no training metrics in {', '.join(missing)}")
    held = {d: {int(m.parent.name[4:]) for m in d.glob("seed*/metrics.jsonl") if m.parent.name[4:].isdigit()}
            for d in (out, other)}
    every = sorted(set(seeds) | held[out] | held[other])
    runs = {f"{d.name}, seed {s}": d / f"seed{s}" for s in every for d in (out, other) if s in held[d]}
    plot = plot_losses(runs, out / f"loss-vs-{other.name}.png", smooth=50, key="lm_loss", start=200)
    windows = {label: loss_windows(run) for label, run in runs.items()}
    def end(key: str) -> int:  # "751-1000" -> 1000
        return int(key.split("-")[1])
    def cell(w: dict, key: str) -> str:
        return f"{w[key]:.3f}" if key in w else "–"
    keys = sorted({k for w in windows.values() for k in w if end(k) % 1000 == 0}, key=end)
    lines = [f"Next-token loss, mean over each window of steps ({out.name} / {other.name}; – where a set lacks "
             f"the seed); plot: {plot}", "", "| seed | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    for s in every:
        a, b = windows.get(f"{out.name}, seed {s}", {}), windows.get(f"{other.name}, seed {s}", {})
        lines.append(f"| {s} | " + " | ".join(f"{cell(a, k)} / {cell(b, k)}" for k in keys) + " |")
    last = keys[-1] if keys else None
    paired = [s for s in seeds if all(last in windows.get(f"{d.name}, seed {s}", {}) for d in (out, other))]
    if len(paired) > 1:
        diffs = [windows[f"{out.name}, seed {s}"][last] - windows[f"{other.name}, seed {s}"][last] for s in paired]
        se = statistics.stdev(diffs) / math.sqrt(len(diffs))
        lines += ["", f"{out.name} − {other.name}, steps {last}: {statistics.fmean(diffs):+.3f} ± {se:.3f} "
                      f"(mean ± s.e. over seeds {', '.join(map(str, paired))})"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
