"""R1-Zero and R1 in miniature, over seeds: every stage scored under one protocol, GRPO against its controls.

    python experiments/r1.py --base runs/base --out runs/r1 --seeds 0 1 2
    python experiments/r1.py --base runs/base --out runs/r1 --seeds 0 --arms base r1zero   # some arms

--base is a speedrun dir whose data, tokenizer and pretrain stages have run; its data/sft.jsonl is
the labeled set (every label worked, as the speedrun writes it), and its speedrun.json's plan gives
each recipe setting that no flag names, so that by default each seed repeats the speedrun's recipe (seed 0
draws, stage for stage, what the speedrun of the plan's seed 0 draws). For each seed, from that one
pretrained model, the stages of nanoseek/rl/recipe.py:

    base        the pretrained model, scored under the plain and the R1-Zero template (and chat, where the
                base's corpus had chat turns); its best one counts
    r1zero      GRPO straight from the base, rule rewards only (R1-Zero), in --zero-template
    sft         cold-start SFT on the labeled set
    rl          GRPO from the SFT model (R1's first RL stage)
    rft         the control: rejection-sampling fine-tuning from the SFT model with as many samples as rl drew
    rejection   R1's third stage: the rl model answers --rs-problems unlabeled train problems, and the base is
                fine-tuned on its verified answers and the labeled set
    rl2         GRPO again, from the rejection model (the recipe's last stage: the final model)
    student     a smaller model (--student-layers) pretrained on the base's tokens, once for all seeds
    distill     the student fine-tuned on the final model's verified answers to --distill-problems problems
    student_rl  the control: the student's own cold-start SFT, then GRPO as long as the teacher's

OUT/results.json holds every number; OUT/results.md the table of means with standard errors over
seeds, and the paired differences the claims rest on. Each stage is skipped when its results exist,
so a rerun continues. Seeds may also run as separate processes into one OUT, side by side (their
results merge; the student is pretrained once):

    for s in 0 1 2; do OMP_NUM_THREADS=1 python experiments/r1.py --base runs/base --out runs/r1 --seeds $s & done
    # stop them with kill -INT PID (each saves a checkpoint); the same commands continue them

Not part of the test suite: one seed takes over an hour on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import math
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from nanoseek.data.tasks import TASKS, Mixture, get_task, task_name
from nanoseek.io import write_atomic
from nanoseek.rl import recipe
from nanoseek.rl.recipe import RL, Protocol
from nanoseek.rl.rft import NothingVerified
from nanoseek.speedrun import headline
from nanoseek.train.common import interrupts

ARMS = ("base", "r1zero", "sft", "rl", "rft", "rejection", "rl2", "student", "distill", "student_rl")

ARM_OF_DIR = {"student-base": "student"}  # run dirs not named after the arm that scores them

# the recipe's flags whose default is the base's plan: flag, type, the plan's field (speedrun.Plan), what it sets
# (--task, --eval-tasks, --advantage-scale and --precision, with choices of their own, are added on their own)
PLAN_FLAGS = (
    ("--n", int, "eval_n", "test problems per task"),
    ("--k", int, "eval_k", "samples per test problem for pass@k"),
    ("--max-tokens", int, "max_tokens", "longest completion"),
    ("--steps", int, "grpo_steps", "GRPO steps, and RFT's SFT steps"),
    ("--prompts", int, "grpo_prompts", "GRPO problems per step"),
    ("--group", int, "grpo_group", "GRPO completions per problem"),
    ("--grpo-lr", float, "grpo_lr", "GRPO learning rate"),
    ("--beta", float, "grpo_beta", "GRPO KL weight"),
    ("--temperature", float, "grpo_temperature", "GRPO rollouts' temperature"),
    ("--warmup", int, "grpo_warmup", "GRPO warm-up steps"),
    ("--resample", int, "grpo_resample", "GRPO dynamic-sampling draws from mid-run"),
    ("--sft-steps", int, "sft_steps", "cold-start SFT steps"),
    ("--sft-lr", float, "sft_lr", "SFT, RFT, rejection and distillation learning rate"),
    ("--curve-n", int, "curve_n", "held-out problems of each GRPO curve point"),
    ("--rs-problems", int, "rs_problems", "rejection stage: unlabeled train problems the rl model answers"),
    ("--rs-k", int, "rs_k", "rejection stage: answers per problem"),
    ("--rs-steps", int, "rs_steps", "rejection stage: SFT steps from the base"),
    ("--rl2-steps", int, "rl2_steps", "second GRPO stage's steps (0: none)"),
    ("--student-layers", int, "distill_layers", "the distillation student's layers"),
    ("--student-steps", int, "distill_pretrain_steps", "the student's pretraining steps"),
    ("--distill-problems", int, "distill_problems", "unlabeled train problems the teacher answers for the student"),
    ("--distill-k", int, "distill_k", "teacher answers per problem"),
    ("--distill-steps", int, "distill_steps", "the student's SFT steps on them"),
)
# argparse dest -> the plan's field, for every setting the plan gives
PLAN_KEYS = {"task": "task", "eval_tasks": "eval_tasks", "advantage_scale": "grpo_advantage", "precision": "precision",
             **{flag[2:].replace("-", "_"): key for flag, _, key, _ in PLAN_FLAGS}}


@contextmanager
def locked(path: Path):
    """An exclusive lock on `path` (created if missing) for the block: seeds may run as separate processes
    into one OUT, and they share its results file and its student."""
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def student_base(a) -> Path:
    """The student: the base's shape at fewer layers, pretrained on the base's own tokens and plan (curriculum
    included, as the speedrun pretrains its student)."""
    base, out = Path(a.base), Path(a.out) / "student-base"
    with locked(Path(a.out) / ".student.lock"):  # seeds run side by side wait for the one that trains it
        if any(out.glob("*.safetensors")):
            return out
        plan = json.loads((base / "speedrun.json").read_text())["plan"]
        config = recipe.student_config(plan["preset"], a.student_layers, Path(a.out) / "student.json")
        return recipe.pretrain(base, out, a.student_steps, plan, config=str(config))


def run_seed(seed: int, a, protocol: Protocol, rl: RL, results: dict, save) -> None:
    base, out = Path(a.base), Path(a.out) / f"seed{seed}"
    labeled = base / "data" / "sft.jsonl"
    mine = results.setdefault(str(seed), {})
    proto = Protocol(protocol.problems, k=protocol.k, max_tokens=protocol.max_tokens, seed=seed)

    def stage(name: str, fn) -> None:
        if name in mine or name not in a.arms:
            return
        print(f"seed {seed}: {name} ...", flush=True)
        t0, before = time.perf_counter(), interrupts()
        mine[name] = fn()
        mine[name]["wall_seconds"] = time.perf_counter() - t0
        save()
        if interrupts() > before:  # Ctrl-C on a loop's last step: the stage finished; stop before the next
            raise recipe.Stopped(out / name)

    def scored(model: Path, **record) -> dict:
        """A stage's record with its model scored, in the template it trained in (GRPO records theirs)."""
        record.setdefault("template", "chat")
        return {**record, "eval": recipe.score(model, record["template"], proto)}

    def verified(teacher, start, dest, problems, k, temperature, steps, salt, instead, extra=(), keep=0) -> dict:
        try:
            stats = recipe.verified_sft(teacher, start, dest, rl.task, problems, k, temperature, rl.max_tokens, steps,
                                        a.sft_lr, seed, level=rl.level, keep_per_problem=keep, extra=extra, salt=salt,
                                        precision=a.precision)
        except NothingVerified as e:  # nothing to train on: the stage is the model the recipe goes on from
            return scored(instead, skipped=str(e), instead=instead.name,
                          template=mine.get(ARM_OF_DIR.get(instead.name, instead.name), {}).get("template", "chat"))
        return scored(dest, **stats)

    def has_model(run: Path) -> bool:
        return any(run.glob("*.safetensors"))

    stage("base", lambda: recipe.score_base(base / "pretrain", proto, a.headline, templates=a.base_templates))
    def r1zero() -> dict:
        template = a.zero_template
        if template == "best":  # as the speedrun: the template the base scored best in
            if "base" not in mine:
                raise SystemExit("--zero-template best needs the base arm's scores: run it too, or name a template")
            template = mine["base"]["template"]
        return scored(out / "r1zero", **recipe.grpo(base / "pretrain", out / "r1zero", rl, template, seed))

    stage("r1zero", r1zero)
    stage("sft", lambda: scored(recipe.sft(base / "pretrain", [labeled], out / "sft", a.sft_steps, a.sft_lr, seed,
                                                precision=a.precision)))
    stage("rl", lambda: scored(out / "rl", **recipe.grpo(out / "sft", out / "rl", rl, "chat", seed)))
    rl_samples = mine["rl"]["samples"] if "rl" in mine else rl.steps * rl.prompts * rl.group
    stage("rft", lambda: verified(out / "sft", out / "sft", out / "rft", rl_samples // rl.group, rl.group, 1.0,
                                  rl.steps, salt=0, instead=out / "sft"))
    stage("rejection", lambda: verified(out / "rl", base / "pretrain", out / "rejection", a.rs_problems, a.rs_k, 1.0,
                                        a.rs_steps, salt=1, instead=out / "rl", extra=[labeled], keep=a.rs_keep))
    rl2_start = out / ("rejection" if has_model(out / "rejection") else "rl")  # nothing verified: from rl
    if a.rl2_steps:
        stage("rl2", lambda: {"from": rl2_start.name, **scored(out / "rl2", **recipe.grpo(
            rl2_start, out / "rl2", rl, "chat", seed + recipe.RL2_SEED, steps=a.rl2_steps))})
    if any(arm in a.arms for arm in ("student", "distill", "student_rl")):
        student = student_base(a)
        stage("student", lambda: recipe.score_base(student, proto, a.headline, templates=a.base_templates))
        teacher = out / ("rl2" if a.rl2_steps else "rl")  # the final model
        if "distill" in a.arms and "distill" not in mine:
            if not has_model(teacher):
                raise SystemExit(f"seed {seed}: distill needs the final model {teacher}: run its arms first")
            drawn = out / "distill" / "teacher.json"  # samples drawn from one teacher are never reused for another
            if drawn.exists() and json.loads(drawn.read_text())["teacher"] != teacher.name:
                raise SystemExit(f"{drawn.parent} holds another teacher's samples: remove it to distil {teacher.name}")
            drawn.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(drawn, json.dumps({"teacher": teacher.name}))
        stage("distill", lambda: {"teacher": teacher.name, **verified(
            teacher, student, out / "distill", a.distill_problems, a.distill_k, 0.7, a.distill_steps, salt=2,
            instead=student, keep=a.distill_keep)})

        def student_rl() -> dict:
            sft = recipe.sft(student, [labeled], out / "student_sft", a.sft_steps, a.sft_lr, seed,
                              precision=a.precision)
            return {"sft_eval": recipe.score(sft, "chat", proto),
                    **scored(out / "student_rl", **recipe.grpo(sft, out / "student_rl", rl, "chat", seed))}

        stage("student_rl", student_rl)


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
            ev = [results[s][arm]["eval"].get(t) for s in seeds if arm in results[s]]
            ev = [e if lv is None or not e else e["levels"].get(str(lv)) for e in ev]
            ev = [e for e in ev if e]
            cells.append(f"{mean_se([e['pass1'] for e in ev])} / {mean_se([e['pass_k'] for e in ev])}")
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Paired differences in greedy pass@1 (points, mean ± standard error over seeds):", ""]
    for a_, b_ in (("rl", "sft"), ("rl", "rft"), ("rl", "base"), ("r1zero", "base"), ("rft", "sft"),
                   ("rl2", "rl"), ("rl2", "base"), ("distill", "student"), ("distill", "student_rl")):
        for t in task_levels:
            d = [results[s][a_]["eval"][t]["pass1"] - results[s][b_]["eval"][t]["pass1"]
                 for s in seeds if a_ in results[s] and b_ in results[s] and t in results[s][a_]["eval"]
                 and t in results[s][b_]["eval"]]
            if d:
                lines.append(f"- {a_} − {b_}, {t}: {mean_se(d)}")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True, metavar="DIR", help="a speedrun dir with data/, tokenizer/, pretrain/")
    p.add_argument("--out", required=True, metavar="DIR", help="where the runs and results go")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds (default 0 1 2)")
    p.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS), help="stages to run (default all)")
    p.add_argument("--zero-template", choices=["best", "r1-zero", "plain", "chat"], default="best",
                   help="the prompt template of the R1-Zero arm: best (default), the one the base scored best in, as "
                        "the speedrun; r1-zero; plain (the problem and a newline, as the pretraining corpus writes it); "
                        "chat (where the corpus had chat turns)")
    # Every recipe setting below defaults to the base's plan (its speedrun.json), so that with no flags the seeds
    # repeat the speedrun's own recipe; a flag changes one setting for every seed.
    plan_flag = "the base's plan"
    p.add_argument("--task", type=task_name,
                   help="the task RL trains on: a name, or a mixture of tasks and levels such as "
                        f"arithmetic@2,arithmetic@3,sort@4 (the first task is the headline; default: {plan_flag})")
    p.add_argument("--level", type=int,
                   help="for a single task: the one level every RL and sampling stage draws (default: all its levels, "
                        "as the speedrun)")
    p.add_argument("--levels", type=int, nargs="+", help=f"the headline task's test levels (default: {plan_flag})")
    p.add_argument("--eval-tasks", nargs="+", choices=list(TASKS),
                   help=f"the tasks every stage is scored on (default: {plan_flag})")
    for flag, kind, _, what in PLAN_FLAGS:
        p.add_argument(flag, type=kind, help=f"{what} (default: {plan_flag})")
    p.add_argument("--precision", choices=["fp32", "bf16", "auto"],
                   help=f"what SFT, RFT, rejection and distillation compute in (GRPO: fp32) (default: {plan_flag})")
    p.add_argument("--advantage-scale", choices=["std", "none"],
                   help=f"GRPO's advantage: (r - mean) / std, or r - mean as Dr. GRPO (default: {plan_flag})")
    p.add_argument("--inner-updates", type=int, default=RL.inner_updates,
                   help=f"GRPO optimizer steps per batch of rollouts, mu (default {RL.inner_updates}, as the speedrun: "
                        "at 1 the ratio is 1 and the clip never acts)")
    p.add_argument("--clip-eps", type=float, default=RL.clip_eps,
                   help=f"GRPO's PPO clip range (default {RL.clip_eps}, as the speedrun)")
    p.add_argument("--rs-keep", type=int, default=2,
                   help="rejection stage: verified answers kept per problem (default 2, as the speedrun)")
    p.add_argument("--distill-keep", type=int, default=2,
                   help="verified answers kept per problem for the student (default 2, as the speedrun)")
    a = p.parse_args(argv)
    try:
        plan = json.loads((Path(a.base) / "speedrun.json").read_text())["plan"]
    except (OSError, ValueError, KeyError) as e:
        p.error(f"--base {a.base}: no readable speedrun.json ({e}); pass a speedrun dir")
    for dest, key in PLAN_KEYS.items():
        if getattr(a, dest) is None:
            if key not in plan:
                p.error(f"--base {a.base}: its plan has no {key!r} (an older speedrun): pass --{dest.replace('_', '-')}")
            setattr(a, dest, plan[key])
    rl_task = get_task(a.task)
    mixed = isinstance(rl_task, Mixture)
    a.headline = rl_task.entries[0][0].name if mixed else a.task
    a.level = None if mixed else a.level
    # the base's plan says which levels of the other tasks the labeled set and the tests hold, and whether
    # the corpus had chat turns (then a pretrained model is scored in the chat template too)
    a.task_levels = {t: list(lvs) for t, lvs in plan.get("eval_levels", [])}
    if a.levels is None:  # the plan's headline levels; for another headline, the plan's levels of that task
        a.levels = plan["levels"] if a.headline == headline(plan["task"]) else \
            a.task_levels.get(a.headline, [])  # none: all its levels (Protocol.build)
    a.base_templates = recipe.base_templates(bool(plan.get("corpus_chat")))
    if a.k < 2:
        p.error(f"--k must be >= 2 (got {a.k}): pass@k needs several samples; pass@1 is the greedy score")
    # checked here too, not only when a GRPO stage starts, so a typo fails before an hour of other arms
    if a.inner_updates < 1 or not a.clip_eps > 0:
        p.error(f"--inner-updates must be >= 1 and --clip-eps > 0 (got {a.inner_updates}, {a.clip_eps})")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    # one scoring protocol per OUT: results of other test problems or k are never mixed into one table
    settings = {k: getattr(a, k) for k in ("base", "task", "levels", "eval_tasks", "n", "k", "max_tokens")}
    if a.task_levels:  # protocols written before this setting existed stay comparable
        settings["task_levels"] = a.task_levels
    # and one recipe: seeds side by side, or a rerun, never mix stages trained with other settings
    recipe_settings = {k: getattr(a, k) for k in (*PLAN_KEYS, "zero_template", "level", "rs_keep", "distill_keep")}
    for k in ("inner_updates", "clip_eps"):  # recorded only where not RL's default: older OUTs stay valid
        if getattr(a, k) != getattr(RL, k):
            recipe_settings[k] = getattr(a, k)
    with locked(out / ".results.lock"):
        for saved, mine in ((out / "protocol.json", settings), (out / "recipe.json", recipe_settings)):
            theirs = json.loads(saved.read_text()) if saved.exists() else mine
            if theirs != mine:
                diff = "; ".join(f"{k}: {theirs.get(k)!r} there, {v!r} now" for k, v in mine.items() if theirs.get(k) != v)
                p.error(f"{out} holds results of other settings ({diff}); pass the same flags, or pick a new --out")
            write_atomic(saved, json.dumps(mine))
    results = json.loads(path.read_text()) if path.exists() else {}
    protocol = Protocol.build(a.n, a.headline, a.levels, a.eval_tasks, task_levels=a.task_levels, k=a.k,
                              max_tokens=a.max_tokens)
    levels = protocol.levels()
    rl = RL(a.task, level=a.level, steps=a.steps, prompts=a.prompts, group=a.group, max_tokens=a.max_tokens,
            lr=a.grpo_lr, beta=a.beta, warmup=a.warmup, resample=a.resample, advantage_scale=a.advantage_scale,
            temperature=a.temperature, curve_n=a.curve_n, inner_updates=a.inner_updates, clip_eps=a.clip_eps)

    def save() -> None:
        """This process's seeds merged into OUT's results, which other processes' seeds may share."""
        with locked(out / ".results.lock"):
            merged = json.loads(path.read_text()) if path.exists() else {}
            for s in a.seeds:  # arm by arm: another process may run other arms of the same seed
                merged.setdefault(str(s), {}).update(results.get(str(s), {}))
            write_atomic(path, json.dumps(merged, indent=2))
            write_atomic(out / "results.md", table(merged, levels, a.k))

    try:
        for seed in a.seeds:
            run_seed(seed, a, protocol, rl, results, save)
    except recipe.Stopped as e:
        print(f"stopped at {e}; rerun the same command to continue", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("stopped; rerun the same command to continue", file=sys.stderr)
        return 130
    save()
    print((out / "results.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
