"""`nanoseek distill`: R1's distillation in miniature — rejection-sample a teacher, SFT a student.

    nanoseek distill --teacher runs/x/rl --student runs/x/small-base --task arithmetic --out runs/x/distill
    torchrun --nproc_per_node=2 -m nanoseek distill ...   # the ranks share the sampling, then train data parallel

1. The teacher answers --problems train problems --k times each (temperature --temperature,
   through the engine); only completions the task's verifier accepts are kept, at most
   --keep-per-problem per problem, duplicates dropped (DeepSeek-R1 kept ~600K verified samples
   this way). They are written to RUN/distill.jsonl in the chat format.
2. The student is fine-tuned on them with `sft.run` (RUN/student is that SFT run; its
   final model dir is the distilled student).
3. Teacher and student are evaluated greedily on the same fixed test problems; RUN/report.json
   holds both accuracies and the data statistics.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..checkpoint import load_model, resolve_device
from ..data.tasks import get_task
from ..engine.engine import Engine
from ..io import write_atomic
from ..tokenizer import Tokenizer
from ..train import dist
from ..train.args import TrainConfig, TrainError
from .args import DistillConfig
from .evaluate import evaluate
from .rft import sample_and_sft


def run(cfg: DistillConfig) -> dict:
    """Distil as `cfg` says; returns (and writes to RUN/report.json) the teacher's and student's accuracies."""
    for name in ("problems", "k", "keep_per_problem", "max_tokens", "eval_n", "steps"):
        if getattr(cfg, name) < 1:
            raise TrainError(f"--{name.replace('_', '-')} must be >= 1 (got {getattr(cfg, name)})")
    if not cfg.temperature >= 0 or not cfg.lr > 0:
        raise TrainError(f"--temperature must be >= 0 and --lr > 0 (got {cfg.temperature}, {cfg.lr})")
    try:
        task = get_task(cfg.task)
        problems = task.problems("train", cfg.problems, seed=cfg.seed)
        test = task.problems("test", cfg.eval_n)
    except ValueError as e:
        raise TrainError(str(e)) from None
    run = Path(cfg.out)
    student_run = run / "student"
    world = dist.init()  # under torchrun: the sampling shared out, the SFT data parallel, rank 0 evaluates
    stats = sample_and_sft(
        cfg.teacher, cfg.student, run / "distill.jsonl", task, problems, cfg.k, cfg.temperature, cfg.max_tokens,
        cfg.keep_per_problem, max_running=cfg.max_running,
        none_kept=f"the teacher solved none of the {len(problems)} problems in {cfg.k} tries each; nothing to distil "
                  f"(train the teacher more, or raise --k)",
        train=TrainConfig(out=str(student_run), steps=cfg.steps, lr=cfg.lr, seed=cfg.seed, quiet=cfg.quiet))
    if not world.main:
        return stats
    device = resolve_device()  # evaluation on a GPU if there is one, as the sampling and the student's SFT
    teacher = Engine(load_model(cfg.teacher, device=device), Tokenizer.load(cfg.teacher), max_running=cfg.max_running)
    student = Engine(load_model(student_run, device=device), Tokenizer.load(student_run), max_running=cfg.max_running)
    before = evaluate(Engine(load_model(cfg.student, device=device), Tokenizer.load(cfg.student),
                             max_running=cfg.max_running), task, test, max_tokens=cfg.max_tokens)
    t_rep = evaluate(teacher, task, test, max_tokens=cfg.max_tokens)
    s_rep = evaluate(student, task, test, max_tokens=cfg.max_tokens)
    report = {"task": task.name, "test_problems": len(test), "teacher_pass1": t_rep.pass1,
              "student_before_pass1": before.pass1, "student_after_pass1": s_rep.pass1, **stats,
              "teacher_parameters": teacher.model.num_parameters(),
              "student_parameters": student.model.num_parameters()}
    write_atomic(run / "report.json", json.dumps(report, indent=2))
    print(f"{task.name} test pass@1 (greedy, {len(test)} problems): teacher {t_rep.pass1:.1%}; student "
          f"{before.pass1:.1%} before, {s_rep.pass1:.1%} after distillation")
    return report
