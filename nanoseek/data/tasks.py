"""Synthetic reasoning tasks with exact answers: the default corpus and the rule rewards for RL.

Each task generates problems, writes worked step-by-step solutions in the R1 format
`<think> ... </think> <answer> ... </answer>`, and verifies a completion exactly.

    task = TASKS["arithmetic"]
    problems = task.problems("test", n=100)          # fixed by seed; never overlaps train
    text = task.solution(problems[0])                # worked solution
    task.verify(problems[0], completion)             # -> bool

Splits are decided by a hash of each problem's canonical key, so train / validation / test can
never share a problem whatever the seeds. Adding a task is one small class: `name`, `levels`,
`make(rng, level)`, `solution(problem)` and `check(problem, answer_text)`.
"""

from __future__ import annotations

import hashlib
import itertools
import random
import re
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Callable

SPLITS = {"test": (0, 5), "validation": (5, 10), "train": (10, 100)}  # hash buckets out of 100
TEST_SEED = 1234  # the test split is the same for everyone
_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


@dataclass(frozen=True)
class Problem:
    task: str
    key: str  # canonical identity: decides the split and de-duplicates
    prompt: str
    answer: str  # the reference answer (for Countdown: one valid expression)
    level: int
    meta: dict = field(default_factory=dict, compare=False, hash=False)


def split_of(key: str) -> str:
    bucket = int.from_bytes(hashlib.sha256(key.encode()).digest()[:4], "big") % 100
    return next(name for name, (lo, hi) in SPLITS.items() if lo <= bucket < hi)


def extract_answer(completion: str) -> str | None:
    """The text inside the one `<answer>...</answer>` of a completion; None if there is not exactly one."""
    found = _ANSWER.findall(completion)
    if len(found) != 1 or completion.count("<answer>") != 1:
        return None
    return found[0].strip()


