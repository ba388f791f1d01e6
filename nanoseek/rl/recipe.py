"""R1's recipe as stages on model dirs, each scored under one protocol: what `nanoseek speedrun` runs
once and experiments/r1.py repeats over seeds.

    pretrained ─► r1zero                                  GRPO straight from the base (R1-Zero)
    pretrained ─► sft ─► rl ─► rejection ─► rl2            R1: cold start, GRPO, rejection + SFT, GRPO
                      └─► rft                             the control: RFT with as many samples as rl drew
    teacher ─► distill (a smaller pretrained student SFT'd on the teacher's verified answers)
    student ─► student_sft ─► student_rl                  the control: GRPO on the student itself

Every stage is scored by `score`: the same fixed test problems, greedy pass@1 and pass@k (k samples at
temperature 1, the unbiased estimator) per task and level, in the template the stage was trained in
(the pretrained model under both the plain and the R1-Zero template, its better one counting). Each
stage writes one run dir and resumes it after a stop; its callers keep the numbers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..data.tasks import TASKS, Problem, get_task
from ..plot import read_metrics
from ..train.args import SFTConfig, TrainConfig, TrainError
from .args import GRPOConfig, GRPORun


def scored_levels(task, headline: str, levels, task_levels=()) -> list[int]:
    """The levels of `task` a plan names for its labeled set and test problems: `levels` for the headline task,
    else its `task_levels` entry (a dict or (task, levels) pairs); [] where none of the task's are named."""
    wanted = levels if task.name == headline else dict(task_levels).get(task.name, ())
    return [lv for lv in wanted if lv in task.levels]


