import pytest

from nanoseek.data.tasks import TASKS, Problem, evaluate, extract_answer, get_task, split_of
from fractions import Fraction

arith = TASKS["arithmetic"]
countdown = TASKS["countdown"]
sort = TASKS["sort"]
P_ADD = Problem("arithmetic", "123+456", "What is 123 + 456?", "579", 3, {"a": 123, "b": 456, "op": "+"})
P_SUB = Problem("arithmetic", "12-456", "What is 12 - 456?", "-444", 3, {"a": 12, "b": 456, "op": "-"})
P_CD = Problem("countdown", "3,7,25->46", "...", "25 + 3 * 7", 3, {"numbers": [3, 7, 25], "target": 46})


@pytest.mark.parametrize("completion, ok", [
    ("<think>x</think> <answer>579</answer>", True),
    ("<answer> 579 </answer>", True),
    ("<think>...</think> <answer>579</answer> and some text after", True),  # format reward judges that
    ("<answer>578</answer>", False),
    ("<answer>579</answer><answer>579</answer>", False),  # several answer tags
    ("<answer>578</answer> no wait <answer>579</answer>", False),
    ("579", False),  # no tag
    ("<answer>579", False),
    ("<answer>５７９</answer>", False),  # unicode (full-width) digits
    ("<answer>579.0</answer>", False),
    ("<answer>+579</answer>", False),
    ("<answer>" + "9" * 5000 + "</answer>", False),  # huge number
    ("<answer>5 7 9</answer>", False),
    ("<answer><answer>579</answer></answer>", False),
])
def test_arithmetic_verifier(completion, ok):
    assert arith.verify(P_ADD, completion) is ok


def test_negative_answers():
    assert arith.verify(P_SUB, "<answer>-444</answer>")
    assert not arith.verify(P_SUB, "<answer>444</answer>")


@pytest.mark.parametrize("answer, ok", [
    ("25 + 3 * 7", True),
    ("3 * 7 + 25", True),
    ("(25 + 21)", False),  # 21 is not given
    ("25 + 3 x 7", True),  # x accepted for multiplication
    ("25 + 3 × 7", True),
    ("25 + 25 - 4", False),  # 25 reused, 4 not given
    ("7 * 7 - 3", False),  # 7 reused
    ("25 / (7 - 7) + 46", False),  # division by zero (and reuse)
    ("46", False),
    ("25 + 3 * 7 = 46", False),
    ("__import__('os').system('echo hi')", False),  # never evaluated as Python
    ("(25 + 3 * 7", False),
    ("25 + 3 ** 7", False),
    ("２５ + 3 * 7", False),
    ("", False),
])
def test_countdown_verifier(answer, ok):
    assert countdown.verify(P_CD, f"<think>t</think> <answer>{answer}</answer>") is ok


def test_countdown_division_is_exact():
    assert evaluate("7 / 2")[0] == Fraction(7, 2)
    p = Problem("countdown", "k", "...", "", 3, {"numbers": [2, 3, 7], "target": 3})
    assert not countdown.check(p, "7 / 2")  # 3.5, not floored to 3
    assert countdown.check(p, "(7 + 2) / 3")
    p = Problem("countdown", "k", "...", "", 3, {"numbers": [2, 4, 6], "target": 5})
    assert countdown.check(p, "(4 + 6) / 2")