class Task:
    name: str = ""
    levels: tuple[int, ...] = ()
    description: str = ""

    def make(self, rng: random.Random, level: int) -> Problem:
        raise NotImplementedError

    def solution(self, problem: Problem) -> str:
        """The worked solution: every step in <think>, then the answer."""
        raise NotImplementedError

    def brief(self, problem: Problem) -> str:
        """The answer with only the worked solution's conclusion in <think>: what a label without the
        working looks like (the speedrun's labeled set mixes both)."""
        raise NotImplementedError

    def checked(self, problem: Problem, rng: random.Random, slip: float = 0.5) -> str:
        """The worked solution with a check after every step; with probability `slip` one step after the
        first is written wrong, its check catches it and the step is redone. What a corpus of careful
        solvers holds: working that verifies itself and recovers from a slip. Tasks without step checks
        give their worked solution (countdown's search already checks each try against the target)."""
        return self.solution(problem)

    def check(self, problem: Problem, answer: str) -> bool:
        raise NotImplementedError

    def verify(self, problem: Problem, completion: str) -> bool:
        """True when the completion's single answer is exactly right."""
        answer = extract_answer(completion)
        return answer is not None and self.check(problem, answer)

    def problems(self, split: str, n: int, level: int | None = None, seed: int | None = None,
                 strict: bool = True) -> list[Problem]:
        """n distinct problems of one split; levels cycle through `self.levels` unless one is given.
        A level that runs out of fresh problems is dropped; with none left, raise (or, not `strict`,
        return the fewer found)."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {', '.join(SPLITS)} (got {split!r})")
        if level is not None and level not in self.levels:
            raise ValueError(f"{self.name}: level must be one of {list(self.levels)} (got {level})")
        rng = random.Random(f"{self.name}/{split}/{TEST_SEED if seed is None and split == 'test' else seed}")
        active = [level] if level is not None else list(self.levels)
        out, seen, misses = [], set(), 0
        while len(out) < n:
            lvl = active[len(out) % len(active)]
            p = self.make(rng, lvl)
            if p.key in seen or split_of(p.key) != split:
                misses += 1
                if misses > 2000:  # this level has no fresh problems left in this split
                    active.remove(lvl)
                    misses = 0
                    if not active and not strict:
                        break
                    if not active:
                        raise ValueError(f"{self.name}: only {len(out)} distinct {split} problems exist"
                                         f"{'' if level is None else f' at level {level}'}; ask for fewer")
                continue
            misses = 0
            seen.add(p.key)
            out.append(p)
        return out


# ---- arithmetic -------------------------------------------------------------------------------

_INT = re.compile(r"-?[0-9]{1,80}")


def _digits(n: int) -> list[int]:
    return [int(c) for c in reversed(str(n))]


@dataclass(frozen=True)
class _Step:
    """One line of a worked solution that a check can verify: `line(v)` writes it with the value v,
    `check(v)` verifies v (ending "ok" when v is right, "redo" when not); `slips` are wrong values a
    careless solver might write instead."""
    value: int
    slips: tuple[int, ...]
    line: Callable[[int], str]
    check: Callable[[int], str]


def _checked(steps: list[_Step], rng: random.Random, slip: float) -> list[str]:
    """Every step followed by its check; with probability `slip` (and a step to spare) one step after the
    first is written wrong, checked, and redone. Never the first: a reader sees the checking before a slip."""
    at = rng.randrange(1, len(steps)) if len(steps) > 1 and rng.random() < slip else -1
    lines = []
    for i, st in enumerate(steps):
        if i == at:
            wrong = rng.choice(st.slips)
            lines += [st.line(wrong), st.check(wrong)]
        lines += [st.line(st.value), st.check(st.value)]
    return lines


class Arithmetic(Task):
    name = "arithmetic"
    levels = (1, 2, 3, 4, 5)  # digits per operand (the multiplier of x has one)
    description = "multi-digit +, - and x by one digit, worked column by column"

    def make(self, rng, level):
        lo, hi = (0 if level == 1 else 10 ** (level - 1)), 10**level - 1
        a, b = rng.randint(lo, hi), rng.randint(lo, hi)
        op = rng.choice("+-x")
        if op == "x" and level > 1:
            b = 2 + b % 8  # a one-digit multiplier, drawn without another rng call (+ and - stay as they were)
        value = a + b if op == "+" else a - b if op == "-" else a * b
        return Problem(self.name, f"{a}{op}{b}", f"What is {a} {op} {b}?", str(value), level,
                       {"a": a, "b": b, "op": op})

    def solution(self, p):
        a, b, op = p.meta["a"], p.meta["b"], p.meta["op"]
        steps = {"+": self._add_steps, "-": self._sub_steps, "x": self._mul_steps}[op](a, b)
        return f"<think>\n{steps}\n</think> <answer>{p.answer}</answer>"

    def brief(self, p):
        a, b, op = p.meta["a"], p.meta["b"], p.meta["op"]
        return f"<think>\nso {a} {op} {b} = {p.answer}\n</think> <answer>{p.answer}</answer>"

    def checked(self, p, rng, slip=0.5):
        a, b, op = p.meta["a"], p.meta["b"], p.meta["op"]
        lines = []
        if op == "-" and a < b:
            lines.append(f"{a} is less than {b}, so compute {b} - {a} and negate")
            lines += _checked(self._sub_checks(b, a), rng, slip) + [f"so {b} - {a} = {b - a}"]
        elif op == "-":
            lines += _checked(self._sub_checks(a, b), rng, slip)
        else:
            steps = self._column_checks(a, b, op)
            lines += _checked(steps, rng, slip)
            if steps[-1].value >= 10:
                lines.append(f"write the last carry {steps[-1].value // 10}")
        lines.append(f"so {a} {op} {b} = {p.answer}")
        return "<think>\n" + "\n".join(lines) + f"\n</think> <answer>{p.answer}</answer>"

    @staticmethod
    def _column_checks(a, b, op):
        """Addition's or multiplication's columns, each checked by splitting it: the sum or product of the
        digits, then the carry added."""
        da, db, steps, carry = _digits(a), _digits(b), [], 0
        for i in range(len(da) if op == "x" else max(len(da), len(db))):
            x = da[i] if i < len(da) else 0
            y = b if op == "x" else (db[i] if i < len(db) else 0)
            part = x * y if op == "x" else x + y
            s = part + carry

            def line(v, x=x, y=y, c=carry):
                return f"{x} {op} {y} + carry {c} = {v}, write {v % 10}, carry {v // 10}"

            def check(v, x=x, y=y, c=carry, part=part, s=s):
                return f"check {x} {op} {y} = {part}, + {c} = {s}, " + ("ok" if v == s else f"not {v}, redo")
            steps.append(_Step(s, tuple(v for v in (s - 10, s - 1, s + 1, s + 10) if v >= 0), line, check))
            carry = s // 10
        return steps

    @staticmethod
    def _sub_checks(a, b):
        """Subtraction's columns (a >= b), each checked by adding the digit written back to the subtrahend."""
        da, db, steps, borrow = _digits(a), _digits(b), [], 0
        for i in range(len(da)):
            x, y = da[i] - borrow, (db[i] if i < len(db) else 0)
            top = x + 10 if x < y else x
            if x < y:
                def line(v, x=x, y=y, top=top):
                    return f"{x} < {y}, borrow: {top} - {y} = {v}"
            else:
                def line(v, x=x, y=y):
                    return f"{x} - {y} = {v}"

            def check(v, y=y, top=top):
                return f"check {v} + {y} = {v + y}, " + ("ok" if v + y == top else f"not {top}, redo")
            d = top - y
            steps.append(_Step(d, tuple(v for v in (d - 1, d + 1) if 0 <= v <= 9), line, check))
            borrow = 1 if x < y else 0
        return steps

    @staticmethod
    def _add_steps(a, b):
        da, db, lines, carry = _digits(a), _digits(b), [], 0
        for i in range(max(len(da), len(db))):
            x, y = (da[i] if i < len(da) else 0), (db[i] if i < len(db) else 0)
            s = x + y + carry
            lines.append(f"{x} + {y} + carry {carry} = {s}, write {s % 10}, carry {s // 10}")
            carry = s // 10
        if carry:
            lines.append(f"write the last carry {carry}")
        return "\n".join(lines + [f"so {a} + {b} = {a + b}"])

    @staticmethod
    def _sub_steps(a, b):
        if a < b:
            return f"{a} is less than {b}, so compute {b} - {a} and negate\n" + \
                Arithmetic._sub_steps(b, a) + f"\nso {a} - {b} = {a - b}"
        da, db, lines, borrow = _digits(a), _digits(b), [], 0
        for i in range(len(da)):
            x, y = da[i] - borrow, (db[i] if i < len(db) else 0)
            if x < y:
                lines.append(f"{x} < {y}, borrow: {x + 10} - {y} = {x + 10 - y}")
                borrow = 1
            else:
                lines.append(f"{x} - {y} = {x - y}")
                borrow = 0
        return "\n".join(lines + [f"so {a} - {b} = {a - b}"])

    @staticmethod
    def _mul_steps(a, b):
        """Column by column like addition, each line one digit of a times the one-digit b plus the
        carry: a product written in one line (141 x 60 = 8460) is beyond a small model."""
        lines, carry = [], 0
        for x in _digits(a):
            s = x * b + carry
            lines.append(f"{x} x {b} + carry {carry} = {s}, write {s % 10}, carry {s // 10}")
            carry = s // 10
        if carry:
            lines.append(f"write the last carry {carry}")
        return "\n".join(lines + [f"so {a} x {b} = {a * b}"])

    def check(self, p, answer):
        return bool(_INT.fullmatch(answer)) and int(answer) == int(p.answer)


