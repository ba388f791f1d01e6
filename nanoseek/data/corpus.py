"""A generated raw corpus: task solutions, prose, code and Chinese text, with planted junk and duplicates.

    write_corpus("raw/", megabytes=200, seed=0)

The project's own stand-in for a web crawl: it lets curation, tokenizer training and pretraining
run with nothing downloaded. By default, by documents: 55% worked task solutions (math), 25%
English prose, 12% code, 8% Chinese (by bytes about 40 / 30 / 15 / 10, the rest junk); about 3%
of documents are exact copies (some with case or spacing changed), 2% near copies (one word
changed) of earlier ones, 1% junk. `kinds` changes the document mix and `tasks` which tasks and
levels the solutions come from, each (task, level) entry equally likely (repeat one to weight it):

    write_corpus("raw/", 30, kinds={"math": 0.85, "prose": 0.1, "code": 0.05},
                 tasks={"arithmetic": (1, 2, 2, 3), "countdown": (3,)}, brief=0.5)

`brief` is the share of task documents that give the answer without the working (the task's
`brief` form), as most answers on the web do: a model pretrained on such a mix knows both ways
to answer, and which one it picks is what RL can change (docs/log.md has what that gave). `checked`
is the share worked with a check after every step, some with a slip the check catches and redoes
(`Task.checked`): a base that knows a slower, self-verifying way to work, which RL can make its habit.
`chat` is the share laid out as a chat turn in the model's own template (`<｜User｜>` problem
`<｜Assistant｜>` solution `<｜end▁of▁sentence｜>`, the shard's beginning-of-sentence token before it):
the mid-training that lets a base answer in the layout its fine-tuning and serving use.
`ops` weights arithmetic's operations (e.g. `{"-": 2}`: subtraction twice as often as + or x; the
test problems keep their even mix).

Task problems always come from the train split, so test and validation problems never leak in.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from ..tokenizer import ASSISTANT, EOS, USER
from .tasks import TASKS, split_of

_EN = ("the of and to in is was for on that with as by at from his her they this which were had are "
       "river mountain city bright night story people open read write garden letter window morning friend "
       "voice water stone paper winter summer forest market train music silver golden quiet distant small "
       "large ancient modern careful sudden gentle simple strange early late road field harbor island "
       "teacher student doctor farmer painter sailor walked spoke found carried watched remembered built").split()
_HANZI = "的一是在不了有和人这中大为上个国我以要他时来用们生到作地于出就分对成会可主发年动同工也能下过子说产种面而方后多定行学法所民得经"
_NAMES = "alpha beta gamma delta total count value index item result buffer node size limit".split()


def _prose(rng: random.Random) -> str:
    sentences = []
    for _ in range(rng.randint(4, 30)):
        words = [rng.choice(_EN) for _ in range(rng.randint(6, 20))]
        sentences.append(" ".join(words).capitalize() + rng.choice(".!?"))
    return " ".join(sentences)


def _code(rng: random.Random) -> str:
    lines = []
    for _ in range(rng.randint(1, 4)):
        f, a, b = rng.choice(_NAMES), rng.choice(_NAMES), rng.choice(_NAMES)
        k = rng.randint(2, 99)
        lines += [f"def {f}_{k}({a}, {b}):", f"    {f} = {a} * {k} + {b}",
                  f"    if {f} > {rng.randint(100, 999)}:", f"        return {f} - {b}", f"    return {f}", ""]
    return "\n".join(lines)


def _chinese(rng: random.Random) -> str:
    return "。".join("".join(rng.choice(_HANZI) for _ in range(rng.randint(8, 30)))
                    for _ in range(rng.randint(3, 15))) + "。"


KINDS = {"math": 0.55, "prose": 0.25, "code": 0.12, "chinese": 0.08}


def _task(rng: random.Random, tasks: dict[str, tuple[int, ...]], brief: float = 0.0,
          ops: dict[str, float] | None = None, checked: float = 0.0, chat: float = 0.0) -> dict:
    """A train-split problem and its worked solution; with probability `brief` its answer alone, with
    probability `checked` the working with every step checked (`Task.checked`), with probability `chat`
    as a chat turn (independently of the other two): test and validation
    problems never leak into pretraining. Every (task, level) entry is equally likely; an empty
    tuple means all of the task's levels once."""
    entries = [(name, lv) for name, levels in tasks.items() for lv in (levels or TASKS[name].levels)]
    name, level = rng.choice(entries)
    task = TASKS[name]
    top = max(ops.values()) if ops else 0
    while (split_of((p := task.make(rng, level)).key) != "train"
           or ops and name == "arithmetic" and rng.random() * top >= ops.get(p.meta["op"], 1.0)):
        pass  # an operation of weight w is kept w / (the largest weight) of the times it is drawn
    r = rng.random() if brief or checked else 1.0  # no draw by default: the stream stays as it was
    text = task.brief(p) if r < brief else task.checked(p, rng) if r < brief + checked else task.solution(p)
    if chat and rng.random() < chat:  # as render_chat lays out a turn; the shard puts the BOS before it
        return {"text": f"{USER}{p.prompt}{ASSISTANT}{text}{EOS}", "difficulty": p.level, "task": task.name}
    return {"text": f"{p.prompt}\n{text}", "difficulty": p.level, "task": task.name}