def test_countdown_solutions_are_searches_whose_misses_are_computed_and_miss():
    import re
    misses = []
    for p in countdown.problems("train", 200, seed=3):
        text = countdown.solution(p)
        assert text == countdown.solution(p) and countdown.verify(p, text)  # the same every time, and right
        lines = text.split("\n")[1:-1]
        assert lines[-1].endswith(f"that reaches {p.meta['target']}") and len(lines) <= 1 + countdown.MAX_MISSES
        misses.append(len(lines) - 1)
        for line in lines:
            steps = re.findall(r"(\d+) ([-+x/]) (\d+) = (\d+)", line)
            assert len(steps) == p.level - 1
            used = [int(steps[0][0])] + [int(s[2]) for s in steps]
            assert sorted(used) == sorted(p.meta["numbers"])
            for (a, op, b, c), nxt in zip(steps, steps[1:] + [None]):
                a, b, c = int(a), int(b), int(c)
                assert c == {"+": a + b, "-": a - b, "x": a * b, "/": a // b}[op] and (op != "/" or a % b == 0)
                assert nxt is None or int(nxt[0]) == c
            if line.endswith(", not " + str(p.meta["target"])):
                assert int(steps[-1][3]) != p.meta["target"]
    assert set(misses) == set(range(countdown.MAX_MISSES + 1))  # searches of every length occur


def test_multiplication_is_by_one_digit_and_worked_digit_by_digit():
    import re
    muls = [p for p in arith.problems("train", 600, level=3, seed=5) if p.meta["op"] == "x"]
    assert muls and all(2 <= p.meta["b"] <= 9 for p in muls)
    for p in muls:
        a, b = p.meta["a"], p.meta["b"]
        lines = arith.solution(p).split("\n")[1:-1]
        steps = [re.fullmatch(r"(\d) x (\d) \+ carry (\d) = (\d+), write (\d), carry (\d)", ln) for ln in lines]
        steps = [[int(g) for g in m.groups()] for m in steps if m]
        assert [s[0] for s in steps] == [int(c) for c in reversed(str(a))]
        carry, written = 0, []
        for x, y, c, total, write, out in steps:
            assert y == b and c == carry and total == x * y + c and (write, out) == (total % 10, total // 10)
            carry, written = out, written + [write]
        last = [f"write the last carry {carry}"] if carry else []
        assert lines[len(steps):] == last + [f"so {a} x {b} = {a * b}"]
        assert int("".join(map(str, reversed(written + ([carry] if carry else []))))) == a * b


P_SORT = Problem("sort", "42, 7, 19", "Sort 42, 7, 19 from smallest to largest.", "7, 19, 42", 3,
                 {"numbers": [42, 7, 19]})


@pytest.mark.parametrize("answer, ok", [
    ("7, 19, 42", True), ("7,19,42", True),
    ("42, 19, 7", False), ("7, 19", False), ("7, 19, 42, 42", False), ("7, 19, 42,", False),
    ("7 19 42", False), ("07, 19, 42", True),  # the numbers, not their spelling
    ("7, 19, 4２", False), ("[7, 19, 42]", False), ("", False),
])
def test_sort_verifier(answer, ok):
    assert sort.verify(P_SORT, f"<think>t</think> <answer>{answer}</answer>") is ok


def test_sort_solutions_pick_the_smallest_left_each_line():
    assert sort.solution(P_SORT) == ("<think>\nsmallest of 42, 7, 19 is 7\nsmallest of 42, 19 is 19\n"
                                     "42 is left\n</think> <answer>7, 19, 42</answer>")
    for p in sort.problems("test", 40):
        assert len(set(p.meta["numbers"])) == p.level and len(sort.solution(p).split("\n")) == p.level + 2


def test_extract_answer():
    assert extract_answer("<answer>\n42\n</answer>") == "42"
    assert extract_answer("<answer>1</answer> <answer>2</answer>") is None
    assert extract_answer("nothing") is None


@pytest.mark.parametrize("name", list(TASKS))
def test_splits_are_disjoint_and_deterministic(name):
    task = TASKS[name]
    train = task.problems("train", 3000, seed=0)
    val = task.problems("validation", 200)
    test = task.problems("test", 200)
    keys = [{p.key for p in s} for s in (train, val, test)]
    assert not (keys[0] & keys[1]) and not (keys[0] & keys[2]) and not (keys[1] & keys[2])
    assert all(split_of(p.key) == "test" for p in test)
    assert [p.key for p in task.problems("test", 200)] == [p.key for p in test]  # the test split is fixed
    assert [p.key for p in task.problems("train", 50, seed=1)] != [p.key for p in train[:50]]


@pytest.mark.parametrize("name", list(TASKS))
def test_worked_solutions_verify(name):
    task = TASKS[name]
    for p in task.problems("train", 300, seed=3):
        solution = task.solution(p)
        assert solution.startswith("<think>") and "</think> <answer>" in solution
        assert task.verify(p, solution), (p, solution)


@pytest.mark.parametrize("name", list(TASKS))
def test_brief_solutions_verify_and_are_the_worked_conclusion(name):
    """A brief label: the right answer with one line of <think>, and that line never longer than the working."""
    task = TASKS[name]
    for p in task.problems("train", 300, seed=4):
        brief, worked = task.brief(p), task.solution(p)
        assert task.verify(p, brief), (p, brief)
        think = brief.split("</think>")[0].removeprefix("<think>\n").rstrip("\n")
        assert "\n" not in think and len(brief) < len(worked)
        if name == "arithmetic":
            assert think == worked.split("\n</think>")[0].splitlines()[-1]  # the worked form's last line


_STEP = {  # a step line's pattern, and its check's: what the two must agree on is below
    "column": (r"(\d+) ([+x]) (\d+) \+ carry (\d+) = (\d+), write (\d), carry (\d+)",
               r"check (\d+) ([+x]) (\d+) = (\d+), \+ (\d+) = (\d+), (?:ok|not (\d+), redo)"),
    "sub": (r"(?:(-?\d+) - (\d+)|(-?\d+) < (\d+), borrow: (\d+) - \d+) = (\d+)",
            r"check (\d+) \+ (\d+) = (\d+), (?:ok|not (\d+), redo)"),
    "sort": (r"smallest of ([\d, ]+) is (\d+)", r"check ((?:\d+ [<>] \d+, )+)(ok|redo)"),
}


def _step_checked(step: str, check: str) -> bool | None:
    """None when `step` is no step line; else whether `check` is the right check of it: about the same
    numbers, with true arithmetic, "ok" exactly when the step is right."""
    import re
    if m := re.fullmatch(_STEP["column"][0], step):
        x, op, y, c, v, w, k = map(lambda g: g if g in "+x" else int(g), m.groups())
        if not (n := re.fullmatch(_STEP["column"][1], check)):
            return False
        cx, cop, cy, part, cc, s, shown = n.groups()
        right = int(part) == (x + y if op == "+" else x * y) and int(s) == int(part) + c
        return (right and (cx, cop, cy, cc) == (str(x), op, str(y), str(c)) and (w, k) == (v % 10, v // 10)
                and (shown is None) == (v == int(s)) and shown in (None, str(v)))
    if m := re.fullmatch(_STEP["sub"][0], step):
        x, y, bx, by, top, v = m.groups()
        y, top, v = int(y or by), int(x if x is not None else top), int(v)
        if bx is not None and not int(bx) < y:
            return False
        if not (n := re.fullmatch(_STEP["sub"][1], check)):
            return False
        cv, cy, t, expected = n.groups()
        return ((int(cv), int(cy)) == (v, y) and int(t) == v + y and (expected is None) == (v + y == top)
                and expected in (None, str(top)))
    if m := re.fullmatch(_STEP["sort"][0], step):
        left, v = [int(n) for n in m.group(1).split(", ")], int(m.group(2))
        if not (n := re.fullmatch(_STEP["sort"][1], check)):
            return False
        pairs = [(int(a), o, int(b)) for a, o, b in re.findall(r"(\d+) ([<>]) (\d+)", n.group(1))]
        others = [w for w in left if w != v]
        if any(a != v or (a < b) != (o == "<") for a, o, b in pairs) or [b for _, _, b in pairs] != others[:len(pairs)]:
            return False
        if n.group(2) == "ok":  # every other number compared, and all larger
            return v == min(left) and len(pairs) == len(others) and all(o == "<" for _, o, _ in pairs)
        return v != min(left) and pairs[-1][1] == ">" and all(o == "<" for _, o, _ in pairs[:-1])
    return None


def _checks_hold(completion: str) -> bool:
    """Every step line followed by its right check, and every check line after a step."""
    lines = completion.split("</think>")[0].split("\n")[1:]
    for i, line in enumerate(lines):
        is_step = _step_checked(line, lines[i + 1] if i + 1 < len(lines) else "")
        if is_step is False or is_step is None and line.startswith("check ") and \
                _step_checked(lines[i - 1], line) is None:
            return False
    return True


@pytest.mark.parametrize("name", ["arithmetic", "sort"])
def test_checked_solutions_are_the_working_with_true_checks_and_slips_caught(name):
    """Without a slip, a checked solution is the worked one with the right check after every step; a slip
    is one wrong step after the first, which its check rejects, and the right step follows."""
    import random

    task = TASKS[name]
    rng = random.Random(0)
    slipped = 0
    for p in task.problems("train", 300, seed=6) + (arith.problems("train", 40, level=1, seed=7) if name == "arithmetic"
                                                    else []):
        clean = task.checked(p, rng, slip=0.0)
        lines = clean.split("\n")
        steps = [ln for ln in lines if _step_checked(ln, "") is not None]
        checks = [ln for ln in lines if ln.startswith("check ")]
        assert task.verify(p, clean) and _checks_hold(clean), clean
        assert len(checks) == len(steps) > 0 and all(c.endswith(", ok") for c in checks), clean
        if name == "sort":
            assert len(steps) == p.level - 1
        assert "\n".join(ln for ln in lines if not ln.startswith("check ")) == task.solution(p)
        slip = task.checked(p, rng, slip=1.0)
        if len(steps) == 1:  # nowhere to slip after a first step
            assert slip == clean
            continue
        slipped += 1
        sl = slip.split("\n")
        redo = [i for i, ln in enumerate(sl) if ln.endswith("redo")]
        assert task.verify(p, slip) and _checks_hold(slip) and len(redo) == 1, slip
        i = redo[0]
        assert i > sl.index(checks[0]) and sl[i - 1] != sl[i + 1]  # never the first step; redone differently
        assert "\n".join(sl[:i - 1] + sl[i + 1:]) == clean  # the slip and its check taken out leave the clean one
    assert slipped > 200


def test_a_wrong_check_is_caught():
    """The checker above can fail: a check of another column, a false "ok", a sort check that skips a number."""
    assert _step_checked("8 + 6 + carry 0 = 14, write 4, carry 1", "check 8 + 6 = 14, + 0 = 14, ok")
    assert not _step_checked("8 + 6 + carry 0 = 14, write 4, carry 1", "check 8 + 5 = 13, + 1 = 14, ok")
    assert not _step_checked("8 + 6 + carry 0 = 15, write 5, carry 1", "check 8 + 6 = 14, + 0 = 14, ok")
    assert _step_checked("8 + 6 + carry 0 = 15, write 5, carry 1", "check 8 + 6 = 14, + 0 = 14, not 15, redo")
    assert not _step_checked("5 - 3 = 3", "check 3 + 3 = 6, ok")
    assert _step_checked("5 - 3 = 3", "check 3 + 3 = 6, not 5, redo")
    assert _step_checked("smallest of 7, 3, 9 is 3", "check 3 < 7, 3 < 9, ok")
    assert not _step_checked("smallest of 7, 3, 9 is 3", "check 3 < 9, ok")
    assert not _step_checked("smallest of 7, 3, 9 is 7", "check 7 > 3, 7 < 9, ok")
    assert _step_checked("smallest of 7, 3, 9 is 7", "check 7 > 3, redo")
    assert not _checks_hold("<think>\n8 + 6 + carry 0 = 14, write 4, carry 1\nso 8 + 6 = 14\n</think>")


def test_checked_share_writes_that_share_of_task_documents_with_checks(tmp_path):
    import json

    from nanoseek.data.corpus import write_corpus

    files = write_corpus(tmp_path / "c", 0.2, seed=2, kinds={"math": 1.0}, tasks={"arithmetic": (2, 3), "sort": (4,)},
                         checked=0.3)
    docs = [r for f in files for line in f.read_text().splitlines() if (r := json.loads(line)).get("task")]
    checked = [r["text"] for r in docs if "\ncheck " in r["text"]]
    assert 0.22 < len(checked) / len(docs) < 0.38
    assert 0.35 < sum("redo" in t for t in checked) / len(checked) < 0.65  # half with a slip
    for text in checked:
        completion = text.split("\n", 1)[1]
        assert completion.endswith("</answer>") and _checks_hold(completion), completion
    with pytest.raises(ValueError, match="checked is the share"):
        write_corpus(tmp_path / "bad", 0.01, brief=0.8, checked=0.3)


def test_chat_share_lays_task_documents_out_as_the_chat_template_renders_them(tmp_path):
    """A chat document, behind the BOS its shard puts first, is token for token the conversation SFT trains on."""
    import json

    from nanoseek.data.corpus import write_corpus
    from nanoseek.tokenizer import ASSISTANT, EOS, USER, Tokenizer

    files = write_corpus(tmp_path / "c", 0.2, seed=2, kinds={"math": 1.0}, tasks={"arithmetic": (2, 3), "sort": (4,)},
                         chat=0.3)
    docs = [r["text"] for f in files for line in f.read_text().splitlines() if (r := json.loads(line)).get("task")]
    chats = [t for t in docs if t.startswith(USER)]
    assert 0.22 < len(chats) / len(docs) < 0.38
    assert all(t.endswith(EOS) and t.count(ASSISTANT) == 1 for t in chats)
    assert all(USER not in t and EOS not in t for t in docs if t not in chats)
    tok = Tokenizer.train(docs, vocab_size=400)
    for text in chats[:30]:
        prompt, answer = text[len(USER):-len(EOS)].split(ASSISTANT)
        ids, mask = tok.render_chat([{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}])
        assert [tok.bos_id] + tok.encode(text) == ids
        assert tok.decode([i for i, m in zip(ids, mask) if m]) == answer + EOS
    with pytest.raises(ValueError, match="chat is the share"):
        write_corpus(tmp_path / "bad", 0.01, chat=1.5)


@pytest.mark.parametrize("name", list(TASKS))
def test_levels(name):
    task = TASKS[name]
    for level in task.levels:
        assert {p.level for p in task.problems("train", 20, level=level, seed=0)} == {level}
    with pytest.raises(ValueError, match="level must be one of"):
        task.problems("train", 1, level=99)


def test_arithmetic_levels_are_digit_counts():
    for p in arith.problems("train", 50, level=4, seed=0):
        assert len(str(p.meta["a"])) == 4 and len(str(p.meta["b"])) == (1 if p.meta["op"] == "x" else 4)


def test_exhausted_split_is_a_clear_error():
    with pytest.raises(ValueError, match="distinct test problems exist at level 1"):
        arith.problems("test", 1000, level=1)


def test_unknown_task():
    with pytest.raises(ValueError, match="unknown task 'chess'"):
        get_task("chess")


def test_the_generated_corpus_holds_no_test_or_validation_problem(tmp_path):
    import json

    from nanoseek.data.corpus import write_corpus
    from nanoseek.data.tasks import split_of

    files = write_corpus(tmp_path, 0.5, seed=3)
    records = [json.loads(line) for f in files for line in f.read_text().splitlines()]
    prompts = [r["text"].split("\n", 1)[0] for r in records if r.get("task")]
    assert len(prompts) > 300
    by_prompt = {p.prompt: p for t in TASKS.values() for split in ("test", "validation")
                 for p in t.problems(split, 100 if t.name == "countdown" else 400)}
    assert not [p for p in prompts if p in by_prompt]
    arithmetic = [p for p in prompts if p.startswith("What is")]
    keys = [p[len("What is "):-1].replace(" ", "") for p in arithmetic]
    assert all(split_of(k) == "train" for k in keys)


def test_a_small_level_gives_what_it_has_when_not_strict():
    with pytest.raises(ValueError, match="only 16 distinct test problems exist at level 1"):
        arith.problems("test", 100, level=1)
    got = arith.problems("test", 100, level=1, strict=False)
    assert got == arith.problems("test", 16, level=1) and len({p.key for p in got}) == 16


def test_corpus_mix_and_levels_are_honoured_and_checked(tmp_path):
    import json

    from nanoseek.data.corpus import write_corpus

    files = write_corpus(tmp_path / "a", 0.3, seed=1, kinds={"math": 1.0, "prose": 0.0},
                         tasks={"arithmetic": (2, 2, 3), "countdown": (3,)})
    records = [json.loads(line) for f in files for line in f.read_text().splitlines()]
    tasks = [r for r in records if r.get("task")]
    assert len(tasks) / len(records) > 0.9  # the rest: planted copies and junk
    levels = [(r["task"], r["difficulty"]) for r in tasks]
    assert set(levels) == {("arithmetic", 2), ("arithmetic", 3), ("countdown", 3)}
    share2 = levels.count(("arithmetic", 2)) / len(levels)
    assert 0.4 < share2 < 0.6  # two of the four entries
    with pytest.raises(ValueError, match="levels must be among"):
        write_corpus(tmp_path / "b", 0.01, tasks={"arithmetic": (9,)})
    with pytest.raises(ValueError, match="unknown task 'chess'"):
        write_corpus(tmp_path / "c", 0.01, tasks={"chess": ()})
    with pytest.raises(ValueError, match="corpus kinds"):
        write_corpus(tmp_path / "d", 0.01, kinds={"poetry": 1.0})


def test_brief_share_writes_that_share_of_task_documents_without_their_working(tmp_path):
    import json
    import re

    from nanoseek.data.corpus import write_corpus

    def tasks(brief, out):
        files = write_corpus(tmp_path / out, 0.2, seed=2, kinds={"math": 1.0}, tasks={"arithmetic": (2, 3)},
                             brief=brief)
        return [r for f in files for line in f.read_text().splitlines() if (r := json.loads(line)).get("task")]

    assert tasks(0.0, "a") == tasks(0.0, "b")  # no brief share draws nothing: corpora made before are unchanged
    docs = tasks(0.5, "half")
    brief = [r["text"] for r in docs if r["text"].split("<think>\n", 1)[1].startswith("so ")]
    assert 0.4 < len(brief) / len(docs) < 0.6
    for text in brief:  # the conclusion and the right answer, no working
        a, op, b, answer = re.fullmatch(r"What is (\d+) (.) (\d+)\?\n<think>\nso \1 \2 \3 = (-?\d+)\n</think> "
                                        r"<answer>\4</answer>", text).groups()
        assert int(answer) == {"+": int(a) + int(b), "-": int(a) - int(b), "x": int(a) * int(b)}[op]
    with pytest.raises(ValueError, match="share of task documents without their working"):
        write_corpus(tmp_path / "bad", 0.01, brief=1.5)
    assert not (tmp_path / "bad").exists()


def test_ops_weights_arithmetic_operations_in_the_corpus(tmp_path):
    import json
    import re

    from nanoseek.data.corpus import write_corpus

    files = write_corpus(tmp_path / "a", 0.2, seed=5, kinds={"math": 1.0}, tasks={"arithmetic": (2,)},
                         ops={"-": 2.0})
    ops = [m.group(1) for f in files for line in f.read_text().splitlines()
           if (m := re.match(r"What is \d+ (.) \d+\?", json.loads(line)["text"]))]
    assert len(ops) > 500 and 0.43 < ops.count("-") / len(ops) < 0.57  # 2 of 4
    assert 0.18 < ops.count("+") / len(ops) < 0.32
    for bad in ({"/": 1.0}, {"-": -1.0}, {"+": 0.0}):
        with pytest.raises(ValueError, match="ops weights arithmetic's operations"):
            write_corpus(tmp_path / "bad", 0.01, ops=bad)


def test_a_mixture_interleaves_its_pairs_and_verifies_each_problem_by_its_own_task():
    mix = get_task("arithmetic@2,arithmetic@3,countdown@3")
    ps = mix.problems("train", 7, seed=4)
    assert [(p.task, p.level) for p in ps] == [("arithmetic", 2), ("arithmetic", 3), ("countdown", 3)] * 2 + [
        ("arithmetic", 2)]
    assert ps[:3] == [arith.problems("train", 3, level=2, seed=4)[0], arith.problems("train", 2, level=3, seed=4)[0],
                      countdown.problems("train", 2, level=3, seed=4)[0]]
    assert all(mix.verify(p, mix.solution(p)) and not mix.verify(p, "<answer>-1</answer>") for p in ps)
    assert mix.levels == (2, 3) and get_task("countdown").name == "countdown"
    assert [(t.name, lv) for t, lv in get_task("countdown,arithmetic@1").entries] == [
        ("countdown", 3), ("countdown", 4), ("arithmetic", 1)]
    with pytest.raises(ValueError, match="arithmetic has levels"):
        get_task("arithmetic@7,countdown@3")
    with pytest.raises(ValueError, match="unknown task 'arith@2'"):
        get_task("arith@2")
    with pytest.raises(ValueError, match="levels are in its name"):
        mix.problems("test", 3, level=2)


@pytest.mark.parametrize("kw, digest", [({}, "5ef5eda2ed7679c3"), ({"brief": 0.3}, "1a04ffa388bfc448"),
                                        ({"ops": {"-": 2.0}}, "e1b91c4406ea5575")])
def test_the_generated_corpus_is_what_it_was(kw, digest):
    """A new corpus option must not change the corpora made without it: the documents' digest as the
    corpus wrote them before `checked` existed."""
    import hashlib
    import json
    import random

    from nanoseek.data.corpus import documents

    it, h = documents(random.Random(0), **kw), hashlib.sha256()
    for _ in range(300):
        h.update(json.dumps(next(it), sort_keys=True).encode())
    assert h.hexdigest()[:16] == digest
