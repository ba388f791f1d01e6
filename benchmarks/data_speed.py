"""Curation MB/s and tokenization tokens/s on a generated corpus, against plain single-process baselines.

    python benchmarks/data_speed.py                 # ~200 MB corpus (and its first ~50 MB)
    python benchmarks/data_speed.py --megabytes 40  # quicker

Curation runs as `nanoseek curate` in a child process each time, so its peak memory (max RSS of
the process holding the dedup index) is measured on its own: with --workers 1 on the first
quarter of the corpus and on all of it (it must stay flat), and the speed of --workers N is
compared with --workers 1 on the whole corpus. Tokenization compares `nanoseek tokenize`
(worker processes, batched encoding) with a plain loop that encodes one document at a time in
one process.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run(cmd: list[str]) -> tuple[float, int]:
    """Seconds and peak RSS (bytes) of a child process."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        raise SystemExit(f"failed ({status}): {' '.join(cmd)}")
    return time.perf_counter() - start, usage.ru_maxrss * 1024


def plain_tokenize(curated: Path, tok_dir: Path) -> tuple[float, int]:
    from nanoseek.data.curate import read_shards
    from nanoseek.tokenizer import Tokenizer

    tok = Tokenizer.load(tok_dir)
    start, n = time.perf_counter(), 0
    for rec in read_shards(curated):
        n += len(tok.encode(rec["text"]))
    return time.perf_counter() - start, n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--megabytes", type=float, default=200, help="corpus size (default 200)")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes for the parallel runs")
    ap.add_argument("--vocab-size", type=int, default=4096, help="tokenizer size (default 4096)")
    ap.add_argument("--dir", help="working dir (default: a temporary one)")
    args = ap.parse_args()

    from nanoseek.data.corpus import write_corpus

    work = Path(args.dir or tempfile.mkdtemp(prefix="nanoseek-bench-"))
    nanoseek = [sys.executable, "-m", "nanoseek"]
    t = time.perf_counter()
    files = write_corpus(work / "raw", args.megabytes, seed=0, file_megabytes=args.megabytes / 20)
    size = sum(f.stat().st_size for f in files)
    quarter = files[: max(1, len(files) // 4)]
    qsize = sum(f.stat().st_size for f in quarter)
    print(f"corpus: {size / 1e6:.0f} MB in {len(files)} files, generated in {time.perf_counter() - t:.0f} s")
    print(f"{os.cpu_count()} CPUs, {args.workers} workers\n")

    curate = nanoseek + ["curate", "--quiet", "--out"]
    s_q, rss_q = run(curate + [str(work / "cq"), "--workers", "1", "--input", *map(str, quarter)])
    s_1, rss_1 = run(curate + [str(work / "c1"), "--workers", "1", "--input", str(work / "raw")])
    s_n, _ = run(curate + [str(work / "cn"), "--workers", str(args.workers), "--input", str(work / "raw")])

    run(nanoseek + ["tokenizer", "--quiet", "--vocab-size", str(args.vocab_size), "--out", str(work / "tok"),
                    "--input", *map(str, sorted((work / "cq").glob("shard-*.jsonl.gz"))[:2])])
    s_plain, n_tokens = plain_tokenize(work / "c1", work / "tok")
    s_tok1, _ = run(nanoseek + ["tokenize", "--quiet", "--workers", "1", "--input", str(work / "c1"),
                                "--tokenizer", str(work / "tok"), "--out", str(work / "t1")])
    s_tokn, _ = run(nanoseek + ["tokenize", "--quiet", "--workers", str(args.workers), "--input", str(work / "c1"),
                                "--tokenizer", str(work / "tok"), "--out", str(work / "tn")])

    print("| stage | plain single process | nanoseek | ratio |")
    print("|---|---|---|---|")
    print(f"| curate {size / 1e6:.0f} MB | {size / 1e6 / s_1:.2f} MB/s (--workers 1) | "
          f"{size / 1e6 / s_n:.2f} MB/s (--workers {args.workers}) | {s_1 / s_n:.2f}x |")
    print(f"| tokenize {n_tokens / 1e6:.0f}M tokens | {n_tokens / s_plain / 1e6:.2f}M tok/s (one doc at a time) | "
          f"{n_tokens / s_tokn / 1e6:.2f}M tok/s (--workers {args.workers}; {n_tokens / s_tok1 / 1e6:.2f}M with 1) | "
          f"{s_plain / s_tokn:.2f}x |")
    print(f"\npeak memory of `curate --workers 1`: {rss_q / 2**20:.0f} MiB at {qsize / 1e6:.0f} MB of input, "
          f"{rss_1 / 2**20:.0f} MiB at {size / 1e6:.0f} MB ({rss_1 / rss_q:.2f}x for {size / qsize:.1f}x the input)")
    print(f"(timings include process start-up and imports; work dir {work})")


if __name__ == "__main__":
    main()
