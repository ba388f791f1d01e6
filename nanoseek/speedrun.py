"""`nanoseek speedrun`: DeepSeek's whole system, end to end, on one machine, with a report card.

    nanoseek speedrun --out runs/first          # about 40 minutes on 2 CPU cores
    nanoseek speedrun --out runs/try --quick    # a few minutes, a tiny model

Stages, each in its own dir under OUT, each skipped when a rerun finds it done:

    data       generate a raw corpus (task solutions, prose, code, Chinese, junk, duplicates),
               curate it (clean, filter, de-duplicate, classify), and write the SFT set:
               at most 500 labeled train-split problems with their answers, a share of them
               (the plan's sft_worked) also with the worked solution
    tokenizer  train the byte-level BPE tokenizer on the curated text
    tokens     tokenize the curated shards
    pretrain   MoE + MLA with MTP and auxiliary-loss-free balancing, then evaluate
    sft        supervised fine-tuning on the labeled set, then evaluate
    more_sft   the control: continue SFT on the same labeled set (as many steps again), evaluate
    rl         GRPO with rule rewards on the task, then evaluate
    distill    (--distill) pretrain a shallower student on the same tokens, rejection-sample the
               RL model's verified answers, SFT the student on them, evaluate
    report     report/report.md with tables and PNG plots

Each stage records what it measured in OUT/stages/NAME.json once it has finished; the training
stages checkpoint as they go, so a rerun after a crash or Ctrl-C continues mid-stage. The
settings are kept in OUT/speedrun.json and a rerun with different ones is refused.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from .io import write_atomic
from .rl.args import DistillConfig, GRPOConfig, GRPORun
from .train.args import PretrainConfig, SFTConfig, TrainConfig, TrainError


@dataclass(frozen=True)
class Plan:
    """Everything a speedrun does, sized for a budget."""
    preset: str
    corpus_mb: float
    vocab_size: int
    mix: str
    pretrain_steps: int
    pretrain_lr: float
    batch_size: int
    seq_len: int
    sft_examples: int
    sft_steps: int
    sft_lr: float
    sft_worked: float  # share of the task's labeled examples with the worked solution; the rest: the answer only
    task: str
    levels: tuple[int, ...]  # difficulty levels of the task's SFT examples and evaluations
    grpo_level: int  # the level GRPO practises on (its prompts only: no labels)
    grpo_steps: int
    grpo_prompts: int
    grpo_group: int
    grpo_lr: float
    grpo_beta: float
    grpo_warmup: int  # steps of linear lr warm-up
    grpo_averaging: str  # sequence (GRPO as published) or token
    grpo_normalize: str  # batch (the published mean over all P x G) or signal (over groups with variance)
    grpo_resample: int  # DAPO's dynamic sampling: extra draws per step while groups lack signal
    grpo_stage2: int  # the step (0-based) from which GRPO resamples, anchored at that step's policy
    max_tokens: int  # longest completion in GRPO and evaluation
    eval_n: int  # test problems per task and stage
    distill_layers: int  # the student: the same width as the teacher, this many layers, pretrained
    distill_pretrain_steps: int  # on the same tokens, before it learns from the teacher
    distill_problems: int
    distill_steps: int
    seed: int = 0

    def levels_in(self, task) -> list[int]:
        """The plan's levels that `task` has (none, e.g., for Countdown under the arithmetic levels)."""
        return [lv for lv in self.levels if lv in task.levels]


# The corpus is mostly worked arithmetic solutions (levels 2 and 3 weighted up), with prose, code
# and Chinese kept for the curation, classification and tokenizer to work on. The loader mixes by
# documents and a prose document is several solutions long, so the mix weights math far above the
# rest to keep most pretraining tokens on arithmetic (docs/log.md has the corpora tried). A quarter
# of the task documents sort 3-4 numbers, the second task RL works on; Countdown's searches need
# one-line products a model this small cannot do, so they are left out.
CORPUS_KINDS = {"math": 0.9, "prose": 0.06, "code": 0.02, "chinese": 0.02}
CORPUS_TASKS = {"arithmetic": (1, 2, 2, 3, 3, 3), "sort": (3, 4)}

