import gzip
import json
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nanoseek.cli import main
from nanoseek.data.curate import CurateConfig, HashSet64, NothingUsable, classify, curate, normalize, read_shards

WORDS = ("river mountain city bright night story people open read write garden letter window morning "
         "friend voice water stone paper winter summer forest market train music silver golden quiet").split()
HANZI = "的一是在不了有和人这中大为上个国我以要他时来用们生到作地于出就分对成会可主发年动同工也能下过子说产种面而方后多定行学法所民得经"
RU = "река гора город ночь история люди окно утро друг голос вода камень бумага зима лето лес".split()


def prose(rng, n=300, vocab=WORDS):
    return " ".join(rng.choice(vocab) for _ in range(n)) + "."


def build_corpus(root):
    rng = random.Random(7)
    docs = [prose(rng) for _ in range(40)]
    near = []
    for d in docs[:3]:
        w = d.split()
        w[150] = "changed"
        near.append(" ".join(w))
    exact = [docs[0], docs[1].upper(), "  " + docs[2].replace(" ", "   "), docs[3], docs[4]]
    junk = ["$$$ ### @@@ %%% ^^^ &&& ~~~ ||| {{{ }}} [[[ ]]] " * 5, "ab {} cd [] ef || gh ~~ " * 10, "short",
            "\n".join(["the same line again and again"] * 10),
            " ".join(["one two three four five"] * 20)]
    zh = ["".join(rng.choice(HANZI) for _ in range(200)) + "。" for _ in range(3)]
    other = [prose(rng, 120, RU) for _ in range(2)]
    code = ["def add(a, b):\n    return a + b\n\nclass Box:\n    def __init__(self):\n        self.x = 1\n",
            "import os\nfrom sys import argv\n\ndef main():\n    print(argv)\n    return 0\n"]
    math = ["12 + 34 = 46\n46 * 2 = 92\n92 - 10 = 82\n(82 / 2) = 41", "x^2 + 2x + 1 = (x + 1)^2 = 0, so x = -1"]
    with open(root / "a.jsonl", "w") as f:
        for d in docs[:30] + near + exact + junk + zh:
            f.write(json.dumps({"text": d}, ensure_ascii=False) + "\n")
        f.write("{not json\n")
        f.write(json.dumps({"title": "no text field"}) + "\n")
    with gzip.open(root / "b.jsonl.gz", "wt") as f:
        for d in docs[30:35] + other:
            f.write(json.dumps({"content": d}, ensure_ascii=False) + "\n")
    sub = root / "sub"
    sub.mkdir()
    for i, d in enumerate(code):
        (sub / f"code{i}.md").write_text(d)
    (sub / "math.txt").write_text(math[0] + "\n\n")
    with gzip.open(sub / "math2.txt.gz", "wt") as f:
        f.write(math[1])
    (sub / "empty.txt").write_text("")
    (sub / "latin1.txt").write_bytes("café au lait, crème brûlée".encode("latin-1"))
    pq.write_table(pa.table({"text": docs[35:40]}), root / "c.parquet")
    pq.write_table(pa.table({"body": ["no text column here"]}), root / "d.parquet")
    return root


EXPECTED = {
    "records_in": 30 + 3 + 5 + 5 + 3 + 5 + 2 + 2 + 2 + 5,
    "records_out": 40 + 3 + 2 + 2 + 2,
    "exact_duplicates": 5, "near_duplicates": 3,
    "dropped": {"low_alnum_ratio": 1, "high_symbol_ratio": 1, "too_short": 1, "repeated_lines": 1,
                "repeated_ngrams": 1},
    "bad_input": {"malformed_json": 1, "no_text_field": 1, "empty_file": 1, "invalid_utf8": 1, "no_text_column": 1},
    "domains": {"prose": 45, "code": 2, "math": 2},
    "languages": {"en": 43, "zh": 3, "other": 3},  # other: Russian and the digits-only math text
}


@pytest.mark.parametrize("workers", [1, 2])
def test_report_counts_are_exact(tmp_path, workers):
    (tmp_path / "in").mkdir()
    build_corpus(tmp_path / "in")
    report = curate([tmp_path / "in"], tmp_path / "out", workers=workers)
    r = report.as_dict()
    for key in ("records_in", "records_out", "exact_duplicates", "near_duplicates", "dropped", "bad_input"):
        assert r[key] == EXPECTED[key], key
    assert {k: v["records"] for k, v in r["domains"].items()} == EXPECTED["domains"]
    assert {k: v["records"] for k, v in r["languages"].items()} == EXPECTED["languages"]
    records = list(read_shards(tmp_path / "out"))
    assert len(records) == EXPECTED["records_out"] and len({r["id"] for r in records}) == len(records)
    assert json.loads((tmp_path / "out" / "curate_report.json").read_text())["records_out"] == len(records)
    assert r["bytes_out"] == sum(len(x["text"].encode()) for x in records)


def test_same_output_for_any_worker_count(tmp_path):
    (tmp_path / "in").mkdir()
    build_corpus(tmp_path / "in")
    curate([tmp_path / "in"], tmp_path / "o1", workers=1, cfg=CurateConfig(shard_records=7))
    curate([tmp_path / "in"], tmp_path / "o2", workers=2, cfg=CurateConfig(shard_records=7))
    assert list(read_shards(tmp_path / "o1")) == list(read_shards(tmp_path / "o2"))
    assert len(json.loads((tmp_path / "o1" / "curate_report.json").read_text())["shards"]) == 7


def test_nothing_usable_is_a_clear_error(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "x.txt").write_text("tiny")
    with pytest.raises(NothingUsable, match="nothing usable.*1 records read, 1 dropped"):
        curate([tmp_path / "in"], tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert main(["curate", "--input", str(tmp_path / "nope"), "--out", str(tmp_path / "o"), "--quiet"]) == 2


def test_normalize():
    assert normalize("e\u0301\r\nx\x00y\x1b \t\n") == "\u00e9\nxy"
    assert normalize("tab\tkept\nline") == "tab\tkept\nline"


@pytest.mark.parametrize("text, want", [
    ("def f(x):\n    return x\n", ("code", "en")),
    ("这是中文。这是中文。", ("prose", "zh")),
    ("1 + 2 = 3\n3 * 4 = 12", ("math", "other")),  # no letters: no language
    ("Just an ordinary English sentence about rivers.", ("prose", "en")),
    ("Это обычное предложение о реках.", ("prose", "other")),
])
def test_classify(text, want):
    assert classify(text) == want


def test_hashset64():
    s = HashSet64(buffer=4, max_run=16)
    rng = random.Random(1)
    values = [rng.getrandbits(64) for _ in range(100)] + list(range(100, 120))
    for v in values:
        s.add(v)
    assert all(v in s for v in values) and 5 not in s and len(s) == len(values)
    assert len(s.runs) > 1 and all(len(r) <= 2 * 16 for r in s.runs)


def test_cli_curate_prints_report(tmp_path, capsys):
    (tmp_path / "in").mkdir()
    build_corpus(tmp_path / "in")
    assert main(["curate", "--input", str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--quiet",
                 "--workers", "1"]) == 0
    out = capsys.readouterr().out
    assert "near duplicates" in out and "bad input: invalid_utf8" in out
