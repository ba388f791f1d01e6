"""Curation: read -> normalise -> filter -> exact + near dedup -> classify -> write, with a report.

    nanoseek curate --input raw/ more.jsonl.gz --out runs/x/data

Every record is NFC-normalised and stripped of control characters, checked by heuristic quality
filters (length, alphanumeric and symbol ratios, repeated lines and word n-grams; thresholds are
flags), de-duplicated exactly (hash of the normalised, case- and space-folded text) and nearly
(MinHash LSH over word 5-grams, via datasketch), and classified into a domain (code / math /
prose) and a language (zh / en / other). Output: `shard-00000.jsonl.gz`, ... with one
`{"id", "text", "domain", "lang", "source"}` per line (plus `difficulty` / `level` / `task` when
the input record had them), and `curate_report.json`.
Reading streams; what grows with the corpus is only the dedup index: 8 bytes per document for
the exact hash and 8 per LSH band (`HashSet64`). A band shared with an earlier document makes a
near duplicate (no pairwise re-check). Bad input is counted in the report by reason, never fatal.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import json
import multiprocessing
import re
import zlib
import unicodedata
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np

from ..io import atomic_dir
from .readers import iter_documents

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_WORD = re.compile(r"[\u3400-\u9fff\uf900-\ufaff]|[^\W_]+", re.UNICODE)
_CJK = re.compile(r"[\u3400-\u9fff\uf900-\ufaff]")
_LATIN = re.compile(r"[A-Za-z]")
_CODE_LINE = re.compile(r"^\s*(def |class |import |from \S+ import|return\b|#include|function\b|for\s*\(|"
                        r"if\s*\(|while\s*\(|}|\{|[A-Za-z_][\w.]*\s*=\s*[^=]|//|#\s)|[;{}]\s*$")
_MATH_CHAR = re.compile(r"[0-9+\-*/=^<>()×÷]")
_SPACE = re.compile(r"\s")
_ALNUM = re.compile(r"[^\W_]")
_LETTER = re.compile(r"[^\W\d_]")
# symbols that are neither letters, digits, punctuation nor arithmetic: typical of markup debris
_JUNK = re.compile(r"[#$%&@\\^_`|~{}\[\]\u2500-\u27bf\U0001F000-\U0001FAFF\ufffd]")


@dataclass
class CurateConfig:
    min_chars: int = 20
    max_chars: int = 1_000_000
    min_alnum_ratio: float = 0.25  # letters + digits over non-space characters
    max_symbol_ratio: float = 0.30  # junk symbols (# $ % & @ ^ _ | ~ {} [], box drawing, emoji) over non-space
    max_dup_line_ratio: float = 0.30  # share of lines that repeat an earlier line (of docs with >= 5 lines)
    max_dup_ngram_ratio: float = 0.50  # share of word 5-grams that repeat (of docs with >= 30 words)
    near_dup_threshold: float = 0.8  # estimated Jaccard of word 5-gram sets
    num_perm: int = 64
    shard_records: int = 20_000
    text_field: str | None = None


@dataclass
class Report:
    files: int = 0
    records_in: int = 0
    records_out: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    dropped: dict = field(default_factory=Counter)  # quality filter reason -> count
    exact_duplicates: int = 0
    near_duplicates: int = 0
    bad_input: dict = field(default_factory=Counter)  # reading problem -> count
    bad_input_examples: list = field(default_factory=list)
    domains: dict = field(default_factory=dict)  # domain -> {"records", "bytes"}
    languages: dict = field(default_factory=dict)
    shards: list = field(default_factory=list)

    def as_dict(self) -> dict:
        d = asdict(self)
        d["dropped"], d["bad_input"] = dict(self.dropped), dict(self.bad_input)
        return d

    def table(self) -> str:
        rows = [("files read", self.files), ("records in", self.records_in),
                ("records out", self.records_out), ("MB in", f"{self.bytes_in / 1e6:.2f}"),
                ("MB out", f"{self.bytes_out / 1e6:.2f}"), ("exact duplicates", self.exact_duplicates),
                ("near duplicates", self.near_duplicates)]
        rows += [(f"dropped: {k}", v) for k, v in sorted(self.dropped.items())]
        rows += [(f"bad input: {k}", v) for k, v in sorted(self.bad_input.items())]
        rows += [(f"domain {k}", f"{v['records']} records, {v['bytes'] / 1e6:.2f} MB")
                 for k, v in sorted(self.domains.items())]
        rows += [(f"language {k}", f"{v['records']} records, {v['bytes'] / 1e6:.2f} MB")
                 for k, v in sorted(self.languages.items())]
        w = max(len(k) for k, _ in rows)
        return "\n".join(f"  {k:<{w}}  {v}" for k, v in rows)


def normalize(text: str) -> str:
    """NFC, Unix newlines, no control characters but tab and newline, no trailing spaces."""
    text = unicodedata.normalize("NFC", text.replace("\r\n", "\n").replace("\r", "\n"))
    text = _CONTROL.sub("", text)
    return "\n".join(line.rstrip() for line in text.split("\n")).strip()


def quality_problem(text: str, cfg: CurateConfig) -> str | None:
    """The first quality filter a text fails, or None."""
    n = len(text)
    if n < cfg.min_chars:
        return "too_short"
    if n > cfg.max_chars:
        return "too_long"
    visible = n - len(_SPACE.findall(text))
    if len(_ALNUM.findall(text)) < cfg.min_alnum_ratio * visible:
        return "low_alnum_ratio"
    if len(_JUNK.findall(text)) > cfg.max_symbol_ratio * visible:
        return "high_symbol_ratio"
    lines = [ln.strip() for ln in text.split("\n") if ln.strip()]
    if len(lines) >= 5 and 1 - len(set(lines)) / len(lines) > cfg.max_dup_line_ratio:
        return "repeated_lines"
    words = _WORD.findall(text.lower())
    if len(words) >= 30:
        grams = [" ".join(words[i:i + 5]) for i in range(len(words) - 4)]
        if 1 - len(set(grams)) / len(grams) > cfg.max_dup_ngram_ratio:
            return "repeated_ngrams"
    return None


def classify(text: str) -> tuple[str, str]:
    """(domain, language): domain in code / math / prose, language in zh / en / other."""
    cjk, latin = len(_CJK.findall(text)), len(_LATIN.findall(text))
    letters = len(_LETTER.findall(text)) or 1
    lang = "zh" if cjk > 0.3 * letters else "en" if latin > 0.7 * letters else "other"
    lines = [ln for ln in text.split("\n") if ln.strip()]
    code_lines = sum(bool(_CODE_LINE.search(ln)) for ln in lines)
    if lines and code_lines >= max(2, 0.4 * len(lines)):
        return "code", lang
    visible = (len(text) - len(_SPACE.findall(text))) or 1
    if len(_MATH_CHAR.findall(text)) > 0.25 * visible or "\\frac" in text or "$$" in text:
        return "math", lang
    return "prose", lang


def fingerprint(text: str) -> int:
    """Exact-dedup key: a 64-bit hash of the normalised text with case and whitespace folded."""
    folded = " ".join(text.lower().split())
    return int.from_bytes(hashlib.blake2b(folded.encode(), digest_size=8).digest(), "little")


@functools.lru_cache(maxsize=4)
def _permutations(num_perm: int):
    """datasketch's seeded hash permutations, built once rather than per document."""
    from datasketch import MinHash

    m = MinHash(num_perm=num_perm)
    return m.permutations, m.scheme