# ---- countdown --------------------------------------------------------------------------------

class _Parser:
    """expr := term (('+'|'-') term)*; term := atom (('*'|'x'|'/') atom)*; atom := int | '(' expr ')'."""

    def __init__(self, text: str):
        self.tokens = re.findall(r"\d+|[-+*/x()]|\S", text.replace("×", "x").replace("÷", "/"))
        self.pos, self.numbers = 0, []

    def parse(self) -> Fraction:
        value = self.expr()
        if self.pos != len(self.tokens):
            raise ValueError("trailing input")
        return value

    def peek(self):
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def take(self):
        tok = self.peek()
        self.pos += 1
        return tok

    def expr(self):
        value = self.term()
        while self.peek() in ("+", "-"):
            value = value + self.term() if self.take() == "+" else value - self.term()
        return value

    def term(self):
        value = self.atom()
        while self.peek() in ("*", "x", "/"):
            op, rhs = self.take(), self.atom()
            if op == "/":
                if rhs == 0:
                    raise ValueError("division by zero")
                value /= rhs
            else:
                value *= rhs
        return value

    def atom(self):
        tok = self.take()
        if tok == "(":
            value = self.expr()
            if self.take() != ")":
                raise ValueError("unbalanced parenthesis")
            return value
        if tok is not None and tok.isascii() and tok.isdigit() and len(tok) <= 6:
            self.numbers.append(int(tok))
            return Fraction(int(tok))
        raise ValueError(f"unexpected {tok!r}")


