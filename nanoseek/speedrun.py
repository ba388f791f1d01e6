"""`nanoseek speedrun`: DeepSeek's system end to end on one machine, R1's recipe scored stage by stage
under one protocol against its controls, with a report card.

    nanoseek speedrun --out runs/first          # the full plan on 2 CPU cores (docs/speedrun.md: how long)
    nanoseek speedrun --out runs/try --quick    # a few minutes, a tiny model

Stages, each in its own dir under OUT, each skipped when a rerun finds it done:

    data        generate a raw corpus (task solutions, prose, code, Chinese, junk, duplicates), curate it
                (clean, filter, de-duplicate, classify), and write the labeled set: at most 500 train-split
                problems with their worked solutions and answers
    tokenizer   train the byte-level BPE tokenizer on the curated text
    tokens      tokenize the curated shards
    pretrain    MoE + MLA with MTP and auxiliary-loss-free balancing
    base        score the pretrained model under the plain and the R1-Zero template
    r1zero      R1-Zero: GRPO straight from the pretrained model, rule rewards only
    sft         R1's cold start: SFT on the labeled set
    rl          GRPO from the SFT model
    rft         the control: rejection-sampling fine-tuning of the SFT model with as many samples as rl drew
    rejection   the rl model answers unlabeled train problems; the pretrained model is fine-tuned on its
                verified answers and the labeled set
    rl2         GRPO again, from the rejection model (skipped when the plan gives it no steps)
    final       the last RL model copied to OUT/final; MTP self-speculative decoding measured on it
    student     (distillation) a smaller model pretrained on the same tokens, scored like the base
    distill     the student SFT'd on the final model's verified answers to unlabeled problems
    student_rl  the control: the student's own cold start on the labeled set, then GRPO as long as rl
    report      report/report.md with tables and PNG plots

Every stage is scored on the same fixed test problems: greedy pass@1 and pass@k at temperature 1, per
task and level (nanoseek/rl/recipe.py). Each stage records what it measured in OUT/stages/NAME.json
once it has finished; the training stages checkpoint as they go, so a rerun after a crash or Ctrl-C
continues mid-stage. The settings are kept in OUT/speedrun.json and a rerun with different ones is
refused.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import sys
import time
from dataclasses import MISSING, asdict, dataclass, fields, replace
from functools import cached_property
from pathlib import Path

from .io import write_atomic
from .rl.recipe import RL, Protocol, Stopped


def headline(task: str) -> str:
    """The task a plan's RL task names first (the headline): `arithmetic@2,sort@3` -> arithmetic."""
    from .data.tasks import Mixture, get_task
    t = get_task(task)
    return t.entries[0][0].name if isinstance(t, Mixture) else t.name