def minhash_bands(text: str, num_perm: int, bands: int, rows: int) -> list[int]:
    """LSH band keys of the MinHash (datasketch) of the text's word 5-gram set."""
    from datasketch import MinHash

    words = _WORD.findall(text.lower())
    grams = {" ".join(words[i:i + 5]) for i in range(max(1, len(words) - 4))}
    permutations, scheme = _permutations(num_perm)
    m = MinHash(num_perm=num_perm, hashfunc=int, permutations=permutations, scheme=scheme)
    m.update_batch([zlib.crc32(g.encode()) for g in grams])
    sig = m.hashvalues
    return [int.from_bytes(hashlib.blake2b(sig[b * rows:(b + 1) * rows].tobytes(), digest_size=8,
                                           person=b.to_bytes(2, "little")).digest(), "little")
            for b in range(bands)]


class HashSet64:
    """A set of 64-bit hashes at 8 bytes each: sorted numpy runs plus a small buffer set.

    Runs merge like a binary counter (two runs of similar size become one) up to `max_run`
    entries, so no merge ever copies more than a few MB and the allocator is not left with a
    trail of ever-larger freed arrays. The
    dedup state is all curation keeps per document; datasketch's own LSH index costs kilobytes
    per document, which would make memory grow with the corpus.
    """

    def __init__(self, buffer: int = 1 << 16, max_run: int = 1 << 18):
        self.runs: list[np.ndarray] = []
        self.recent: set[int] = set()
        self.buffer, self.max_run = buffer, max_run  # runs stop merging at 2 MB: bounded transients

    def __contains__(self, h: int) -> bool:
        if h in self.recent:
            return True
        key = np.uint64(h)
        for run in self.runs:
            i = int(np.searchsorted(run, key))
            if i < len(run) and run[i] == key:
                return True
        return False

    def add(self, h: int) -> None:
        self.recent.add(h)
        if len(self.recent) >= self.buffer:
            run = np.sort(np.fromiter(self.recent, dtype=np.uint64, count=len(self.recent)))
            self.recent.clear()
            while self.runs and len(self.runs[-1]) <= len(run) and len(run) < self.max_run:
                run = np.union1d(self.runs.pop(), run)
            self.runs.append(run)

    def __len__(self) -> int:
        return sum(len(r) for r in self.runs) + len(self.recent)


