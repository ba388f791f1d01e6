"""A generated raw corpus: task solutions, prose, code and Chinese text, with planted junk and duplicates.

    write_corpus("raw/", megabytes=200, seed=0)

The project's own stand-in for a web crawl: it lets curation, tokenizer training and pretraining
run with nothing downloaded. Mix by bytes: about 40% worked task solutions (math), 30% English
prose, 15% code, 10% Chinese, the rest junk; about 3% of documents are exact copies (some with
case or spacing changed) and 2% near copies (one word changed) of earlier ones.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

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


def _task(rng: random.Random) -> dict:
    """A worked solution of a train-split problem: test and validation problems never leak into pretraining."""
    task = TASKS[rng.choice(list(TASKS))]
    while split_of((p := task.make(rng, rng.choice(task.levels))).key) != "train":
        pass
    return {"text": f"{p.prompt}\n{task.solution(p)}", "difficulty": p.level, "task": task.name}


def documents(rng: random.Random):
    """An endless stream of raw records ({"text": ...} plus task metadata)."""
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
        kind = rng.random()
        if kind < 0.55:
            record = _task(rng)
        elif kind < 0.80:
            record = {"text": _prose(rng)}
        elif kind < 0.92:
            record = {"text": _code(rng)}
        else:
            record = {"text": _chinese(rng)}
        if len(record["text"]) > 400:
            recent = (recent + [record["text"]])[-200:]
        yield record


def write_corpus(out: str | Path, megabytes: float, seed: int = 0, file_megabytes: float = 32) -> list[Path]:
    """Write about `megabytes` of jsonl into `out`, in files of about `file_megabytes`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    stream = documents(rng)
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