@dataclass(frozen=True)
class Plan:
    """Everything a speedrun does, sized for a budget."""
    preset: str
    corpus_mb: float
    corpus_brief: float  # share of the corpus's task documents that give the answer without the working
    corpus_ops: tuple[tuple[str, float], ...]  # arithmetic's operations weighted in the corpus; (): even
    vocab_size: int
    mix: str
    pretrain_steps: int
    pretrain_lr: float
    curriculum: bool  # the first epoch of each domain easiest first (the tasks' levels)
    balance_mtp: bool  # whether pretraining bias-balances the MTP module's gate too
    precision: str  # every training stage's but GRPO's (fp32): fp32, bf16 or auto (measured at each stage's start)
    batch_size: int
    seq_len: int
    sft_examples: int  # the labeled set: at most this many problems, each with its worked solution
    sft_steps: int
    sft_lr: float
    task: str  # what RL practises: a task, or a mixture such as arithmetic@2,sort@4 (its first task: the headline)
    levels: tuple[int, ...]  # the headline task's levels in the labeled set and the test problems
    eval_tasks: tuple[str, ...]  # every stage is scored on these (and the headline task)
    grpo_steps: int
    grpo_prompts: int
    grpo_group: int
    grpo_lr: float
    grpo_beta: float
    grpo_warmup: int  # steps of linear lr warm-up
    grpo_resample: int  # DAPO's dynamic sampling from mid-run: extra draws while groups lack signal
    grpo_advantage: str  # std: (r - mean) / std as GRPO; none: r - mean as Dr. GRPO
    grpo_temperature: float  # the rollouts' sampling temperature
    rs_problems: int  # the rejection stage: unlabeled train problems the rl model answers
    rs_k: int  # answers per problem
    rs_steps: int  # SFT steps from the pretrained model on the verified ones and the labeled set
    rl2_steps: int  # the second GRPO stage; 0: none (the rl model is final)
    max_tokens: int  # longest completion in GRPO, sampling and evaluation
    eval_n: int  # test problems per task, every stage
    eval_k: int  # samples per test problem for pass@k
    curve_n: int  # held-out test problems of each point of GRPO's curve
    distill_layers: int  # the student: the same width as the teacher, this many layers, pretrained
    distill_pretrain_steps: int  # on the same tokens, before it learns from the teacher
    distill_problems: int
    distill_k: int
    distill_steps: int
    seed: int = 0
    corpus_checked: float = 0.0  # share of the corpus's task documents worked with every step checked
    corpus_chat: float = 0.0  # share of the corpus's task documents laid out as a chat turn (mid-training)
    # the other scored tasks' levels in the labeled set and the test problems; a task not named: all its levels
    eval_levels: tuple[tuple[str, tuple[int, ...]], ...] = ()
    # the corpus's worked task documents: (task, levels) pairs, each level drawn as often as it is listed
    corpus_tasks: tuple[tuple[str, tuple[int, ...]], ...] = (("arithmetic", (1, 2, 2, 3, 3, 3)), ("sort", (3, 4)))

    @property
    def headline(self) -> str:
        return headline(self.task)

    def rl(self, quiet: bool) -> RL:
        return RL(self.task, steps=self.grpo_steps, prompts=self.grpo_prompts, group=self.grpo_group,
                  max_tokens=self.max_tokens, lr=self.grpo_lr, beta=self.grpo_beta, warmup=self.grpo_warmup,
                  resample=self.grpo_resample, advantage_scale=self.grpo_advantage,
                  temperature=self.grpo_temperature, curve_n=self.curve_n, quiet=quiet)


# The corpus is mostly worked task solutions (arithmetic levels 2 and 3 weighted up, and sorting), with
# prose, code and Chinese kept for the curation, classification and tokenizer to work on. The loader mixes
# by documents and a prose document is several solutions long, so the mix weights math far above the rest
# to keep most pretraining tokens on the tasks (docs/log.md has the corpora tried). Countdown's searches
# need one-line products a model this small cannot do, so they are left out (`Plan.corpus_tasks`). A share
# of the task documents are chat turns, so that the base has met the layout its fine-tuning and serving
# use; and the plans' labeled sets and tests hold the levels the corpus teaches (sorts of 3 and 4
# numbers): the cold start was where a model first met sorts of 5 and 6, and they broke the sorts it knew
# (docs/log.md).
CORPUS_KINDS = {"math": 0.9, "prose": 0.06, "code": 0.02, "chinese": 0.02}