def _lsh_params(cfg: CurateConfig) -> tuple[int, int]:
    from datasketch.lsh import _optimal_param

    return _optimal_param(cfg.near_dup_threshold, cfg.num_perm, 0.5, 0.5)


def analyse(item: tuple[str, str, dict], cfg: CurateConfig, bands: int, rows: int) -> dict:
    """Everything about one document that needs no global state (runs in worker processes)."""
    source, raw, meta = item
    text = normalize(raw)
    out = {"bytes_in": len(raw.encode("utf-8", "surrogatepass")), "source": source, "meta": meta}
    problem = quality_problem(text, cfg)
    if problem:
        return {**out, "dropped": problem}
    domain, lang = classify(text)
    return {**out, "text": text, "key": fingerprint(text), "bands": minhash_bands(text, cfg.num_perm, bands, rows),
            "domain": domain, "lang": lang}


class Curator:
    """Dedup state and the report; feed it `analyse` results in corpus order."""

    def __init__(self, cfg: CurateConfig):
        self.cfg = cfg
        self.report = Report()
        self.exact = HashSet64()
        self.bands = HashSet64()

    def bad_input(self, reason: str, where: str) -> None:
        self.report.bad_input[reason] += 1
        if len(self.report.bad_input_examples) < 20:
            self.report.bad_input_examples.append(f"{reason}: {where}")

    def add(self, a: dict) -> dict | None:
        """The curated record, or None when it is dropped (the report says why)."""
        r = self.report
        r.records_in += 1
        r.bytes_in += a["bytes_in"]
        if "dropped" in a:
            r.dropped[a["dropped"]] += 1
            return None
        if a["key"] in self.exact:
            r.exact_duplicates += 1
            return None
        self.exact.add(a["key"])
        if any(b in self.bands for b in a["bands"]):  # shares an LSH band with an earlier document
            r.near_duplicates += 1
            return None
        for b in a["bands"]:
            self.bands.add(b)
        nbytes = len(a["text"].encode())
        for table, name in ((r.domains, a["domain"]), (r.languages, a["lang"])):
            slot = table.setdefault(name, {"records": 0, "bytes": 0})
            slot["records"] += 1
            slot["bytes"] += nbytes
        r.records_out += 1
        r.bytes_out += nbytes
        return {"id": f"{a['key']:016x}", "text": a["text"], "domain": a["domain"], "lang": a["lang"],
                "source": a["source"], **a["meta"]}


