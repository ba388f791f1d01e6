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
from pathlib import Path
from typing import Callable

from ..checkpoint import load_model, resolve_device
from ..data.tasks import Problem, Task, get_task
from ..engine.engine import Engine
from ..io import write_atomic
from ..tokenizer import Tokenizer
from ..train import sft
from ..train.args import SFTConfig, TrainConfig, TrainError
from .args import RFTConfig
from .evaluate import answer_params, completion_text, prompt_ids


def rejection_sample(engine: Engine, task: Task, problems: list[Problem], k: int, temperature: float,
                     max_tokens: int, keep_per_problem: int, seed: int) -> tuple[list[dict], dict]:
    """k completions per problem; the distinct ones the task verifies, at most `keep_per_problem` each (0: all),
    as chat examples, and counts."""
    tok = engine.tok
    ids = [prompt_ids(tok, p, "chat") for p in problems]
    params = [answer_params(tok, temperature=temperature, max_tokens=max_tokens, seed=seed * 1_000_003 + i)
              for i in range(len(problems) * k)]
    reqs = engine.generate([x for x in ids for _ in range(k)], params)
    examples, correct, solved = [], 0, 0
    for i, p in enumerate(problems):
        kept: list[str] = []
        for r in reqs[i * k:(i + 1) * k]:
            text = completion_text(tok, r).strip()
            if task.verify(p, text):
                correct += 1
                if text not in kept and (not keep_per_problem or len(kept) < keep_per_problem):
                    kept.append(text)
        solved += bool(kept)
        examples += [{"messages": [{"role": "user", "content": p.prompt}, {"role": "assistant", "content": t}]}
                     for t in kept]
    return examples, {"samples": len(reqs), "correct_samples": correct, "problems": len(problems),
                      "problems_solved": solved, "examples": len(examples)}


def sample_once(run: Path, name: str, sample: Callable[[], tuple[list[dict], dict]], none_kept: str) -> dict:
    """The counts of the chat examples in RUN/name: drawn by `sample()` and written (the examples, then
    RUN/samples.json, atomically: the counts mark them complete), or a previous run's, reused."""
    data, counts = run / name, run / "samples.json"
    if data.exists() and counts.exists():
        return json.loads(counts.read_text())
    t0 = time.perf_counter()
    examples, stats = sample()
    if not examples:
        raise TrainError(none_kept)
    write_atomic(data, "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in examples))
    stats["seconds"] = time.perf_counter() - t0
    write_atomic(counts, json.dumps(stats, indent=2))
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
    run_dir = Path(cfg.out)
    run_dir.mkdir(parents=True, exist_ok=True)
    def sample() -> tuple[list[dict], dict]:
        engine = Engine(load_model(cfg.model, device=resolve_device()), Tokenizer.load(cfg.model),
                        max_running=cfg.max_running)
        return rejection_sample(engine, task, problems, cfg.group, cfg.temperature, cfg.max_tokens,
                                cfg.keep_per_problem, cfg.seed)

    data = run_dir / "rft.jsonl"
    stats = sample_once(run_dir, data.name, sample, f"none of the {cfg.samples} samples was correct: nothing to "
                                                    f"fine-tune on (an easier --level, or more --samples)")
    if not cfg.quiet:
        print(f"rejection sampling: {stats['correct_samples']} of {stats['samples']} samples correct, "
              f"{stats['problems_solved']} of {stats['problems']} problems solved, {stats['examples']} examples")
    sft.run(SFTConfig(model=cfg.model, data=[str(data)],
                      train=TrainConfig(out=str(run_dir), steps=cfg.steps, lr=cfg.lr, warmup=cfg.warmup,
                                        batch_size=cfg.batch_size, seq_len=cfg.seq_len, seed=cfg.seed,
                                        save_every=cfg.save_every, resume=(run_dir / "checkpoints").exists(),
                                        quiet=cfg.quiet)))
    return stats