def evaluate(expression: str) -> tuple[Fraction, list[int]]:
    """Value and the integer literals of an arithmetic expression; ValueError if malformed."""
    if len(expression) > 200:
        raise ValueError("expression too long")
    p = _Parser(expression)
    return p.parse(), p.numbers


class Countdown(Task):
    name = "countdown"
    levels = (3, 4)  # how many numbers are given
    description = "reach a target from given numbers with + - x /, each used at most once"

    def make(self, rng, level):
        while True:
            numbers = [rng.randint(1, 25 if i else 100) for i in range(level)]
            order = numbers[:]
            rng.shuffle(order)
            value, expr, steps = order[0], str(order[0]), []
            for n in order[1:]:
                ops = ["+", "x"] + (["-"] if value > n else []) + (["/"] if value % n == 0 and n > 1 else [])
                op = rng.choice(ops)
                new = value + n if op == "+" else value * n if op == "x" else value - n if op == "-" else value // n
                steps.append(f"{value} {op} {n} = {new}")
                expr = f"({expr} {op.replace('x', '*')} {n})"
                value = new
            if 1 <= value <= 999:
                break
        shown = sorted(numbers)
        key = f"{','.join(map(str, shown))}->{value}"
        prompt = (f"Using the numbers {shown}, each at most once, and + - * /, make {value}. "
                  f"Give the expression.")
        return Problem(self.name, key, prompt, expr[1:-1] if expr.startswith("(") else expr, level,
                       {"numbers": shown, "target": value, "steps": steps})

    def solution(self, p):
        """A worked search: up to `MAX_MISSES` tries that miss the target (each a random order and
        choice of operations, every step computed), then the path that reaches it. Seeded by the
        problem, so a problem always has the same solution."""
        rng = random.Random(f"search/{p.key}")
        target, misses, seen = p.meta["target"], [], {tuple(p.meta["steps"])}
        want = rng.randint(0, self.MAX_MISSES)
        for _ in range(8 * want):  # a draw may repeat an earlier one or hit the target
            if len(misses) == want:
                break
            steps, value = self._attempt(rng, p.meta["numbers"])
            if value != target and tuple(steps) not in seen:
                seen.add(tuple(steps))
                misses.append(f"{', '.join(steps)}, not {target}")
        tries = misses + [f"{', '.join(p.meta['steps'])}, that reaches {target}"]
        return "<think>\n" + "\n".join(tries) + f"\n</think> <answer>{p.answer}</answer>"

    MAX_MISSES = 3

    @staticmethod
    def _attempt(rng: random.Random, numbers: list[int]) -> tuple[list[str], int]:
        order = numbers[:]
        rng.shuffle(order)
        value, steps = order[0], []
        for n in order[1:]:
            ops = ["+", "x"] + (["-"] if value > n else []) + (["/"] if n > 1 and value % n == 0 else [])
            op = rng.choice(ops)
            new = value + n if op == "+" else value * n if op == "x" else value - n if op == "-" else value // n
            steps.append(f"{value} {op} {n} = {new}")
            value = new
        return steps, value

    def brief(self, p):
        return f"<think>\n{p.answer} = {p.meta['target']}\n</think> <answer>{p.answer}</answer>"

    def check(self, p, answer):
        try:
            value, used = evaluate(answer)
        except (ValueError, ZeroDivisionError):
            return False
        pool = list(p.meta["numbers"])
        for n in used:
            if n not in pool:
                return False
            pool.remove(n)
        return value == p.meta["target"]


# ---- sorting ----------------------------------------------------------------------------------

_LIST = re.compile(r"[0-9]{1,3}(?:, ?[0-9]{1,3}){0,15}")


