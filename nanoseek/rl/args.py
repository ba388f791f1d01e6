"""The typed configs of `nanoseek grpo`, `rft` and `distill`, and the flags that fill them.

    rl.train.run(GRPORun(model="runs/x/sft", out="runs/x/rl", steps=100, grpo=GRPOConfig("arithmetic")))
    rl.distill.run(DistillConfig(teacher="runs/x/rl", student="runs/x/student", task="arithmetic", out=...))
    rl.rft.run(RFTConfig(model="runs/x/sft", task="arithmetic", out="runs/x/rft", samples=12800))

The flags take their defaults from the dataclasses. No torch import, so `nanoseek --help` stays fast.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from ..data.tasks import TASKS, Mixture, get_task, task_name
from ..train.args import TrainError, check_choice, default, from_args, shown

TASK_HELP = (f"which task: {', '.join(TASKS)}, or a mixture of tasks and levels cycled through, "
             "e.g. arithmetic@2,arithmetic@3,sort@4")
TEMPLATES = ("chat", "r1-zero", "plain")  # plain: the problem then a newline, as the pretraining corpus writes it


@dataclass
class GRPOConfig:
    """One GRPO step's settings (`grpo_step`), saved in every checkpoint."""
    task: str
    level: int | None = None
    prompts: int = 8  # P problems per step
    group: int = 8  # G completions per problem
    max_tokens: int = 256
    temperature: float = 1.0
    inner_updates: int = 1  # optimizer steps per batch of rollouts (mu)
    minibatch: int = 16  # sequences per forward/backward
    clip_eps: float = 0.2
    beta: float = 0.04
    averaging: str = "sequence"
    advantage_scale: str = "std"  # std: (r - mean) / std (GRPO); none: r - mean (Dr. GRPO)
    normalize: str = "signal"  # signal: mean over the groups with reward variance; batch: over all P groups
    ref_refresh: int = 0  # steps between reference refreshes; 0: never
    resample: int = 0  # extra draws of P problems per step while fewer than P groups have signal (DAPO)
    resample_from: int = 0  # the first step (0-based) that resamples
    lr: float = 1e-5
    warmup: int = 0  # steps of linear lr warm-up
    weight_decay: float = 0.0
    clip: float = 1.0
    format_weight: float = 0.1
    language_weight: float = 0.0
    template: str = "chat"
    seed: int = 0

    def __post_init__(self) -> None:
        check_choice("averaging", self.averaging, ("sequence", "token"))
        check_choice("normalize", self.normalize, ("signal", "batch"))
        check_choice("advantage_scale", self.advantage_scale, ("std", "none"))
        check_choice("template", self.template, TEMPLATES)
        check_task(self.task, self.level)


@dataclass(kw_only=True)
class GRPORun:
    """A `nanoseek grpo` run: where it starts and writes, how long, and each step's settings."""
    model: str  # the starting policy's model dir
    out: str  # the run dir: metrics, checkpoints, the final model
    grpo: GRPOConfig
    steps: int = 100
    eval_every: int = 0  # greedy pass@1 on held-out test problems every N steps (and at 0 and the end); 0: never
    eval_n: int = 100  # test problems of that evaluation (of GRPO's level, in its template)
    max_running: int | None = None  # default: prompts x group, one rollout in one batch
    compile: bool = False
    save_every: int = 20
    keep: int = 2
    resume: bool = False
    quiet: bool = False


@dataclass(kw_only=True)
class DistillConfig:
    """A `nanoseek distill` run: rejection-sample the teacher, SFT the student, evaluate both."""
    teacher: str
    student: str
    task: str
    out: str
    problems: int = 500
    k: int = 4  # teacher samples per problem
    keep_per_problem: int = 2
    temperature: float = 0.7
    max_tokens: int = 256
    steps: int = 300  # student SFT steps
    lr: float = 5e-4
    eval_n: int = 100
    seed: int = 0
    max_running: int = 64
    quiet: bool = False

    def __post_init__(self) -> None:
        check_task(self.task, None)