class ShardWriter:
    """jsonl.gz shards of at most `records` records each, in `out`."""

    def __init__(self, out: Path, records: int):
        self.out, self.limit, self.names = out, records, []
        self.f, self.count = None, 0

    def write(self, record: dict) -> None:
        if self.f is None or self.count >= self.limit:
            self.close()
            name = f"shard-{len(self.names):05d}.jsonl.gz"
            self.names.append(name)
            self.f, self.count = gzip.open(self.out / name, "wt", encoding="utf-8", compresslevel=3), 0
        self.f.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.count += 1

    def close(self) -> None:
        if self.f is not None:
            self.f.close()
            self.f = None


class NothingUsable(ValueError):
    pass


def _worker_init(cfg: CurateConfig, bands: int, rows: int) -> None:
    global _WORKER_ARGS
    _WORKER_ARGS = (cfg, bands, rows)


def _worker_analyse(item):
    return analyse(item, *_WORKER_ARGS)


def curate(inputs: Iterable[str], out: str | Path, cfg: CurateConfig | None = None, workers: int = 1,
           progress: bool = False) -> Report:
    """Curate every document under `inputs` into shards in `out` (written atomically).

    `workers` > 1 analyses documents in that many processes; dedup and writing stay in this one,
    in input order, so the output is the same for any number of workers.
    """
    from tqdm import tqdm

    cfg = cfg or CurateConfig()
    inputs = list(inputs)
    bands, rows = _lsh_params(cfg)
    curator = Curator(cfg)
    files = set()
    docs = iter_documents(inputs, curator.bad_input, cfg.text_field)

    def tracked():
        for item in docs:
            files.add(item[0])
            yield item

    with atomic_dir(out) as tmp:
        writer = ShardWriter(tmp, cfg.shard_records)
        pool = None
        if workers > 1:
            pool = multiprocessing.get_context("fork").Pool(workers, _worker_init, (cfg, bands, rows))
            analysed = pool.imap(_worker_analyse, tracked(), chunksize=64)
        else:
            analysed = (analyse(item, cfg, bands, rows) for item in tracked())
        try:
            for a in tqdm(analysed, unit=" docs", disable=not progress, desc="curate"):
                record = curator.add(a)
                if record is not None:
                    writer.write(record)
        finally:
            if pool is not None:
                pool.terminate()
        writer.close()
        report = curator.report
        report.files = len(files)
        report.shards = writer.names
        if report.records_out == 0:
            raise NothingUsable(
                f"nothing usable in {', '.join(map(str, inputs))}: {report.records_in} records read, "
                f"{sum(report.dropped.values())} dropped by filters, "
                f"{report.exact_duplicates + report.near_duplicates} duplicates, "
                f"bad input {dict(report.bad_input) or 'none'}")
        (tmp / "curate_report.json").write_text(json.dumps(report.as_dict(), indent=2, ensure_ascii=False))
    return report


def read_shard(path: str | Path) -> Iterable[dict]:
    """The records of one curated shard."""
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)


def read_shards(path: str | Path) -> Iterable[dict]:
    """The records of a curated dir, shard by shard."""
    path = Path(path)
    report = json.loads((path / "curate_report.json").read_text())
    for name in report["shards"]:
        yield from read_shard(path / name)
