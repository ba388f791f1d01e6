"""Stream documents out of .txt, .md, .jsonl (.gz) and .parquet files and directories.

Reading never crashes on bad input: every problem is reported to `on_error(reason, where)` and
the file (or line) is skipped. Memory stays bounded by one document (or one parquet batch):
large .txt / .md files are cut at blank lines into documents of at most `max_doc_bytes`.
"""

from __future__ import annotations

import gzip
import io
import json
import os
from pathlib import Path
from typing import Callable, Iterable, Iterator

TEXT_SUFFIXES = (".txt", ".md")
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".json.gz", ".ndjson")
SUFFIXES = TEXT_SUFFIXES + tuple(s + ".gz" for s in TEXT_SUFFIXES) + JSONL_SUFFIXES + (".parquet",)
TEXT_FIELDS = ("text", "content")

ErrorFn = Callable[[str, str], None]


def _ignore(reason: str, where: str) -> None:
    pass


def expand(paths: Iterable[str | os.PathLike], on_error: ErrorFn = _ignore) -> list[Path]:
    """Files under `paths` (directories recursively, sorted) with a supported suffix."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.is_file() and f.name.lower().endswith(SUFFIXES))
        elif p.is_file():
            if p.name.lower().endswith(SUFFIXES):
                files.append(p)
            else:
                on_error("unsupported_file_type", str(p))
        else:
            on_error("unreadable_file", f"{p}: no such file or directory")
    return files


def _open_text(path: Path):
    raw = gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb")
    return io.TextIOWrapper(raw, encoding="utf-8", errors="strict", newline="")


def _read_text(path: Path, max_doc_bytes: int, on_error: ErrorFn) -> Iterator[str]:
    buf: list[str] = []
    size = 0
    with _open_text(path) as f:
        for line in f:
            buf.append(line)
            size += len(line)
            if size >= max_doc_bytes and not line.strip():
                yield "".join(buf)
                buf, size = [], 0
            elif size >= 4 * max_doc_bytes:  # no blank line in sight: cut anyway
                yield "".join(buf)
                buf, size = [], 0
    if buf:
        yield "".join(buf)


META_FIELDS = ("difficulty", "level", "task")  # kept from jsonl records, for curricula and mixing


def _read_jsonl(path: Path, text_field: str | None, on_error: ErrorFn) -> Iterator[tuple[str, dict]]:
    with _open_text(path) as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                on_error("malformed_json", f"{path}:{lineno}: {e.msg}")
                continue
            fields = (text_field,) if text_field else TEXT_FIELDS
            text = next((obj[k] for k in fields if isinstance(obj, dict) and isinstance(obj.get(k), str)), None)
            if text is None:
                on_error("no_text_field", f"{path}:{lineno}: no string field {' or '.join(fields)}")
                continue
            yield text, {k: obj[k] for k in META_FIELDS if k in obj}


def _read_parquet(path: Path, text_field: str | None, on_error: ErrorFn) -> Iterator[str]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    names = pf.schema_arrow.names
    column = text_field if text_field else next((k for k in TEXT_FIELDS if k in names), None)
    if column is None or column not in names:
        on_error("no_text_column", f"{path}: no column {text_field or ' or '.join(TEXT_FIELDS)} "
                                   f"(columns: {', '.join(names)})")
        return
    for batch in pf.iter_batches(columns=[column], batch_size=1024):
        for text in batch.column(0).to_pylist():
            if isinstance(text, str):
                yield text


def iter_documents(paths: Iterable[str | os.PathLike], on_error: ErrorFn = _ignore,
                   text_field: str | None = None, max_doc_bytes: int = 1 << 20
                   ) -> Iterator[tuple[str, str, dict]]:
    """(source file, text, metadata) for every document under `paths`, in a deterministic order.

    Metadata is what a jsonl record carries of `difficulty`, `level` and `task`; else empty.
    """
    for path in expand(paths, on_error):
        try:
            if path.stat().st_size == 0:
                on_error("empty_file", str(path))
                continue
            name = path.name.lower()
            if name.endswith(".parquet"):
                docs = _read_parquet(path, text_field, on_error)
            elif name.endswith(JSONL_SUFFIXES):
                docs = _read_jsonl(path, text_field, on_error)
            else:
                docs = _read_text(path, max_doc_bytes, on_error)
            for doc in docs:
                text, meta = doc if isinstance(doc, tuple) else (doc, {})
                yield str(path), text, meta
        except UnicodeDecodeError as e:
            on_error("invalid_utf8", f"{path}: byte {e.start}: {e.reason}")
        except (OSError, EOFError) as e:
            on_error("unreadable_file", f"{path}: {e}")
        except Exception as e:  # pyarrow raises its own types for corrupt files
            on_error("unreadable_file", f"{path}: {type(e).__name__}: {e}")