@dataclass(frozen=True)
class Protocol:
    """How every stage is scored: fixed test problems per task, greedy pass@1 and pass@k."""
    problems: dict[str, list[Problem]]
    k: int = 8
    max_tokens: int = 200
    seed: int = 0

    @classmethod
    def build(cls, n: int, headline: str, levels: list[int], tasks: list[str],
              task_levels=(), **kw) -> "Protocol":
        """n test problems per task, spread evenly over its levels (for the headline task: `levels`; for
        another task: its `task_levels` entry, a dict or (task, levels) pairs as a plan keeps them, else all
        the task has)."""
        if kw.get("k", 2) < 2:
            raise ValueError(f"pass@k needs k >= 2 samples per problem (got {kw['k']}); pass@1 is the greedy score")
        out = {}
        for name in dict.fromkeys([headline, *tasks]):
            task = TASKS[name]
            lvs = scored_levels(task, headline, levels, task_levels) or list(task.levels)
            out[name] = [p for i, lv in enumerate(lvs)
                         for p in task.problems("test", n // len(lvs) + (i < n % len(lvs)), level=lv, strict=False)]
        return cls(out, **kw)

    def levels(self) -> dict[str, list[int]]:
        return {t: sorted({p.level for p in ps}) for t, ps in self.problems.items()}


def score(model_dir: str | Path, template: str, protocol: Protocol, say: Callable[[str], None] = print) -> dict:
    """Greedy pass@1 and pass@k of a model dir, per task and level, in one template."""
    from ..checkpoint import load_model, resolve_device
    from ..engine.engine import Engine
    from ..tokenizer import Tokenizer
    from .evaluate import evaluate, pass_at_k

    engine = Engine(load_model(model_dir, device=resolve_device()), Tokenizer.load(model_dir), max_running=128)
    k, result = protocol.k, {}
    for name, probs in protocol.problems.items():
        rep = evaluate(engine, TASKS[name], probs, k=k, temperature=1.0, max_tokens=protocol.max_tokens,
                       template=template, seed=protocol.seed)
        levels: dict[str, list] = {}
        for r in rep.problems:
            levels.setdefault(str(r.level), []).append(r)
        result[name] = {"n": rep.n, "pass1": rep.pass1, "pass_k": rep.pass_k, "k": k, "format": rep.format_rate,
                        "mean_tokens": rep.mean_tokens, "template": template,
                        "correct": [int(r.greedy_correct) for r in rep.problems],  # for paired differences
                        "levels": {lv: {"n": len(rs), "pass1": sum(r.greedy_correct for r in rs) / len(rs),
                                        "pass_k": sum(pass_at_k(r.samples, r.samples_correct, k) for r in rs) / len(rs)}
                                   for lv, rs in sorted(levels.items(), key=lambda x: int(x[0]))},
                        "examples": [{"prompt": p.prompt, "completion": r.greedy, "correct": r.greedy_correct}
                                     for p, r in list(zip(probs, rep.problems))[:: max(1, len(probs) // 4)][:4]]}
        say(f"  {name}: pass@1 {rep.pass1:.1%}, pass@{k} {rep.pass_k:.1%} ({rep.n} test problems, {template} template)")
    return result


def base_templates(chat_turns: bool) -> tuple[str, ...]:
    """What a pretrained model is scored in: the plain and the R1-Zero template, and the chat template where
    its corpus had chat turns (a plan's corpus_chat)."""
    return ("plain", "r1-zero") + (("chat",) if chat_turns else ())


def score_base(model_dir: str | Path, protocol: Protocol, headline: str, say: Callable[[str], None] = print,
               templates: tuple[str, ...] = ("plain", "r1-zero")) -> dict:
    """The pretrained model under the plain and the R1-Zero template (and the chat template, where the
    corpus had chat turns); the one better on the headline task counts (picked on the test problems
    themselves, so the base's score leans high, never low)."""
    runs = {t: score(model_dir, t, protocol, say) for t in templates}
    best = max(runs, key=lambda t: (runs[t][headline]["pass1"], runs[t][headline]["pass_k"]))
    return {"eval": runs[best], "template": best, **runs}


@dataclass(frozen=True)
class RL:
    """The settings every GRPO stage of the recipe shares (docs/grpo.md: two stages in one run, the second
    resampling groups without signal and anchored at the first's policy)."""
    task: str
    level: int | None = None
    steps: int = 100
    prompts: int = 16
    group: int = 8
    max_tokens: int = 200
    lr: float = 2e-4
    beta: float = 0.04
    warmup: int = 10
    resample: int = 2
    advantage_scale: str = "std"
    temperature: float = 1.0  # rollouts' sampling temperature (R1-Zero: 1)
    curve_n: int = 100  # held-out test problems of each point of the curve over the steps
    inner_updates: int = 1  # optimizer steps per batch of rollouts (mu); from 2 the PPO clip acts
    clip_eps: float = 0.2
    quiet: bool = True

    def config(self, template: str, seed: int, steps: int | None = None) -> GRPOConfig:
        half = (steps or self.steps) // 2
        return GRPOConfig(self.task, level=self.level, prompts=self.prompts, group=self.group,
                          max_tokens=self.max_tokens, lr=self.lr, beta=self.beta, seed=seed, warmup=self.warmup,
                          averaging="token", normalize="signal", advantage_scale=self.advantage_scale,
                          resample=self.resample, resample_from=half, ref_refresh=half, template=template,
                          temperature=self.temperature, inner_updates=self.inner_updates, clip_eps=self.clip_eps)


def finished(run: str | Path) -> Path:
    """A training run that stopped early (Ctrl-C) leaves no model at its top: never score a checkpoint."""
    run = Path(run)
    if not any(run.glob("*.safetensors")):
        raise Stopped(run)
    return run


class Stopped(Exception):
    """A training stage left early (Ctrl-C) after saving a checkpoint; rerunning continues it."""


# the second GRPO stage's draws are at its seed + this: not the first stage's problems again, nor (for seeds run
# side by side, 0 1 2 ...) another seed's
RL2_SEED = 1_000


def grpo(start: str | Path, out: str | Path, rl: RL, template: str, seed: int, steps: int | None = None) -> dict:
    """GRPO from `start` into OUT: samples drawn, seconds, reward and response length at the start and the end,
    and the held-out curve (greedy pass@1 and response length over the steps)."""
    from ..rl import train

    steps = rl.steps if steps is None else steps
    out = Path(out)
    train.run(GRPORun(model=str(start), out=str(out), grpo=rl.config(template, seed, steps), steps=steps,
                      save_every=max(5, steps // 6), eval_every=max(1, steps // 10), eval_n=rl.curve_n, resume=True,
                      quiet=rl.quiet))
    rows = read_metrics(finished(out))
    ends = {f"{edge}_{key}": sum(r[key] for r in part) / len(part)
            for edge, part in (("first", rows[:10]), ("last", rows[-10:])) for key in ("reward", "response_length")}
    return {"steps": len(rows), "samples": int(sum(r.get("draws", 1) for r in rows) * rl.prompts * rl.group),
            "seconds": sum(r["seconds"] for r in rows), "template": template, **ends,
            "curve": [json.loads(x) for x in (out / "eval.jsonl").read_text().splitlines()]}


def sft(start: str | Path, data: list[str | Path], out: str | Path, steps: int, lr: float, seed: int,
        quiet: bool = True, precision: str = "auto") -> Path:
    """Supervised fine-tuning of `start` on chat examples into OUT (resumed after a stop), in `precision` (a plan's:
    the same precision whatever the host's load when the stage starts)."""
    from ..train import sft as sft_loop

    sft_loop.run(SFTConfig(model=str(start), data=[str(d) for d in data],
                           train=TrainConfig(out=str(out), steps=steps, lr=lr, warmup=max(1, steps // 10), seed=seed,
                                             resume=True, quiet=quiet, save_every=max(10, steps // 3),
                                             precision=precision)))
    return finished(out)


def verified_sft(teacher: str | Path, start: str | Path, out: str | Path, task: str, problems: int, k: int,
                 temperature: float, max_tokens: int, steps: int, lr: float, seed: int, level: int | None = None,
                 keep_per_problem: int = 0, extra: list[str | Path] = (), salt: int = 0, quiet: bool = True,
                 precision: str = "auto") -> dict:
    """`teacher` answers `problems` fresh train problems k times each; `start` is fine-tuned on the verified
    answers (and `extra` chat examples) into OUT. RFT (teacher = start, GRPO's sample count), R1's
    rejection-sampling stage (teacher = the RL model, start = the base, extra = the labeled set) and
    distillation (start = a smaller student) are this one function, each with its own `salt` so that
    each draws problems of its own. The fine-tuning computes in `precision`, as `sft`. The sampling counts;
    rft.NothingVerified when none was right."""
    from .rft import sample_and_sft

    out = Path(out)
    try:
        # other problems than GRPO draws at the same seed (its seeds are seed * 1_000_003 + step); salt 0 draws
        # what `nanoseek rft` draws
        practised = get_task(task)
        probs = practised.problems("train", problems, level=level, seed=seed * 1_000_003 - 1 - salt, strict=False)
    except ValueError as e:
        raise TrainError(str(e)) from None
    stats = sample_and_sft(teacher, start, out / "samples.jsonl", practised, probs, k, temperature, max_tokens,
                           keep_per_problem, extra=list(extra),
                           train=TrainConfig(out=str(out), steps=steps, lr=lr, warmup=max(1, steps // 10), seed=seed,
                                             quiet=quiet, save_every=max(10, steps // 3), precision=precision))
    finished(out)
    return stats


def pretrain(speedrun_dir: str | Path, out: str | Path, steps: int, plan: dict, seed: int = 0, quiet: bool = True,
             train: dict | None = None, **model) -> Path:
    """Pretrain into OUT on a speedrun dir's tokens and tokenizer with its plan's settings (`plan`: the plan as a
    dict), resumed after a stop; `model` is the preset or config, `train` overrides TrainConfig fields (e.g.
    decay_frac). The speedrun's base, the scripts' students and experiments/bases.py's seeds."""
    from ..train import pretrain as pretrain_loop
    from ..train.args import PretrainConfig

    speedrun_dir = Path(speedrun_dir)
    pretrain_loop.run(PretrainConfig(
        data=str(speedrun_dir / "data" / "tokens"), tokenizer=str(speedrun_dir / "tokenizer"), mix=plan["mix"],
        curriculum=plan.get("curriculum", False), **model,
        train=TrainConfig(out=str(out), steps=steps, lr=plan["pretrain_lr"], warmup=max(1, min(50, steps // 10)),
                          balance_mtp=plan.get("balance_mtp", True),
                          batch_size=plan["batch_size"], seq_len=plan["seq_len"], seed=seed, resume=True, quiet=quiet,
                          save_every=max(10, steps // 8),
                          **{"precision": plan.get("precision", "auto"), **(train or {})})))
    return finished(out)


def student_config(teacher_preset: str, layers: int, path: Path) -> Path:
    """The teacher's shape at `layers` layers (the first stays dense, as in the teacher), as a config file."""
    from ..config import preset
    from ..io import write_atomic

    cfg = preset(teacher_preset)
    cfg = cfg.replace(num_hidden_layers=layers, first_k_dense_replace=min(cfg.first_k_dense_replace, layers))
    write_atomic(path, json.dumps(cfg.to_hf_dict(), indent=2))
    return path