PLANS = {
    # The labeled set: 500 answers, a share (sft_worked) of the arithmetic ones with the working
    # written out. GRPO: the two-stage recipe of docs/grpo.md (plain GRPO, then dynamic sampling
    # anchored at the first stage's policy) after an lr warm-up, on level 2. docs/log.md has the
    # runs behind these choices.
    "full": Plan(preset="small", corpus_mb=12, vocab_size=4096, mix="math=400,prose=2,code=1",
                 pretrain_steps=1400, pretrain_lr=3e-3, batch_size=8, seq_len=256,
                 sft_examples=500, sft_steps=150, sft_lr=5e-4, sft_worked=0.4, task="arithmetic", levels=(1, 2, 3),
                 grpo_level=2,
                 grpo_steps=100, grpo_prompts=16, grpo_group=8, grpo_lr=2e-4, grpo_beta=0.04, grpo_warmup=10,
                 grpo_averaging="token", grpo_normalize="signal", grpo_resample=2, grpo_stage2=50,
                 max_tokens=200,
                 eval_n=150, distill_layers=2, distill_pretrain_steps=700, distill_problems=300,
                 distill_steps=200),
    "quick": Plan(preset="tiny", corpus_mb=1.5, vocab_size=512, mix="math=130,prose=2,code=1",
                  pretrain_steps=60, pretrain_lr=3e-3, batch_size=8, seq_len=128,
                  sft_examples=100, sft_steps=20, sft_lr=1e-3, sft_worked=0.4, task="arithmetic", levels=(1, 2),
                  grpo_level=2,
                  grpo_steps=3, grpo_prompts=4, grpo_group=4, grpo_lr=1e-5, grpo_beta=0.04, grpo_warmup=2,
                  grpo_averaging="token", grpo_normalize="batch", grpo_resample=1, grpo_stage2=2,
                  max_tokens=48,
                  eval_n=16, distill_layers=1, distill_pretrain_steps=20, distill_problems=16,
                  distill_steps=10),
}

STAGES = ("data", "tokenizer", "tokens", "pretrain", "sft", "more_sft", "rl", "distill", "report")


class SpeedrunError(Exception):
    """A speedrun that cannot start or continue; printed without a traceback."""


class Stopped(Exception):
    """A training stage left early (Ctrl-C) after saving a checkpoint."""


def _finished(run: Path) -> None:
    """Training commands export the final model at the top of RUN, weights last, only when every step ran."""
    if not any(run.glob("*.safetensors")):
        raise Stopped(run)


def _mean(rows: list[dict], key: str) -> float | None:
    vals = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
    return sum(vals) / len(vals) if vals else None