PLANS = {
    # GRPO: the two-stage recipe of docs/grpo.md (plain GRPO, then dynamic sampling anchored at the first
    # stage's policy) after an lr warm-up, on a mixture of the headline task's levels and the second task.
    # docs/log.md has the runs behind these choices. Subtraction documents come twice as often as the other
    # operations': mixed evenly, no base of this size learned subtraction's digit facts. The MTP gate is not
    # bias-balanced: on the same data, the run that balanced it never learned to read the prompt's tens digits
    # (arithmetic 9.5% against 70.7%; one run each, "The base is fragile" in docs/log.md). Pretraining is fp32:
    # bf16 trains `small` faster on a host with AMX (docs/benchmarks.md), but no bf16 base has been scored
    # against fp32's over seeds yet, and `auto` would let the host decide which base the main job gets.
    "full": Plan(preset="small", corpus_mb=12, corpus_brief=0.0, corpus_ops=(("-", 2.0),), vocab_size=4096,
                 mix="math=400,prose=2,code=1", pretrain_steps=3000, pretrain_lr=3e-3, curriculum=True, balance_mtp=False,
                 precision="fp32", batch_size=8, seq_len=256,
                 sft_examples=500, sft_steps=40, sft_lr=1e-4,
                 task="arithmetic@2,arithmetic@3,sort@3,sort@4", levels=(1, 2, 3), eval_tasks=("arithmetic", "sort"),
                 grpo_steps=60, grpo_prompts=16, grpo_group=8, grpo_lr=2e-4, grpo_beta=0.04, grpo_warmup=10,
                 grpo_resample=2, grpo_advantage="std", grpo_temperature=1.0, rs_problems=600, rs_k=4, rs_steps=200, rl2_steps=40,
                 max_tokens=200, eval_n=150, eval_k=8, curve_n=60,
                 distill_layers=2, distill_pretrain_steps=700, distill_problems=1000, distill_k=4, distill_steps=300,
                 eval_levels=(("sort", (3, 4)),), corpus_chat=0.3),
    "quick": Plan(preset="tiny", corpus_mb=1.5, corpus_brief=0.0, corpus_ops=(), vocab_size=512, mix="math=130,prose=2,code=1",
                  pretrain_steps=60, pretrain_lr=3e-3, curriculum=True, balance_mtp=True, precision="fp32", batch_size=8, seq_len=128,
                  sft_examples=100, sft_steps=20, sft_lr=1e-3,
                  task="arithmetic@1,arithmetic@2,sort@3", levels=(1, 2), eval_tasks=("arithmetic", "sort"),
                  grpo_steps=3, grpo_prompts=4, grpo_group=4, grpo_lr=1e-5, grpo_beta=0.04, grpo_warmup=2,
                  grpo_resample=1, grpo_advantage="std", grpo_temperature=1.0, rs_problems=8, rs_k=2, rs_steps=4, rl2_steps=2,
                  max_tokens=48, eval_n=16, eval_k=2, curve_n=8,
                  distill_layers=1, distill_pretrain_steps=20, distill_problems=16, distill_k=2, distill_steps=6,
                  eval_levels=(("sort", (3, 4)),), corpus_chat=0.3),
}

STAGES = ("data", "tokenizer", "tokens", "pretrain", "base", "r1zero", "sft", "rl", "rft", "rejection", "rl2",
          "final", "student", "distill", "student_rl", "report")
DISTILL_STAGES = ("student", "distill", "student_rl")
MODEL_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json")  # and the weights


class SpeedrunError(Exception):
    """A speedrun that cannot start or continue; printed without a traceback."""


def interrupts() -> int:
    from .train.common import interrupts as taken  # torch loads with it: not at import time
    return taken()


def _mean(rows: list[dict], key: str) -> float | None:
    vals = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
    return sum(vals) / len(vals) if vals else None