def documents(rng: random.Random, kinds: dict[str, float] | None = None,
              tasks: dict[str, tuple[int, ...]] | None = None, brief: float = 0.0,
              ops: dict[str, float] | None = None, checked: float = 0.0, chat: float = 0.0):
    """An endless stream of raw records ({"text": ...} plus task metadata)."""
    _check_shares(brief, checked, chat)
    ops = _check_ops(ops)
    kinds = _check_kinds(kinds or KINDS)
    tasks = _check_tasks(tasks or {name: () for name in TASKS})
    names, weights = list(kinds), list(kinds.values())
    makers = {"math": lambda: _task(rng, tasks, brief, ops, checked, chat), "prose": lambda: {"text": _prose(rng)},
              "code": lambda: {"text": _code(rng)}, "chinese": lambda: {"text": _chinese(rng)}}
    recent: list[str] = []
    while True:
        r = rng.random()
        if r < 0.03 and recent:
            text = rng.choice(recent)
            yield {"text": rng.choice([text, text.upper(), text.replace(" ", "  ")])}
            continue
        if r < 0.05 and recent:
            words = rng.choice(recent).split(" ")
            if len(words) > 60:
                words[rng.randrange(len(words))] = "changed"
                yield {"text": " ".join(words)}
                continue
        if r < 0.06:
            yield {"text": "".join(rng.choice("#$%&@|~{}[]^_") for _ in range(rng.randint(5, 200)))}
            continue
        record = makers[rng.choices(names, weights)[0]]()
        if len(record["text"]) > 400:
            recent = (recent + [record["text"]])[-200:]
        yield record


def _check_kinds(kinds: dict[str, float]) -> dict[str, float]:
    bad = [k for k in kinds if k not in KINDS]
    if bad or not kinds or any(not w >= 0 for w in kinds.values()) or not sum(kinds.values()) > 0:
        raise ValueError(f"corpus kinds must be weights >= 0 (not all 0) for some of {', '.join(KINDS)} "
                         f"(got {kinds})")
    return kinds


def _check_shares(brief: float, checked: float = 0.0, chat: float = 0.0) -> None:
    if not 0 <= brief <= 1:
        raise ValueError(f"brief is the share of task documents without their working: 0 to 1 (got {brief})")
    if not (checked >= 0 and brief + checked <= 1 + 1e-9):
        raise ValueError(f"checked is the share of task documents whose steps are checked: 0 to 1 - brief "
                         f"({1 - brief:g}) (got {checked})")
    if not 0 <= chat <= 1:
        raise ValueError(f"chat is the share of task documents laid out as a chat turn: 0 to 1 (got {chat})")


def _check_ops(ops: dict[str, float] | None) -> dict[str, float] | None:
    if ops and (set(ops) - set("+-x") or any(not w >= 0 for w in ops.values()) or not max(ops.values()) > 0):
        raise ValueError(f"ops weights arithmetic's operations: weights >= 0 (not all 0) for some of +, -, x "
                         f"(got {ops})")
    return ops or None


def _check_tasks(tasks: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    for name, levels in tasks.items():
        if name not in TASKS:
            raise ValueError(f"unknown task {name!r} in the corpus mix; choose from {', '.join(TASKS)}")
        if any(lv not in TASKS[name].levels for lv in levels):
            raise ValueError(f"{name}: levels must be among {list(TASKS[name].levels)} (got {list(levels)})")
    if not tasks:
        raise ValueError("the corpus mix needs at least one task")
    return tasks


def write_corpus(out: str | Path, megabytes: float, seed: int = 0, file_megabytes: float = 32,
                 kinds: dict[str, float] | None = None, tasks: dict[str, tuple[int, ...]] | None = None,
                 brief: float = 0.0, ops: dict[str, float] | None = None, checked: float = 0.0,
                 chat: float = 0.0) -> list[Path]:
    """Write about `megabytes` of jsonl into `out`, in files of about `file_megabytes`."""
    _check_shares(brief, checked, chat)
    _check_ops(ops)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    stream = documents(rng, kinds, tasks, brief, ops, checked, chat)
    files, total = [], 0
    limit = int(megabytes * 1e6)
    while total < limit:
        path = out / f"raw-{len(files):04d}.jsonl"
        files.append(path)
        size = 0
        with open(path, "w", encoding="utf-8") as f:
            while size < file_megabytes * 1e6 and total + size < limit:
                line = json.dumps(next(stream), ensure_ascii=False) + "\n"
                f.write(line)
                size += len(line.encode())
        total += size
    return files
