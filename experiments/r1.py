"""R1-Zero and R1 in miniature, over seeds: every stage scored under one protocol, GRPO against its controls.

    python experiments/r1.py --base runs/base --out runs/r1 --seeds 0 1 2
    python experiments/r1.py --base runs/base --out runs/r1 --seeds 0 --arms r1zero   # one arm

--base is a speedrun dir whose data, tokenizer and pretrain stages have run; its data/sft.jsonl is
the labeled set (the issue's protocol wants every label worked: a plan with sft_worked=1.0). For
each seed, from that one pretrained model:

    base     the pretrained model, scored under the plain and the R1-Zero template; the one better on the
             headline task counts (picked on the test problems themselves, so the base's score leans high)
    r1zero   GRPO straight from the base, rule rewards only (R1-Zero), in --zero-template
    sft      cold-start SFT on the labeled set (every label worked, as a real labeled set is)
    rl       GRPO from the SFT model (R1's first RL stage)
    rft      the control: rejection-sampling fine-tuning from the SFT model with as many samples as `rl` drew

Every stage is scored on the same fixed test problems: greedy pass@1 and pass@k (k samples at temperature
1, the unbiased estimator), per task and level. OUT/results.json holds every number; OUT/results.md the
table of means with standard errors over seeds, and the paired differences the claims rest on. Each stage
is skipped when its results exist, so a rerun continues. Not part of the test suite: one seed takes
about an hour on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

from nanoseek.checkpoint import load_model, resolve_device
from nanoseek.data.tasks import TASKS, Mixture, get_task, task_name
from nanoseek.engine.engine import Engine
from nanoseek.io import write_atomic
from nanoseek.plot import read_metrics
from nanoseek.rl import rft
from nanoseek.rl import train as rl_train
from nanoseek.rl.args import GRPOConfig, GRPORun, RFTConfig
from nanoseek.rl.evaluate import evaluate, pass_at_k
from nanoseek.tokenizer import Tokenizer
from nanoseek.train import sft
from nanoseek.train.args import SFTConfig, TrainConfig, TrainError

ARMS = ("base", "r1zero", "sft", "rl", "rft")


def test_problems(n: int, headline: str, task_levels: list[int], names: list[str]) -> dict[str, list]:
    """The fixed test problems every stage is scored on: n per task of `names`, spread evenly over its levels
    (the given ones for the headline task)."""
    out = {}
    for name in names:
        task = TASKS[name]
        levels = [lv for lv in task_levels if lv in task.levels] if name == headline else list(task.levels)
        out[name] = [p for i, lv in enumerate(levels)
                     for p in task.problems("test", n // len(levels) + (i < n % len(levels)), level=lv, strict=False)]
    return out


def score(model_dir: Path, template: str, problems: dict, k: int, max_tokens: int, seed: int) -> dict:
    """Greedy pass@1 and pass@k (temperature 1) of a model dir, per task and level, in one template."""
    engine = Engine(load_model(model_dir, device=resolve_device()), Tokenizer.load(model_dir), max_running=128)
    result = {}
    for name, probs in problems.items():
        rep = evaluate(engine, TASKS[name], probs, k=k, temperature=1.0, max_tokens=max_tokens, template=template,
                       seed=seed)
        levels = {}
        for r in rep.problems:
            levels.setdefault(str(r.level), []).append(r)
        result[name] = {"n": rep.n, "pass1": rep.pass1, "pass_k": rep.pass_k, "format": rep.format_rate,
                        "mean_tokens": rep.mean_tokens, "template": template,
                        "levels": {lv: {"n": len(rs), "pass1": sum(r.greedy_correct for r in rs) / len(rs),
                                        "pass_k": sum(pass_at_k(r.samples, r.samples_correct, k) for r in rs) / len(rs)}
                                   for lv, rs in sorted(levels.items())}}
        print(f"    {name}: pass@1 {rep.pass1:.1%}, pass@{k} {rep.pass_k:.1%} ({template})", flush=True)
    return result


def finished(run: Path) -> Path:
    """A training run that stopped early (Ctrl-C) leaves no model at its top: never score a checkpoint."""
    if not any(run.glob("*.safetensors")):
        raise SystemExit(f"{run} stopped before its last step; rerun to continue it")
    return run


def grpo(start: Path, out: Path, template: str, seed: int, a) -> dict:
    cfg = GRPOConfig(a.task, level=a.level, prompts=a.prompts, group=a.group, max_tokens=a.max_tokens, lr=a.grpo_lr,
                     beta=a.beta, seed=seed, warmup=a.warmup, averaging="token", normalize="signal",
                     advantage_scale=a.advantage_scale,
                     resample=a.resample, resample_from=a.steps // 2, ref_refresh=a.steps // 2, template=template)
    rl_train.run(GRPORun(model=str(start), out=str(out), grpo=cfg, steps=a.steps, save_every=max(5, a.steps // 6),
                         eval_every=max(1, a.steps // 10), eval_n=a.curve_n, resume=True, quiet=True))
    rows = read_metrics(finished(out))
    return {"samples": int(sum(r.get("draws", 1) for r in rows) * a.prompts * a.group),
            "seconds": sum(r["seconds"] for r in rows),
            "curve": [json.loads(x) for x in (out / "eval.jsonl").read_text().splitlines()]}


def run_seed(seed: int, a, problems: dict, results: dict, save) -> None:
    base, out = Path(a.base), Path(a.out) / f"seed{seed}"
    mine = results.setdefault(str(seed), {})

    def stage(name: str, fn) -> None:
        if name in mine or name not in a.arms:
            return
        print(f"seed {seed}: {name} ...", flush=True)
        t0 = time.perf_counter()
        mine[name] = fn()
        mine[name]["wall_seconds"] = time.perf_counter() - t0
        save()

    def base_stage() -> dict:
        plain = score(base / "pretrain", "plain", problems, a.k, a.max_tokens, seed)
        zero = score(base / "pretrain", "r1-zero", problems, a.k, a.max_tokens, seed)
        best = max((plain, zero), key=lambda r: r[a.headline]["pass1"])
        return {"eval": best, "plain": plain, "r1-zero": zero}

    stage("base", base_stage)
    stage("r1zero", lambda: {**grpo(base / "pretrain", out / "r1zero", a.zero_template, seed, a),
                             "template": a.zero_template,
                             "eval": score(out / "r1zero", a.zero_template, problems, a.k, a.max_tokens, seed)})

    def sft_stage() -> dict:
        sft.run(SFTConfig(model=str(base / "pretrain"), data=[str(base / "data" / "sft.jsonl")],
                          train=TrainConfig(out=str(out / "sft"), steps=a.sft_steps, lr=a.sft_lr,
                                            warmup=max(1, a.sft_steps // 10), seed=seed, resume=True, quiet=True,
                                            save_every=a.sft_steps)))
        return {"eval": score(finished(out / "sft"), "chat", problems, a.k, a.max_tokens, seed)}

    stage("sft", sft_stage)
    stage("rl", lambda: {**grpo(out / "sft", out / "rl", "chat", seed, a),
                         "eval": score(out / "rl", "chat", problems, a.k, a.max_tokens, seed)})

    def rft_stage() -> dict:
        samples = mine["rl"]["samples"] if "rl" in mine else a.steps * a.prompts * a.group
        try:
            stats = rft.run(RFTConfig(model=str(out / "sft"), task=a.task, out=str(out / "rft"), samples=samples,
                                      group=a.group, level=a.level, max_tokens=a.max_tokens, steps=a.steps,
                                      lr=a.sft_lr, seed=seed, quiet=True))
        except TrainError as e:  # no sample was right: the control is the SFT model itself
            return {"skipped": str(e), "eval": score(out / "sft", "chat", problems, a.k, a.max_tokens, seed)}
        return {**stats, "eval": score(finished(out / "rft"), "chat", problems, a.k, a.max_tokens, seed)}

    stage("rft", rft_stage)


def mean_se(xs: list[float]) -> str:
    if not xs:
        return "–"
    m = statistics.fmean(xs)
    se = statistics.stdev(xs) / math.sqrt(len(xs)) if len(xs) > 1 else float("nan")
    return f"{100 * m:.1f}" + ("" if math.isnan(se) else f" ± {100 * se:.1f}")


def table(results: dict, task_levels: dict, k: int) -> str:
    seeds = sorted(results, key=int)
    lines = [f"# R1 in miniature: {len(seeds)} seed(s)", "",
             f"Greedy pass@1 / pass@{k} (temperature 1), in %, mean ± standard error over seeds.", ""]
    rows = [(t, None) for t in task_levels] + [(t, lv) for t, lvs in task_levels.items() for lv in lvs]
    header = ["test problems"] + [arm for arm in ARMS if any(arm in results[s] for s in seeds)]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for t, lv in rows:
        cells = [t if lv is None else f"{t} level {lv}"]
        for arm in header[1:]:
            ev = [results[s][arm]["eval"][t] for s in seeds if arm in results[s]]
            ev = [e if lv is None else e["levels"].get(str(lv)) for e in ev]
            ev = [e for e in ev if e]
            cells.append(f"{mean_se([e['pass1'] for e in ev])} / {mean_se([e['pass_k'] for e in ev])}")
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Paired differences in greedy pass@1 (points, mean ± standard error over seeds):", ""]
    for a_, b_ in (("rl", "sft"), ("rl", "rft"), ("rl", "base"), ("r1zero", "base"), ("rft", "sft")):
        for t in task_levels:
            d = [results[s][a_]["eval"][t]["pass1"] - results[s][b_]["eval"][t]["pass1"]
                 for s in seeds if a_ in results[s] and b_ in results[s]]
            if d:
                lines.append(f"- {a_} − {b_}, {t}: {mean_se(d)}")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True, metavar="DIR", help="a speedrun dir with data/, tokenizer/, pretrain/")
    p.add_argument("--out", required=True, metavar="DIR", help="where the runs and results go")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds (default 0 1 2)")
    p.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS), help="stages to run (default all)")
    p.add_argument("--zero-template", choices=["r1-zero", "plain"], default="r1-zero",
                   help="the prompt template of the R1-Zero arm (default r1-zero; plain: the problem and a newline, "
                        "as the pretraining corpus writes it)")
    p.add_argument("--task", default="arithmetic", type=task_name,
                   help="the task RL trains on: a name, or a mixture of tasks and levels such as "
                        "arithmetic@2,arithmetic@3,sort@4 (the first task is the headline; default arithmetic)")
    p.add_argument("--level", type=int, default=2, help="GRPO's and RFT's level for a single task (default 2)")
    p.add_argument("--levels", type=int, nargs="+", default=[1, 2, 3],
                   help="the RL task's test levels, as the speedrun's plan (default 1 2 3)")
    p.add_argument("--eval-tasks", nargs="+", choices=list(TASKS), default=["arithmetic", "sort"],
                   help="the tasks every stage is scored on (default arithmetic sort)")
    p.add_argument("--n", type=int, default=300, help="test problems per task (default 300)")
    p.add_argument("--k", type=int, default=8, help="samples per test problem for pass@k (default 8)")
    p.add_argument("--max-tokens", type=int, default=200, help="longest completion (default 200)")
    p.add_argument("--steps", type=int, default=100, help="GRPO steps, and RFT's SFT steps (default 100)")
    p.add_argument("--prompts", type=int, default=16, help="GRPO problems per step (default 16)")
    p.add_argument("--group", type=int, default=8, help="GRPO completions per problem (default 8)")
    p.add_argument("--grpo-lr", type=float, default=2e-4, help="GRPO learning rate (default 2e-4)")
    p.add_argument("--beta", type=float, default=0.04, help="GRPO KL weight (default 0.04)")
    p.add_argument("--advantage-scale", choices=["std", "none"], default="std",
                   help="GRPO's advantage: (r - mean) / std, or r - mean as Dr. GRPO (default std)")
    p.add_argument("--warmup", type=int, default=10, help="GRPO warm-up steps (default 10)")
    p.add_argument("--resample", type=int, default=2, help="GRPO dynamic-sampling draws from mid-run (default 2)")
    p.add_argument("--sft-steps", type=int, default=150, help="cold-start SFT steps (default 150)")
    p.add_argument("--sft-lr", type=float, default=5e-4, help="SFT and RFT learning rate (default 5e-4)")
    p.add_argument("--curve-n", type=int, default=100, help="held-out problems of each GRPO curve point (default 100)")
    a = p.parse_args(argv)
    rl_task = get_task(a.task)
    mixed = isinstance(rl_task, Mixture)
    a.headline = rl_task.entries[0][0].name if mixed else a.task
    a.level = None if mixed else a.level
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    problems = test_problems(a.n, a.headline, a.levels, list(dict.fromkeys([a.headline] + a.eval_tasks)))
    levels = {t: sorted({p.level for p in ps}) for t, ps in problems.items()}

    def save() -> None:
        write_atomic(path, json.dumps(results, indent=2))
        write_atomic(out / "results.md", table(results, levels, a.k))

    for seed in a.seeds:
        run_seed(seed, a, problems, results, save)
    save()
    print((out / "results.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
