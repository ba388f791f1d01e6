"""Rule-based rewards, as DeepSeek-R1-Zero uses: no reward model, only checks a program can make.

- accuracy: the task's verifier accepts the one answer in `<answer>...</answer>` (1 or 0);
- format: the whole completion is `<think> ... </think> <answer> ... </answer>`, each tag once;
- language consistency (R1, optional): the share of the reasoning's letters in the target
  script (Latin here), which DeepSeek added to stop reasoning that mixes languages.

    reward = accuracy + format_weight * format + language_weight * language
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..data.tasks import Problem, Task

_FORMAT = re.compile(r"\s*<think>(?P<think>.*?)</think>\s*<answer>(?P<answer>.*?)</answer>\s*", re.DOTALL)
TAGS = ("<think>", "</think>", "<answer>", "</answer>")


def format_reward(completion: str) -> float:
    """1 when the completion is exactly one think block then one answer block, nothing around them."""
    if any(completion.count(tag) != 1 for tag in TAGS):
        return 0.0
    m = _FORMAT.fullmatch(completion)
    return 1.0 if m and m.group("think").strip() and m.group("answer").strip() else 0.0


def language_reward(completion: str) -> float:
    """Share of the letters inside <think> that are Latin (ASCII); 0 without a think block."""
    m = re.search(r"<think>(.*?)</think>", completion, re.DOTALL)
    letters = [c for c in (m.group(1) if m else "") if c.isalpha()]
    if not letters:
        return 0.0
    return sum(c.isascii() for c in letters) / len(letters)


@dataclass(frozen=True)
class RewardConfig:
    format_weight: float = 0.1
    language_weight: float = 0.0


@dataclass(frozen=True)
class Score:
    reward: float
    correct: bool
    formatted: bool
    language: float


def score(task: Task, problem: Problem, completion: str, cfg: RewardConfig = RewardConfig()) -> Score:
    correct = task.verify(problem, completion)
    formatted = format_reward(completion) == 1.0
    language = language_reward(completion) if cfg.language_weight else 0.0
    reward = float(correct) + cfg.format_weight * formatted + cfg.language_weight * language
    return Score(reward, correct, formatted, language)