class Sort(Task):
    """Not arithmetic: put a few two-digit numbers in order. The worked solution is selection sort,
    one "smallest of ... is ..." line per pick, so each line compares the numbers still left."""

    name = "sort"
    levels = (3, 4, 5, 6)  # how many numbers
    description = "sort distinct numbers below 100, picking the smallest left each line"

    def make(self, rng, level):
        numbers = rng.sample(range(100), level)
        shown = ", ".join(map(str, numbers))
        return Problem(self.name, shown, f"Sort {shown} from smallest to largest.",
                       ", ".join(map(str, sorted(numbers))), level, {"numbers": numbers})

    def solution(self, p):
        left, lines = list(p.meta["numbers"]), []
        while len(left) > 1:
            smallest = min(left)
            lines.append(f"smallest of {', '.join(map(str, left))} is {smallest}")
            left.remove(smallest)
        lines.append(f"{left[0]} is left")
        return "<think>\n" + "\n".join(lines) + f"\n</think> <answer>{p.answer}</answer>"

    def brief(self, p):
        return f"<think>\nin order: {p.answer}\n</think> <answer>{p.answer}</answer>"

    def checked(self, p, rng, slip=0.5):
        """Each pick checked against the numbers left, in order, up to the first that is smaller."""
        left, steps = list(p.meta["numbers"]), []
        while len(left) > 1:
            shown, smallest = ", ".join(map(str, left)), min(left)

            def line(v, shown=shown):
                return f"smallest of {shown} is {v}"

            def check(v, left=tuple(left)):
                parts = []
                for w in left:
                    if w != v:
                        parts.append(f"{v} {'<' if v < w else '>'} {w}")
                        if w < v:
                            break
                return f"check {', '.join(parts)}, " + ("ok" if v == min(left) else "redo")
            steps.append(_Step(smallest, tuple(v for v in left if v != smallest), line, check))
            left.remove(smallest)
        lines = _checked(steps, rng, slip) + [f"{left[0]} is left"]
        return "<think>\n" + "\n".join(lines) + f"\n</think> <answer>{p.answer}</answer>"

    def check(self, p, answer):
        return bool(_LIST.fullmatch(answer)) and \
            [int(x) for x in answer.split(",")] == sorted(p.meta["numbers"])


TASKS: dict[str, Task] = {t.name: t for t in (Arithmetic(), Countdown(), Sort())}


class Mixture(Task):
    """Several (task, level) pairs trained or evaluated as one task, e.g. `arithmetic@2,countdown@3`:
    problems cycle through the pairs, and each is verified by its own task. What lets one GRPO run
    practise a curriculum of levels, or two tasks at once."""

    def __init__(self, entries: list[tuple[Task, int]]):
        self.entries = entries
        self.name = ",".join(f"{t.name}@{lv}" for t, lv in entries)
        self.levels = tuple(sorted({lv for _, lv in entries}))
        self.description = "a mixture of " + ", ".join(f"{t.name} level {lv}" for t, lv in entries)

    def solution(self, problem):
        return TASKS[problem.task].solution(problem)

    def brief(self, problem):
        return TASKS[problem.task].brief(problem)

    def checked(self, problem, rng, slip=0.5):
        return TASKS[problem.task].checked(problem, rng, slip)

    def check(self, problem, answer):
        return TASKS[problem.task].check(problem, answer)

    def problems(self, split, n, level=None, seed=None, strict=True):
        """n problems, the pairs' shares interleaved (so any P consecutive ones mix them); `level` must be None."""
        if level is not None:
            raise ValueError(f"{self.name}: a mixture's levels are in its name; give no separate level")
        share = [task.problems(split, n // len(self.entries) + (i < n % len(self.entries)), level=lv, seed=seed,
                               strict=strict) for i, (task, lv) in enumerate(self.entries)]
        return [p for row in itertools.zip_longest(*share) for p in row if p is not None]


def get_task(name: str) -> Task:
    """A task by name, or a mixture `NAME@LEVEL,NAME@LEVEL,...` (a bare NAME in a mixture: all its levels)."""
    if name in TASKS:
        return TASKS[name]
    unknown = ValueError(f"unknown task {name!r}; choose one of: {', '.join(TASKS)}, or a mixture such as "
                         f"arithmetic@2,arithmetic@3,sort@4")
    parts = name.split(",") if ("," in name or "@" in name) else []
    if not parts:
        raise unknown
    entries = []
    for part in parts:
        base, _, level = part.strip().partition("@")
        if base not in TASKS:
            raise unknown
        task = TASKS[base]
        if not level:
            entries += [(task, lv) for lv in task.levels]
        elif level.isdigit() and int(level) in task.levels:
            entries.append((task, int(level)))
        else:
            raise ValueError(f"{part!r} in task {name!r}: {base} has levels {list(task.levels)}")
    return Mixture(entries)


def task_name(name: str) -> str:
    """argparse type for --task: the name, checked (a clear error names the choices)."""
    import argparse
    try:
        get_task(name)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return name