class Speedrun:
    def __init__(self, out: str | Path, plan: Plan, distill: bool = False, quiet: bool = False):
        self.out, self.plan, self.distill, self.quiet = Path(out), plan, distill, quiet
        self.records: dict[str, dict] = {}

    # ---- bookkeeping -------------------------------------------------------------------------

    def _check_settings(self) -> None:
        settings = self.out / "speedrun.json"
        mine = {"plan": asdict(self.plan), "distill": self.distill}
        mine["plan"]["levels"] = list(self.plan.levels)
        if settings.exists():
            theirs = json.loads(settings.read_text())
            if theirs["plan"] != mine["plan"]:
                diff = [f"{k}: {theirs['plan'].get(k)!r} there, {v!r} now" for k, v in mine["plan"].items()
                        if theirs["plan"].get(k) != v]
                raise SpeedrunError(f"{self.out} holds a speedrun with other settings ({'; '.join(diff)}); rerun "
                                    f"it with the same flags to continue, or pick a new --out")
        self.out.mkdir(parents=True, exist_ok=True)
        write_atomic(settings, json.dumps(mine, indent=2))

    def _say(self, text: str) -> None:
        if not self.quiet:
            print(text, flush=True)

    def run(self) -> Path:
        self._check_settings()
        start = time.perf_counter()
        stages = [s for s in STAGES if s != "distill" or self.distill]
        ran = False
        for i, name in enumerate(stages, 1):
            marker = self.out / "stages" / f"{name}.json"
            if marker.exists() and not (name == "report" and ran):  # a stage that ran means a new report
                self.records[name] = json.loads(marker.read_text())
                self._say(f"[{i}/{len(stages)}] {name}: done already ({self.records[name]['seconds']:.0f} s), skipped")
                continue
            self._say(f"[{i}/{len(stages)}] {name} ...")
            t0 = time.perf_counter()
            ran = True
            record = getattr(self, f"stage_{name}")()
            record["seconds"] = time.perf_counter() - t0
            self.records[name] = record
            marker.parent.mkdir(exist_ok=True)
            write_atomic(marker, json.dumps(record, indent=2))
            self._say(f"[{i}/{len(stages)}] {name}: {record['seconds']:.0f} s")
        report = self.out / "report" / "report.md"
        self._say(f"speedrun finished in {time.perf_counter() - start:.0f} s (this invocation): {report}")
        return report

    # ---- stages ------------------------------------------------------------------------------

    def _tasks(self):
        from .data.tasks import TASKS
        return [TASKS[self.plan.task]] + [t for name, t in TASKS.items() if name != self.plan.task]

    def _problems(self, task, split: str, n: int, seed: int | None = None):
        """n problems spread over the plan's levels (the task's own levels for the other tasks)."""
        levels = self.plan.levels_in(task) if task.name == self.plan.task else []
        if not levels:
            return task.problems(split, n, seed=seed)
        out = []
        for i, lv in enumerate(levels):
            share = n // len(levels) + (i < n % len(levels))
            out += task.problems(split, share, level=lv, seed=seed, strict=False)  # small levels give what they have
        return out

    def stage_data(self) -> dict:
        from .data.corpus import write_corpus
        from .data.curate import CurateConfig, curate

        p = self.plan
        raw = self.out / "data" / "raw"
        if raw.exists():
            shutil.rmtree(raw)
        files = write_corpus(raw, p.corpus_mb, seed=p.seed, kinds=CORPUS_KINDS, tasks=CORPUS_TASKS)
        raw_mb = sum(f.stat().st_size for f in files) / 1e6
        report = curate([str(raw)], self.out / "data" / "curated", CurateConfig(), workers=os.cpu_count() or 1,
                        progress=not self.quiet)
        if not self.quiet:
            print(report.table())
        shutil.rmtree(raw)  # the curated shards are what the next stages read
        tasks = self._tasks()
        examples, counts = [], {}
        for i, task in enumerate(tasks):  # most of the labeled budget for the RL task, the rest shared
            n = p.sft_examples - (len(tasks) - 1) * (p.sft_examples // 5) if i == 0 else p.sft_examples // 5
            problems = self._problems(task, "train", n, seed=p.seed + 1)
            # the RL task's labels: every answer, the working for a seeded share; other tasks fully worked
            k = round(p.sft_worked * len(problems)) if i == 0 else len(problems)
            worked = set(random.Random(p.seed + 2).sample(range(len(problems)), k))
            counts[task.name] = {"examples": len(problems), "worked": k}
            examples += [{"messages": [{"role": "user", "content": q.prompt},
                                       {"role": "assistant",
                                        "content": task.solution(q) if j in worked else task.brief(q)}]}
                         for j, q in enumerate(problems)]
        write_atomic(self.out / "data" / "sft.jsonl", "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in examples))
        curated = report.as_dict()
        curated.pop("shards")
        return {"raw_megabytes": raw_mb, "curate": curated, "sft_examples": counts}

    def _train(self, **settings) -> TrainConfig:
        """A training stage's loop settings, resuming a stopped run."""
        return TrainConfig(resume=True, quiet=self.quiet, **settings)

    def _pretrain(self, run: Path, steps: int, **model) -> None:
        from .train import pretrain

        p = self.plan
        pretrain.run(PretrainConfig(
            data=str(self.out / "data" / "tokens"), tokenizer=str(self.out / "tokenizer"), mix=p.mix, **model,
            train=self._train(out=str(run), steps=steps, lr=p.pretrain_lr, warmup=max(1, min(50, steps // 10)),
                              batch_size=p.batch_size, seq_len=p.seq_len, seed=p.seed,
                              save_every=max(10, steps // 8))))
        _finished(run)

    def _sft(self, start: Path, run: Path, seed: int) -> None:
        from .train import sft

        p = self.plan
        sft.run(SFTConfig(
            model=str(start), data=[str(self.out / "data" / "sft.jsonl")],
            train=self._train(out=str(run), steps=p.sft_steps, lr=p.sft_lr, warmup=max(1, p.sft_steps // 10), seed=seed,
                              save_every=max(10, p.sft_steps // 3))))
        _finished(run)

    def stage_tokenizer(self) -> dict:
        from .tokenizer import train_on_files

        out = self.out / "tokenizer"
        tok, skipped = train_on_files([self.out / "data" / "curated"], self.plan.vocab_size, progress=not self.quiet)
        tok.save(out)
        self._say(f"  wrote {out}: {tok.vocab_size} tokens ({len(skipped)} input problems skipped)")
        return {"vocab_size": tok.vocab_size}

    def stage_tokens(self) -> dict:
        from .data.shards import tokenize_dir

        index = tokenize_dir(self.out / "data" / "curated", self.out / "tokenizer", self.out / "data" / "tokens",
                             workers=os.cpu_count() or 1, progress=not self.quiet)
        self._say(f"  {index['num_tokens']:,} tokens in {index['num_docs']:,} documents")
        return {"tokens": index["num_tokens"], "documents": index["num_docs"]}

    def _train_record(self, run: Path) -> dict:
        from .plot import read_metrics

        rows = [r for r in read_metrics(run) if not r.get("skipped")]
        seconds = sum(r["seconds"] for r in rows)
        tokens = sum(r["tokens"] for r in rows)
        return {"steps": len(rows), "tokens": tokens, "train_seconds": seconds,
                "tokens_per_s": tokens / seconds if seconds else None, "mfu": _mean(rows, "mfu"),
                "final_loss": _mean(rows[-20:], "lm_loss")}

    def stage_pretrain(self) -> dict:
        run = self.out / "pretrain"
        self._pretrain(run, self.plan.pretrain_steps, preset=self.plan.preset)
        return {**self._train_record(run), "eval": self._evaluate(self._load(run), "plain")}

    def stage_sft(self) -> dict:
        run = self.out / "sft"
        self._sft(self.out / "pretrain", run, self.plan.seed)
        loaded = self._load(run)
        return {**self._train_record(run), "eval": self._evaluate(loaded, "chat"), "gap": self._gap(loaded)}

    def stage_more_sft(self) -> dict:
        """The control for GRPO: more supervised training on the same labeled examples."""
        run = self.out / "more_sft"
        self._sft(self.out / "sft", run, self.plan.seed + 1)
        return {**self._train_record(run), "eval": self._evaluate(self._load(run), "chat")}

    def stage_rl(self) -> dict:
        from .plot import read_metrics
        from .rl import train as rl_train

        p, run = self.plan, self.out / "rl"
        rl_train.run(GRPORun(
            model=str(self.out / "sft"), out=str(run), steps=p.grpo_steps, save_every=max(5, p.grpo_steps // 6),
            resume=True, quiet=self.quiet,
            grpo=GRPOConfig(p.task, prompts=p.grpo_prompts, group=p.grpo_group, max_tokens=p.max_tokens, lr=p.grpo_lr,
                            beta=p.grpo_beta, level=p.grpo_level, seed=p.seed, warmup=p.grpo_warmup,
                            averaging=p.grpo_averaging, normalize=p.grpo_normalize, resample=p.grpo_resample,
                            resample_from=p.grpo_stage2, ref_refresh=p.grpo_stage2)))
        _finished(run)
        rows, loaded = read_metrics(run), self._load(run)
        seconds = sum(r["seconds"] for r in rows)
        generated = sum(r["response_length"] * r.get("draws", 1) * p.grpo_prompts * p.grpo_group for r in rows)
        return {"steps": len(rows), "train_seconds": seconds, "generated_tokens": int(generated),
                "tokens_per_s": generated / seconds if seconds else None,
                "rollout_share": sum(r["rollout_seconds"] for r in rows) / seconds if seconds else None,
                "first_reward": _mean(rows[:10], "reward"), "last_reward": _mean(rows[-10:], "reward"),
                "first_length": _mean(rows[:10], "response_length"),
                "last_length": _mean(rows[-10:], "response_length"),
                "eval": self._evaluate(loaded, "chat"), "speculative": self._speculative(loaded)}

    def stage_distill(self) -> dict:
        """R1's distillation in miniature: a smaller pretrained student SFT'd on the RL model's verified answers."""
        p, run, student = self.plan, self.out / "distill", self.out / "distill-student"
        self._pretrain(student, p.distill_pretrain_steps, config=str(self._student_config()))
        if not (run / "report.json").exists():  # distill reuses its samples and resumes its SFT on a rerun
            from .rl import distill
            try:
                distill.run(DistillConfig(teacher=str(self.out / "rl"), student=str(student), task=p.task,
                                          out=str(run), problems=p.distill_problems, steps=p.distill_steps,
                                          max_tokens=p.max_tokens, eval_n=p.eval_n, seed=p.seed, quiet=self.quiet))
            except TrainError as e:  # e.g. a teacher that solved nothing: the report says so
                self._say(f"  distillation skipped: {e}")
                return {"skipped": str(e)}
        _finished(run / "student")
        return {"report": json.loads((run / "report.json").read_text()),
                "student_pretrained_eval": self._evaluate(self._load(student), "plain", practised=False),
                "eval": self._evaluate(self._load(run / "student"), "chat")}

    def _student_config(self) -> Path:
        """The teacher's shape at `distill_layers` layers (the first stays dense, as in the teacher)."""
        from .config import preset

        cfg = preset(self.plan.preset)
        layers = self.plan.distill_layers
        cfg = cfg.replace(num_hidden_layers=layers, first_k_dense_replace=min(cfg.first_k_dense_replace, layers))
        path = self.out / "distill-student.json"
        write_atomic(path, json.dumps(cfg.to_hf_dict(), indent=2))
        return path

    # ---- measurements ------------------------------------------------------------------------

    @staticmethod
    def _load(model_dir: Path):
        """(model on the GPU if there is one, its tokenizer): what the measurements below take."""
        from .checkpoint import load_model, resolve_device
        from .tokenizer import Tokenizer

        return load_model(model_dir, device=resolve_device()), Tokenizer.load(model_dir)

    def _evaluate(self, loaded, template: str, practised: bool = True) -> dict:
        """Greedy pass@1 on the fixed test problems of every task; with `practised`, also on eval_n test
        problems of the level GRPO practises (the demonstration's measure)."""
        from .engine.engine import Engine
        from .rl.evaluate import evaluate

        engine = Engine(*loaded, max_running=64)
        results = {}
        for task in self._tasks():
            problems = self._problems(task, "test", self.plan.eval_n)
            report = evaluate(engine, task, problems, max_tokens=self.plan.max_tokens, template=template)
            results[task.name] = {"pass1": report.pass1, "format": report.format_rate, "n": report.n,
                                  "mean_tokens": report.mean_tokens,
                                  "by_level": {str(k): v for k, v in report.by_level.items()}}
            self._say(f"  {task.name}: pass@1 {report.pass1:.1%}, format {report.format_rate:.1%} "
                      f"({report.n} test problems, {template} template)")
        if not practised:
            return results
        task, level = self._tasks()[0], self.plan.grpo_level
        report = evaluate(engine, task, task.problems("test", self.plan.eval_n, level=level, strict=False),
                          max_tokens=self.plan.max_tokens, template=template)
        results[task.name]["practised"] = {"level": level, "pass1": report.pass1, "n": report.n}
        self._say(f"  {task.name} level {level}: pass@1 {report.pass1:.1%} ({report.n} test problems)")
        return results

    def _gap(self, loaded) -> dict:
        """Greedy pass@1 and pass@G (G samples at temperature 1, as GRPO draws them) on train problems of
        GRPO's level: what sampling finds and greedy decoding misses bounds what sharpening can add."""
        from .engine.engine import Engine
        from .rl.evaluate import evaluate

        p, task = self.plan, self._tasks()[0]
        problems = task.problems("train", min(64, p.eval_n), level=p.grpo_level, seed=p.seed + 2, strict=False)
        report = evaluate(Engine(*loaded, max_running=128), task, problems, k=p.grpo_group, temperature=1.0,
                          max_tokens=p.max_tokens, seed=p.seed, split="train")
        self._say(f"  {task.name} level {p.grpo_level}, {report.n} train problems: greedy {report.pass1:.1%}, "
                  f"pass@{p.grpo_group} at temperature 1 {report.pass_k:.1%}")
        return {"level": p.grpo_level, "n": report.n, "k": p.grpo_group, "greedy": report.pass1,
                "pass_k": report.pass_k}

    def _speculative(self, loaded) -> dict:
        """Greedy decode of test prompts one at a time, plain and with MTP drafts: acceptance and speed-up."""
        from .engine.engine import Engine
        from .rl.evaluate import answer_params, prompt_ids

        task, tok = self._tasks()[0], loaded[1]
        prompts = [prompt_ids(tok, q, "chat") for q in self._problems(task, "test", min(8, self.plan.eval_n))]
        out = {}
        for name, spec in (("plain", False), ("speculative", True)):
            engine = Engine(*loaded, max_running=1, speculative=spec)
            params = answer_params(tok, temperature=0, max_tokens=self.plan.max_tokens)
            t0 = time.perf_counter()
            done = engine.generate(prompts, params)
            seconds = time.perf_counter() - t0
            out[name] = {"tokens": sum(len(r.output) for r in done), "seconds": seconds,
                         "outputs": [r.output for r in done]}
            if spec:
                out["acceptance_rate"] = engine.acceptance_rate
        same = out["plain"].pop("outputs") == out["speculative"].pop("outputs")
        return {**out, "identical_outputs": same,
                "speedup": (out["speculative"]["tokens"] / out["speculative"]["seconds"])
                / (out["plain"]["tokens"] / out["plain"]["seconds"])}

    # ---- the report --------------------------------------------------------------------------

    def stage_report(self) -> dict:
        from .report import write_report
        path = write_report(self.out, self.plan, self.records)
        return {"path": str(path)}


def make_plan(quick: bool, **overrides) -> Plan:
    """The quick or full plan with the command line's overrides; GRPO's level moves to the nearest
    level the task has (e.g. --task countdown: its levels start at 3)."""
    from .data.tasks import TASKS

    plan = replace(PLANS["quick" if quick else "full"], **overrides)
    levels = TASKS[plan.task].levels
    if plan.grpo_level not in levels:
        plan = replace(plan, grpo_level=min(levels, key=lambda lv: abs(lv - plan.grpo_level)))
    return plan


def run(out: str | Path, plan: Plan, distill: bool = False, quiet: bool = False) -> int:
    """The speedrun of `plan` in `out` (continuing one stopped there); the exit status of `nanoseek speedrun`."""
    try:
        Speedrun(out, plan, distill=distill, quiet=quiet).run()
    except SpeedrunError as e:
        print(f"nanoseek speedrun: error: {e}", file=sys.stderr)
        return 2
    except (Stopped, KeyboardInterrupt):
        print("nanoseek speedrun: stopped; run the same command again to continue from the last checkpoint",
              file=sys.stderr)
        return 130
    return 0