@dataclass(kw_only=True)
class RFTConfig:
    """A `nanoseek rft` run: sample the start, keep its verified completions, fine-tune the start on them."""
    model: str  # the start (the GRPO run's --model)
    task: str
    out: str
    samples: int = 1024  # completions drawn in all: GRPO's steps x prompts x group (x draws)
    group: int = 8  # completions per problem
    level: int | None = None
    temperature: float = 1.0
    max_tokens: int = 256
    keep_per_problem: int = 0  # distinct verified completions kept per problem; 0: all
    steps: int = 100  # SFT steps
    lr: float = 5e-4
    warmup: int = 10
    batch_size: int = 8
    seq_len: int = 256
    save_every: int = 50
    seed: int = 0
    max_running: int = 64
    quiet: bool = False

    def __post_init__(self) -> None:
        check_task(self.task, self.level)


def check_task(task: str, level: int | None) -> None:
    """What --task's type checks on the command line, for configs built in code; and a level only for one task."""
    try:
        t = get_task(task)
    except ValueError as e:
        raise TrainError(str(e)) from None
    if level is not None and isinstance(t, Mixture):
        raise TrainError(f"--level {level} with the mixture {task!r}: a mixture names its levels; drop --level")
    if level is not None and level not in t.levels:
        raise TrainError(f"--level must be one of {list(t.levels)} for {task} (got {level})")


def grpo_run(args: argparse.Namespace) -> GRPORun:
    return from_args(GRPORun, args, grpo=from_args(GRPOConfig, args))


def distill_config(args: argparse.Namespace) -> DistillConfig:
    return from_args(DistillConfig, args)


def rft_config(args: argparse.Namespace) -> RFTConfig:
    return from_args(RFTConfig, args)


