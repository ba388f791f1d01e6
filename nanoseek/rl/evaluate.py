"""Task evaluation through the engine: pass@1 (greedy), pass@k and maj@k (sampled).

    report = evaluate(engine, TASKS["arithmetic"], problems, k=8, temperature=0.7)

Prompts are the task problem in the chat template (what SFT teaches), R1-Zero's plain-text
template, or the bare problem and a newline (how the generated pretraining corpus writes it). pass@k is the unbiased estimator of Chen et
al. (2021) from n >= k samples with c correct: 1 - C(n-c, k) / C(n, k). maj@k votes on the
extracted answers of k samples and checks the winner.
"""

from __future__ import annotations

import collections
import math
from dataclasses import asdict, dataclass, field

from ..data.tasks import Problem, Task, extract_answer
from ..engine.engine import Engine
from ..engine.sampling import SamplingParams
from ..tokenizer import ANSWER_END, Tokenizer
from .args import TEMPLATES
from .rewards import format_reward

R1_ZERO = ("A conversation between User and Assistant. The user asks a question, and the Assistant solves it. "
           "The assistant first thinks about the reasoning process in the mind and then provides the user with the "
           "answer. The reasoning process and answer are enclosed within <think> </think> and <answer> </answer> "
           "tags, respectively, i.e., <think> reasoning process here </think> <answer> answer here </answer>. "
           "User: {prompt}. Assistant:")


def prompt_ids(tok: Tokenizer, problem: Problem, template: str = "chat") -> list[int]:
    if template == "chat":
        return tok.render_chat([{"role": "user", "content": problem.prompt}], add_generation_prompt=True)[0]
    bos = [tok.bos_id] if tok.bos_id is not None else []
    if template == "r1-zero":
        return bos + tok.encode(R1_ZERO.format(prompt=problem.prompt))
    if template == "plain":
        return bos + tok.encode(problem.prompt + "\n")
    raise ValueError(f"template must be one of {', '.join(TEMPLATES)} (got {template!r})")


def answer_params(tok: Tokenizer, **kw) -> SamplingParams:
    """Sampling that ends at the closing answer tag (a special token, or text where the tokenizer has no
    such token), as R1-style rollouts do."""
    if tok.answer_end_id is None:
        return SamplingParams(stop=[ANSWER_END], **kw)
    return SamplingParams(stop_token_ids=[tok.answer_end_id], **kw)


def completion_text(tok: Tokenizer, req) -> str:
    """A finished request's text, with the closing answer tag it stopped on put back."""
    if tok.answer_end_id is None:
        return req.stream.text + (ANSWER_END if req.stream.stopped else "")
    closed = req.finish_reason == "stop" and req.output and req.output[-1] == tok.answer_end_id
    return req.stream.text + (tok.decode([tok.answer_end_id]) if closed else "")


def pass_at_k(n: int, c: int, k: int) -> float:
    """Probability that at least one of k samples drawn from n (c correct) is correct."""
    if n - c < k:
        return 1.0
    return 1.0 - math.prod((n - c - i) / (n - i) for i in range(k))


def majority_correct(task: Task, problem: Problem, completions: list[str]) -> bool:
    """The most common extracted answer (earliest on ties) checked by the task; no answer never wins."""
    answers = [a for a in (extract_answer(c) for c in completions) if a is not None]
    if not answers:
        return False
    counts = collections.Counter(answers)
    best = max(counts.values())
    winner = next(a for a in answers if counts[a] == best)
    return task.check(problem, winner)


@dataclass
class ProblemResult:
    key: str
    level: int
    greedy: str
    greedy_correct: bool
    greedy_formatted: bool
    greedy_tokens: int
    samples_correct: int = 0
    samples: int = 0
    majority_correct: bool = False


@dataclass
class Report:
    task: str
    split: str
    n: int
    k: int
    pass1: float  # greedy accuracy
    format_rate: float  # greedy outputs in <think>..</think> <answer>..</answer> form
    mean_tokens: float  # greedy output length
    pass_k: float | None = None
    maj_k: float | None = None
    by_level: dict = field(default_factory=dict)  # level -> pass@1
    problems: list[ProblemResult] = field(default_factory=list)

    def to_dict(self, with_problems: bool = False) -> dict:
        d = asdict(self)
        if not with_problems:
            d.pop("problems")
        return d


def tally(task: Task, problems: list[Problem], greedy: list[tuple[str, int]], sampled: list[list[str]] | None,
          k: int, split: str) -> Report:
    """Score greedy completions (text, tokens) and k sampled completions per problem."""
    results = []
    for i, p in enumerate(problems):
        text, tokens = greedy[i]
        r = ProblemResult(p.key, p.level, text, task.verify(p, text), format_reward(text) == 1.0, tokens)
        if sampled is not None:
            r.samples = len(sampled[i])
            r.samples_correct = sum(task.verify(p, s) for s in sampled[i])
            r.majority_correct = majority_correct(task, p, sampled[i][:k])
        results.append(r)
    n = len(results)
    levels = collections.defaultdict(list)
    for r in results:
        levels[r.level].append(r.greedy_correct)
    report = Report(task.name, split, n, k, sum(r.greedy_correct for r in results) / n,
                    sum(r.greedy_formatted for r in results) / n, sum(r.greedy_tokens for r in results) / n,
                    by_level={lvl: sum(v) / len(v) for lvl, v in sorted(levels.items())}, problems=results)
    if sampled is not None:
        report.pass_k = sum(pass_at_k(r.samples, r.samples_correct, k) for r in results) / n
        report.maj_k = sum(r.majority_correct for r in results) / n
    return report


def evaluate(engine: Engine, task: Task, problems: list[Problem], k: int = 1, temperature: float = 1.0,
             max_tokens: int = 256, template: str = "chat", seed: int = 0, split: str = "test") -> Report:
    """Greedy pass@1 on every problem, and with k > 1, k samples each for pass@k and maj@k."""
    ids = [prompt_ids(engine.tok, p, template) for p in problems]
    tok = engine.tok
    greedy = engine.generate(ids, answer_params(tok, temperature=0, max_tokens=max_tokens))
    sampled = None
    if k > 1:
        params = [answer_params(tok, temperature=temperature, max_tokens=max_tokens, seed=seed * 1_000_003 + i)
                  for i in range(len(problems) * k)]
        out = engine.generate([x for x in ids for _ in range(k)], params)
        sampled = [[completion_text(tok, r) for r in out[i * k:(i + 1) * k]] for i in range(len(problems))]
    return tally(task, problems, [(completion_text(tok, r), len(r.output)) for r in greedy], sampled, k, split)


def format_report(report: Report) -> str:
    lines = [f"{report.task} ({report.split}, {report.n} problems)",
             f"  pass@1 (greedy)   {report.pass1:.1%}",
             f"  format            {report.format_rate:.1%}",
             f"  mean length       {report.mean_tokens:.1f} tokens"]
    if report.pass_k is not None:
        lines += [f"  pass@{report.k}            {report.pass_k:.1%}", f"  maj@{report.k}             {report.maj_k:.1%}"]
    lines += [f"  level {lvl}: pass@1 {acc:.1%}" for lvl, acc in report.by_level.items()]
    return "\n".join(lines)
