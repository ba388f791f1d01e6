"""`nanoseek rft`: rejection-sampling fine-tuning, the control GRPO has to beat.

    nanoseek rft --model runs/x/sft --task arithmetic --level 2 --samples 12800 --group 8 --steps 100 --out runs/x/rft

From the same start as a GRPO run, draw as many completions as GRPO sampled (--samples, --group
per problem, temperature 1, on fresh train problems of the same level), keep those the task's
verifier accepts (distinct per problem), and fine-tune the start on them with the SFT loop (RFT,
Yuan et al. 2023; RAFT's positive-only update). GRPO's edge over this is what its advantages,
negative samples and on-policy updates add; without the control a GRPO gain could be plain
self-distillation of the model's own correct answers.

RUN/ holds rft.jsonl (the kept completions as chat examples), samples.json (the counts; written
last, so a rerun reuses the samples), and the SFT run: checkpoints/, metrics.jsonl and, at the
end, the fine-tuned model's files at the top of RUN.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

from ..checkpoint import load_model, resolve_device
from ..data.tasks import Problem, Task, get_task
from ..engine.engine import Engine
from ..io import write_atomic
from ..tokenizer import Tokenizer
from ..train import dist, sft
from ..train.args import SFTConfig, TrainConfig, TrainError
from .args import RFTConfig
from .evaluate import answer_params, completion_text, prompt_ids


def rejection_sample(engine: Engine, task: Task, problems: list[Problem], k: int, temperature: float,
                     max_tokens: int, keep_per_problem: int, seed: int, progress: bool = False,
                     world: dist.World = dist.World()) -> tuple[list[dict], dict]:
    """k completions per problem; the distinct ones the task verifies, at most `keep_per_problem` each (0: all),
    as chat examples, and counts. Under torchrun each rank answers every world_size-th problem with the seeds
    one process would use, and every rank gets all the examples in one process's order."""
    tok = engine.tok
    mine = list(range(world.rank, len(problems), world.world_size))
    ids = [prompt_ids(tok, problems[i], "chat") for i in mine]
    params = [answer_params(tok, temperature=temperature, max_tokens=max_tokens, seed=seed * 1_000_003 + i * k + j)
              for i in mine for j in range(k)]
    reqs = engine.generate([x for x in ids for _ in range(k)], params,
                           progress="rejection sampling" if progress and world.main else None)
    kept_by_problem, correct = {}, 0
    for n, i in enumerate(mine):
        kept: list[str] = []
        for r in reqs[n * k:(n + 1) * k]:
            text = completion_text(tok, r).strip()
            if task.verify(problems[i], text):
                correct += 1
                if text not in kept and (not keep_per_problem or len(kept) < keep_per_problem):
                    kept.append(text)
        kept_by_problem[i] = kept
    shares = dist.gather_objects((kept_by_problem, correct), world)
    kept_by_problem = {i: kept for share, _ in shares for i, kept in share.items()}
    correct = sum(c for _, c in shares)
    examples = [{"messages": [{"role": "user", "content": p.prompt}, {"role": "assistant", "content": t}]}
                for i, p in enumerate(problems) for t in kept_by_problem[i]]
    return examples, {"samples": len(problems) * k, "correct_samples": correct, "problems": len(problems),
                      "problems_solved": sum(map(bool, kept_by_problem.values())), "examples": len(examples)}


class NothingVerified(TrainError):
    """Rejection sampling kept nothing: no sample was right, so there is nothing to fine-tune on."""