class Speedrun:
    def __init__(self, out: str | Path, plan: Plan, distill: bool = True, quiet: bool = False):
        self.out, self.plan, self.distill, self.quiet = Path(out), plan, distill, quiet
        self.records: dict[str, dict] = {}
        self._interrupts_before = interrupts()

    # ---- bookkeeping -------------------------------------------------------------------------

    def _check_settings(self) -> None:
        settings = self.out / "speedrun.json"
        mine = {"plan": json.loads(json.dumps(asdict(self.plan))), "distill": self.distill}
        if settings.exists():
            theirs = json.loads(settings.read_text())
            # a setting added since that run was written had its default then
            defaults = json.loads(json.dumps({f.name: f.default for f in fields(Plan) if f.default is not MISSING}))
            theirs["plan"] = {**defaults, **theirs["plan"]}
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

    def stages(self) -> list[str]:
        return [s for s in STAGES if (self.distill or s not in DISTILL_STAGES)
                and not (s == "rl2" and not self.plan.rl2_steps)]

    def _stop_if_interrupted(self) -> None:
        """A Ctrl-C that came during a training loop's last step let the loop finish (nothing to save but its
        result); stop here, before the next loop, rather than go on as if none came."""
        if interrupts() > self._interrupts_before:
            raise KeyboardInterrupt

    def run(self) -> Path:
        self._check_settings()
        start = time.perf_counter()
        stages = self.stages()
        ran = False
        for i, name in enumerate(stages, 1):
            marker = self.out / "stages" / f"{name}.json"
            if marker.exists() and not (name == "report" and ran):  # a stage that ran means a new report
                self.records[name] = json.loads(marker.read_text())
                self._say(f"[{i}/{len(stages)}] {name}: done already ({self.records[name]['seconds']:.0f} s), skipped")
                continue
            self._say(f"[{i}/{len(stages)}] {name} ...")
            t0, self._interrupts_before = time.perf_counter(), interrupts()
            ran = True
            record = getattr(self, f"stage_{name}")()
            record["seconds"] = time.perf_counter() - t0
            self.records[name] = record
            marker.parent.mkdir(exist_ok=True)
            write_atomic(marker, json.dumps(record, indent=2))
            self._say(f"[{i}/{len(stages)}] {name}: {record['seconds']:.0f} s")
            self._stop_if_interrupted()
        report = self.out / "report" / "report.md"
        self._say(f"speedrun finished in {time.perf_counter() - start:.0f} s (this invocation): {report}")
        return report

    # ---- data --------------------------------------------------------------------------------

    def _labeled_tasks(self):
        from .data.tasks import TASKS
        return [TASKS[t] for t in dict.fromkeys([self.plan.headline, *self.plan.eval_tasks])]

    @property
    def _labeled_seed(self) -> int:
        """A draw of train problems no GRPO step (seed * 1_000_003 + step) nor sampling stage (below it) makes."""
        return -1_000_000 - self.plan.seed

    def _labeled_problems(self, task, n: int):
        """n labeled train problems spread over the levels the test problems have (Protocol.build's)."""
        from .rl.recipe import scored_levels
        levels = scored_levels(task, self.plan.headline, self.plan.levels, self.plan.eval_levels)
        if not levels:
            return task.problems("train", n, seed=self._labeled_seed)
        return [q for i, lv in enumerate(levels)  # small levels give what they have
                for q in task.problems("train", n // len(levels) + (i < n % len(levels)), level=lv,
                                       seed=self._labeled_seed, strict=False)]

    def stage_data(self) -> dict:
        from .data.corpus import write_corpus
        from .data.curate import CurateConfig, curate

        p = self.plan
        raw = self.out / "data" / "raw"
        if raw.exists():
            shutil.rmtree(raw)
        files = write_corpus(raw, p.corpus_mb, seed=p.seed, kinds=CORPUS_KINDS, tasks=dict(p.corpus_tasks),
                             brief=p.corpus_brief, ops=dict(p.corpus_ops),
                             checked=p.corpus_checked, chat=p.corpus_chat)
        raw_mb = sum(f.stat().st_size for f in files) / 1e6
        report = curate([str(raw)], self.out / "data" / "curated", CurateConfig(), workers=os.cpu_count() or 1,
                        progress=not self.quiet)
        if not self.quiet:
            print(report.table())
        shutil.rmtree(raw)  # the curated shards are what the next stages read
        tasks = self._labeled_tasks()
        examples, counts = [], {}
        for i, task in enumerate(tasks):  # most of the labeled budget for the headline task, a fifth each else
            n = p.sft_examples - (len(tasks) - 1) * (p.sft_examples // 5) if i == 0 else p.sft_examples // 5
            problems = self._labeled_problems(task, n)
            counts[task.name] = len(problems)
            examples += [{"messages": [{"role": "user", "content": q.prompt},
                                       {"role": "assistant", "content": task.solution(q)}]} for q in problems]
        random.Random(p.seed + 2).shuffle(examples)
        write_atomic(self.labeled, "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in examples))
        curated = report.as_dict()
        curated.pop("shards")
        return {"raw_megabytes": raw_mb, "curate": curated, "sft_examples": counts}

    @property
    def labeled(self) -> Path:
        return self.out / "data" / "sft.jsonl"

    def _pretrain(self, run: Path, steps: int, **model) -> None:
        from .rl import recipe
        recipe.pretrain(self.out, run, steps, asdict(self.plan), seed=self.plan.seed, quiet=self.quiet, **model)

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
        return self._train_record(run)

    # ---- R1's recipe (nanoseek/rl/recipe.py), every stage scored under one protocol ----------

    @cached_property  # the test problems are drawn once, not at every stage's scoring
    def protocol(self) -> Protocol:
        p = self.plan
        return Protocol.build(p.eval_n, p.headline, list(p.levels), list(p.eval_tasks), k=p.eval_k,
                              task_levels=p.eval_levels,
                              max_tokens=p.max_tokens, seed=p.seed)

    def _score(self, model: Path, template: str = "chat") -> dict:
        from .rl import recipe
        return recipe.score(model, template, self.protocol, say=self._say)

    def _score_base(self, model: Path) -> dict:
        """A pretrained model (the base, the student) in each template its corpus taught; its best counts."""
        from .rl import recipe
        return recipe.score_base(model, self.protocol, self.plan.headline, say=self._say,
                                 templates=recipe.base_templates(bool(self.plan.corpus_chat)))

    def stage_base(self) -> dict:
        return self._score_base(self.out / "pretrain")

    def _grpo(self, start: Path, name: str, template: str = "chat", steps: int | None = None, seed: int = 0) -> dict:
        """A GRPO stage; stages of one seed draw the same problems (a paired comparison) unless `seed` moves them."""
        from .rl import recipe
        record = recipe.grpo(start, self.out / name, self.plan.rl(self.quiet), template, self.plan.seed + seed,
                             steps=steps)
        return {**record, "eval": self._score(self.out / name, template)}

    def stage_r1zero(self) -> dict:
        """R1-Zero in the template the base scored best in (the corpus's plain one, R1-Zero's, or chat)."""
        return self._grpo(self.out / "pretrain", "r1zero", template=self.records["base"]["template"])

    def stage_sft(self) -> dict:
        from .rl import recipe
        p = self.plan
        run = recipe.sft(self.out / "pretrain", [self.labeled], self.out / "sft", p.sft_steps, p.sft_lr, p.seed,
                         quiet=self.quiet, precision=p.precision)
        return {**self._train_record(run), "eval": self._score(run)}

    def stage_rl(self) -> dict:
        return self._grpo(self.out / "sft", "rl")

    def _verified(self, teacher: Path, start: Path, name: str, problems: int, k: int, temperature: float,
                  steps: int, salt: int, instead: Path, **kw) -> dict:
        """recipe.verified_sft into OUT/name, scored. When nothing was verified there is nothing to train on: the
        stage's model is `instead` (the one the recipe goes on from), scored as such, and the record says so."""
        from .rl import recipe
        from .rl.rft import NothingVerified
        p = self.plan
        try:
            stats = recipe.verified_sft(teacher, start, self.out / name, p.task, problems, k, temperature,
                                        p.max_tokens, steps, p.sft_lr, p.seed, salt=salt, quiet=self.quiet,
                                        precision=p.precision, **kw)
        except NothingVerified as e:
            self._say(f"  {name}: {e}; the recipe goes on from {instead.name}")
            template = self.records.get(instead.name, {}).get("template", "chat")  # the student: its base's
            return {"skipped": str(e), "instead": instead.name, "asked": problems * k,
                    "eval": self._score(instead, template)}
        return {**stats, "asked": problems * k, **self._train_record(self.out / name),
                "eval": self._score(self.out / name)}

    def stage_rft(self) -> dict:
        """The control: as many samples as rl drew, from the same start, the verified ones SFT'd."""
        p = self.plan
        return self._verified(self.out / "sft", self.out / "sft", "rft", self.records["rl"]["samples"] // p.grpo_group,
                              p.grpo_group, 1.0, p.grpo_steps, salt=0, instead=self.out / "sft")

    def stage_rejection(self) -> dict:
        p = self.plan
        return self._verified(self.out / "rl", self.out / "pretrain", "rejection", p.rs_problems, p.rs_k, 1.0,
                              p.rs_steps, salt=1, instead=self.out / "rl", keep_per_problem=2, extra=[self.labeled])

    def stage_rl2(self) -> dict:
        from .rl import recipe
        start = "rl" if "skipped" in self.records["rejection"] else "rejection"  # nothing verified: from rl
        return {"from": start, **self._grpo(self.out / start, "rl2", steps=self.plan.rl2_steps, seed=recipe.RL2_SEED)}

    @property
    def last_rl(self) -> str:
        return "rl2" if self.plan.rl2_steps else "rl"

    def stage_final(self) -> dict:
        """The recipe's last model, its files copied to OUT/final (weights last: a dir with weights is whole)."""
        src, dest = self.out / self.last_rl, self.out / "final"
        tmp = self.out / ".final.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        for path in src.iterdir():
            if path.name in MODEL_FILES or ".safetensors" in path.name:  # sharded weights and their index too
                shutil.copy2(path, tmp / path.name)
        shutil.rmtree(dest, ignore_errors=True)
        os.replace(tmp, dest)
        return {"from": self.last_rl, "speculative": self._speculative(dest)}

    def stage_student(self) -> dict:
        """The distillation student: the teacher's shape at fewer layers, pretrained on the same tokens."""
        from .rl import recipe
        p, run = self.plan, self.out / "student"
        config = recipe.student_config(p.preset, p.distill_layers, self.out / "student.json")
        self._pretrain(run, p.distill_pretrain_steps, config=str(config))
        return {**self._train_record(run), **self._score_base(run)}

    def stage_distill(self) -> dict:
        """R1's distillation: the student SFT'd on the final model's verified answers to unlabeled problems."""
        p = self.plan
        return self._verified(self.out / "final", self.out / "student", "distill", p.distill_problems, p.distill_k,
                              0.7, p.distill_steps, salt=2, instead=self.out / "student", keep_per_problem=2)

    def stage_student_rl(self) -> dict:
        """The control for distillation: RL on the student itself, from its own cold start, as long as rl."""
        from .rl import recipe
        p = self.plan
        sft = recipe.sft(self.out / "student", [self.labeled], self.out / "student_sft", p.sft_steps, p.sft_lr,
                         p.seed, quiet=self.quiet, precision=p.precision)
        self._stop_if_interrupted()  # two loops in one stage
        return {"sft_eval": self._score(sft), **self._grpo(sft, "student_rl")}

    # ---- measurements ------------------------------------------------------------------------

    def _speculative(self, model_dir: Path) -> dict:
        """Greedy decode of test prompts one at a time, plain and with MTP drafts: acceptance and speed-up."""
        from .checkpoint import load_model, resolve_device
        from .data.tasks import TASKS
        from .engine.engine import Engine
        from .rl.evaluate import answer_params, prompt_ids
        from .tokenizer import Tokenizer

        loaded = load_model(model_dir, device=resolve_device()), Tokenizer.load(model_dir)
        tok, task = loaded[1], TASKS[self.plan.headline]
        prompts = [prompt_ids(tok, q, "chat") for q in self.protocol.problems[task.name][:8]]
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
    """The quick or full plan with the command line's overrides (checked: a clear error names what is wrong)."""
    from .data.tasks import TASKS, get_task

    plan = replace(PLANS["quick" if quick else "full"], **overrides)
    try:
        get_task(plan.task)
    except ValueError as e:
        raise SpeedrunError(f"--task: {e}") from None
    unknown = [t for t in plan.eval_tasks if t not in TASKS]
    if unknown:
        raise SpeedrunError(f"eval tasks {unknown} unknown; choose from {', '.join(TASKS)}")
    return plan


def run(out: str | Path, plan: Plan, distill: bool = True, quiet: bool = False) -> int:
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