def add_grpo_arguments(p: argparse.ArgumentParser) -> None:
    """`nanoseek grpo`'s flags: the fields of GRPORun and GRPOConfig."""
    g = lambda name: default(GRPOConfig, name)  # noqa: E731
    r = lambda name: default(GRPORun, name)  # noqa: E731
    p.add_argument("--model", required=True, metavar="DIR", help="the starting policy (an SFT'd model dir)")
    p.add_argument("--task", required=True, type=task_name, metavar="TASK", help=TASK_HELP)
    p.add_argument("--out", required=True, metavar="RUN", help="run dir: metrics, checkpoints, the final model")
    p.add_argument("--level", type=int, help="train on one difficulty level (default: all, cycling)")
    p.add_argument("--steps", type=int, default=r("steps"), help=f"GRPO steps (default {r('steps')})")
    p.add_argument("--prompts", type=int, default=g("prompts"), help=f"problems per step, P (default {g('prompts')})")
    p.add_argument("--group", type=int, default=g("group"), help=f"completions per problem, G (default {g('group')})")
    p.add_argument("--max-tokens", type=int, default=g("max_tokens"),
                   help=f"longest completion (default {g('max_tokens')})")
    p.add_argument("--temperature", type=float, default=g("temperature"),
                   help="rollout temperature (default 1, as R1-Zero)")
    p.add_argument("--inner-updates", type=int, default=g("inner_updates"),
                   help="optimizer steps per batch of rollouts, mu (default 1: the ratio starts at 1)")
    p.add_argument("--minibatch", type=int, default=g("minibatch"),
                   help=f"sequences per forward/backward (default {g('minibatch')})")
    p.add_argument("--clip-eps", type=float, default=g("clip_eps"),
                   help=f"PPO clip range epsilon (default {g('clip_eps')})")
    p.add_argument("--beta", type=float, default=g("beta"),
                   help="KL weight to the reference (default 0.04 as DeepSeekMath; R1-Zero used 0.001; 0: no "
                        "reference model)")
    p.add_argument("--averaging", choices=["sequence", "token"], default=g("averaging"),
                   help="sequence: mean over each completion's tokens, then over completions (GRPO as published); "
                        "token: mean over all tokens of the batch (default sequence)")
    p.add_argument("--advantage-scale", choices=["std", "none"], default=g("advantage_scale"),
                   help="std: advantage (r - mean) / std over the group (GRPO, default); none: r - mean (Dr. GRPO: "
                        "groups nearly all right or all wrong are not weighted up)")
    p.add_argument("--normalize", choices=["signal", "batch"], default=g("normalize"),
                   help="what the loss averages over: signal — the completions of groups with reward variance "
                        "only (default; a step with 2 such groups moves as far as one with 16); batch — all P x G "
                        "completions, the groups without variance counting with advantage 0 (the published "
                        "objective: a step with little signal moves proportionally less)")
    p.add_argument("--ref-refresh", type=int, default=g("ref_refresh"),
                   help="copy the policy into the reference every N steps (default 0: never)")
    p.add_argument("--resample", type=int, default=g("resample"), metavar="N",
                   help="dynamic sampling (DAPO): while fewer than P groups of a step have reward variance, draw "
                        "P more problems, up to N extra draws, and train on the first P groups with signal "
                        "(default 0: off)")
    p.add_argument("--resample-from", type=int, default=g("resample_from"), metavar="STEP",
                   help="resample only from this step on (default 0); with --ref-refresh STEP, a second stage that "
                        "starts from the first stage's policy as its reference (docs/grpo.md)")
    p.add_argument("--lr", type=float, default=g("lr"), help=f"AdamW learning rate (default {shown(g('lr'))})")
    p.add_argument("--warmup", type=int, default=g("warmup"), metavar="STEPS",
                   help="raise the lr linearly over the first STEPS steps (default 0: none). Adam's first updates "
                        "move every weight by about the lr whatever its gradient, which can knock a fine-tuned "
                        "model's accuracy down in one step (docs/grpo.md)")
    p.add_argument("--weight-decay", type=float, default=g("weight_decay"),
                   help=f"AdamW weight decay (default {shown(g('weight_decay'))})")
    p.add_argument("--clip", type=float, default=g("clip"), help=f"gradient-norm clip (default {g('clip')})")
    p.add_argument("--format-weight", type=float, default=g("format_weight"),
                   help=f"format reward weight (default {g('format_weight')})")
    p.add_argument("--language-weight", type=float, default=g("language_weight"),
                   help="language-consistency reward weight (default 0: off)")
    p.add_argument("--template", choices=list(TEMPLATES), default=g("template"),
                   help="prompt template: chat (default), r1-zero (R1-Zero's plain text), plain (problem + newline)")
    p.add_argument("--seed", type=int, default=g("seed"), help="seed for problems and sampling (default 0)")
    p.add_argument("--eval-every", type=int, default=r("eval_every"), metavar="N",
                   help="every N steps (and before the first and after the last), greedy pass@1 on --eval-n held-out "
                        "test problems of the run's level and template, logged to RUN/eval.jsonl with the mean "
                        "response length: the curve of R1-Zero's Figure 2 (default 0: never)")
    p.add_argument("--eval-n", type=int, default=r("eval_n"),
                   help=f"test problems of each --eval-every evaluation (default {r('eval_n')})")
    p.add_argument("--max-running", type=int,
                   help="sequences the engine decodes together (default: prompts x group, one rollout in one batch)")
    p.add_argument("--compile", action="store_true",
                   help="roll out through the compiled decode step (torch.compile, needs g++ on CPU): compiles once "
                        "at start (about a minute for `small`), then reuses the graph as the weights change "
                        "(docs/benchmarks.md has the measured speed-up)")
    p.add_argument("--save-every", type=int, default=r("save_every"),
                   help=f"checkpoint every N steps (default {r('save_every')})")
    p.add_argument("--keep", type=int, default=r("keep"), help=f"checkpoints to keep (default {r('keep')})")
    p.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint in RUN")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def add_distill_arguments(p: argparse.ArgumentParser) -> None:
    """`nanoseek distill`'s flags: the fields of DistillConfig."""
    d = lambda name: default(DistillConfig, name)  # noqa: E731
    p.add_argument("--teacher", required=True, metavar="DIR", help="the model to learn from (e.g. a GRPO run)")
    p.add_argument("--student", required=True, metavar="DIR",
                   help="the model to train (a smaller model dir with the same tokenizer)")
    p.add_argument("--task", required=True, type=task_name, metavar="TASK", help=TASK_HELP)
    p.add_argument("--out", required=True, metavar="RUN", help="run dir: data, the student's SFT run, report.json")
    p.add_argument("--problems", type=int, default=d("problems"),
                   help=f"train problems to sample (default {d('problems')})")
    p.add_argument("--k", type=int, default=d("k"), help=f"teacher samples per problem (default {d('k')})")
    p.add_argument("--keep-per-problem", type=int, default=d("keep_per_problem"),
                   help=f"distinct correct samples kept (default {d('keep_per_problem')})")
    p.add_argument("--temperature", type=float, default=d("temperature"),
                   help=f"teacher sampling temperature (default {d('temperature')})")
    p.add_argument("--max-tokens", type=int, default=d("max_tokens"),
                   help=f"longest completion (default {d('max_tokens')})")
    p.add_argument("--steps", type=int, default=d("steps"), help=f"student SFT steps (default {d('steps')})")
    p.add_argument("--lr", type=float, default=d("lr"), help=f"student SFT learning rate (default {shown(d('lr'))})")
    p.add_argument("--eval-n", type=int, default=d("eval_n"),
                   help=f"test problems for the report (default {d('eval_n')})")
    p.add_argument("--seed", type=int, default=d("seed"), help=f"seed (default {d('seed')})")
    p.add_argument("--max-running", type=int, default=d("max_running"),
                   help=f"sequences decoded together (default {d('max_running')})")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def add_rft_arguments(p: argparse.ArgumentParser) -> None:
    """`nanoseek rft`'s flags: the fields of RFTConfig."""
    d = lambda name: default(RFTConfig, name)  # noqa: E731
    p.add_argument("--model", required=True, metavar="DIR", help="the start: the model dir a GRPO run starts from")
    p.add_argument("--task", required=True, type=task_name, metavar="TASK", help=TASK_HELP)
    p.add_argument("--out", required=True, metavar="RUN",
                   help="run dir: the samples, the SFT run and, at the end, the fine-tuned model")
    p.add_argument("--samples", type=int, default=d("samples"),
                   help="completions to draw in all; to match a GRPO run, its steps x prompts x group (x its "
                        f"resample draws) (default {d('samples')})")
    p.add_argument("--group", type=int, default=d("group"),
                   help=f"completions per problem, as GRPO's G (default {d('group')})")
    p.add_argument("--level", type=int, help="problems of one difficulty level (default: all, cycling)")
    p.add_argument("--temperature", type=float, default=d("temperature"),
                   help=f"sampling temperature (default {d('temperature'):g}, as GRPO's rollouts)")
    p.add_argument("--max-tokens", type=int, default=d("max_tokens"),
                   help=f"longest completion (default {d('max_tokens')})")
    p.add_argument("--keep-per-problem", type=int, default=d("keep_per_problem"),
                   help="distinct correct completions kept per problem (default 0: all)")
    p.add_argument("--steps", type=int, default=d("steps"), help=f"SFT steps (default {d('steps')})")
    p.add_argument("--lr", type=float, default=d("lr"), help=f"SFT peak learning rate (default {shown(d('lr'))})")
    p.add_argument("--warmup", type=int, default=d("warmup"), help=f"SFT warm-up steps (default {d('warmup')})")
    p.add_argument("--batch-size", type=int, default=d("batch_size"),
                   help=f"sequences per SFT step (default {d('batch_size')})")
    p.add_argument("--seq-len", type=int, default=d("seq_len"), help=f"tokens per SFT row (default {d('seq_len')})")
    p.add_argument("--save-every", type=int, default=d("save_every"),
                   help=f"checkpoint every N SFT steps (default {d('save_every')})")
    p.add_argument("--seed", type=int, default=d("seed"), help=f"seed for problems and sampling (default {d('seed')})")
    p.add_argument("--max-running", type=int, default=d("max_running"),
                   help=f"sequences decoded together (default {d('max_running')})")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