def sample_once(run: Path, name: str, sample: Callable[[], tuple[list[dict], dict]], none_kept: str,
                world: dist.World = dist.World()) -> dict:
    """The counts of the chat examples in RUN/name: drawn by `sample()` and written (the examples, then
    RUN/samples.json, atomically: the counts mark them complete), or a previous run's, reused. Under torchrun
    every rank samples its share and rank 0 writes."""
    data, counts = run / name, run / "samples.json"
    if data.exists() and counts.exists():
        return json.loads(counts.read_text())
    t0 = time.perf_counter()
    examples, stats = sample()
    if not examples:
        raise NothingVerified(none_kept)
    stats["seconds"] = time.perf_counter() - t0
    if world.main:
        write_atomic(data, "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in examples))
        write_atomic(counts, json.dumps(stats, indent=2))
    dist.barrier(world)
    return stats


def sample_and_sft(teacher: str | Path, start: str | Path, data: Path, task: Task, problems: list[Problem], k: int,
                   temperature: float, max_tokens: int, keep_per_problem: int, train: TrainConfig,
                   extra: list[str] = (), max_running: int = 64, none_kept: str = "") -> dict:
    """Rejection sampling, then SFT: `teacher` answers each problem k times; the verified distinct answers are
    written to `data` (the counts to samples.json beside it; a rerun reuses both) and `start` is fine-tuned on
    them, and on the chat examples of the files in `extra`, as `train` says (resuming its run). What RFT,
    R1's rejection-sampling stage and distillation share; returns the sampling counts."""
    world = dist.init()  # under torchrun: the sampling shared out, the SFT data parallel with the same global batch
    if train.batch_size % world.world_size:
        raise TrainError(f"the SFT batch ({train.batch_size} rows) does not split over {world.world_size} processes: "
                         f"use a process count that divides it (or a --batch-size it divides, where the command "
                         f"has the flag)")

    def sample() -> tuple[list[dict], dict]:
        device = world.device if world.world_size > 1 else resolve_device()
        engine = Engine(load_model(teacher, device=device), Tokenizer.load(teacher), max_running=max_running)
        return rejection_sample(engine, task, problems, k, temperature, max_tokens, keep_per_problem, train.seed,
                                progress=not train.quiet, world=world)

    data.parent.mkdir(parents=True, exist_ok=True)
    stats = sample_once(data.parent, data.name, sample, none_kept or (
        f"{teacher} answered none of {len(problems)} {task.name} problems right in {k} tries each: nothing to "
        f"fine-tune on"), world)
    if not train.quiet and world.main:
        print(f"rejection sampling: {stats['correct_samples']} of {stats['samples']} samples correct, "
              f"{stats['problems_solved']} of {stats['problems']} problems solved, {stats['examples']} examples")
    train = replace(train, resume=(Path(train.out) / "checkpoints").exists(),
                    batch_size=train.batch_size // world.world_size)
    sft.run(SFTConfig(model=str(start), data=[str(data), *map(str, extra)], train=train))
    return stats


def run(cfg: RFTConfig) -> dict:
    """RFT as `cfg` says; returns the sampling counts (RUN/samples.json). RUN is the fine-tuned model dir once
    every SFT step ran."""
    for name in ("samples", "group", "max_tokens", "steps", "max_running"):
        if getattr(cfg, name) < 1:
            raise TrainError(f"--{name.replace('_', '-')} must be >= 1 (got {getattr(cfg, name)})")
    if cfg.samples % cfg.group:
        raise TrainError(f"--samples ({cfg.samples}) must be a multiple of --group ({cfg.group}): every problem "
                         f"gets a whole group, as in GRPO")
    if cfg.keep_per_problem < 0 or not cfg.temperature >= 0 or not cfg.lr > 0:
        raise TrainError(f"--keep-per-problem and --temperature must be >= 0 and --lr > 0 (got "
                         f"{cfg.keep_per_problem}, {cfg.temperature}, {cfg.lr})")
    try:
        task = get_task(cfg.task)
        # other problems than a GRPO run of the same seed draws (its seeds are seed * 1_000_003 + step)
        problems = task.problems("train", cfg.samples // cfg.group, level=cfg.level, seed=cfg.seed * 1_000_003 - 1)
    except ValueError as e:
        raise TrainError(str(e)) from None
    return sample_and_sft(
        cfg.model, cfg.model, Path(cfg.out) / "rft.jsonl", task, problems, cfg.group, cfg.temperature, cfg.max_tokens,
        cfg.keep_per_problem, max_running=cfg.max_running,
        none_kept=f"none of the {cfg.samples} samples was correct: nothing to fine-tune on (an easier --level, or "
                  f"more --samples)",
        train=TrainConfig(out=cfg.out, steps=cfg.steps, lr=cfg.lr, warmup=cfg.warmup, batch_size=cfg.batch_size,
                          seq_len=cfg.seq_len, seed=cfg.seed, save_every=cfg.save_every, quiet=cfg.quiet))
