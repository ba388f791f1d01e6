"""Atomic directory writes: build in a temporary sibling, fsync, then rename into place.

    with atomic_dir("runs/x/base") as tmp:
        (tmp / "config.json").write_text(...)

A crash or an exception inside the block leaves any previous dir at the path untouched and
removes the temporary one; readers never see a half-written dir at the final path.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from pathlib import Path
from typing import Iterator

TMP_MARK = ".tmp-"
COMMIT = "COMMITTED"  # written last into a training checkpoint dir


def model_dir(path: str | os.PathLike) -> Path:
    """The model dir a path means: itself, or for a training run dir whose final model is not
    written yet, its newest committed checkpoint."""
    path = Path(path)
    if path.is_dir() and not (path / "config.json").exists():
        done = sorted(p for p in (path / "checkpoints").glob("step-*") if (p / COMMIT).exists())
        if done:
            return done[-1]
    return path


def write_atomic(path: str | os.PathLike, text: str) -> None:
    """Write a text file through a temporary sibling and a rename: readers see the old or the new."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}{TMP_MARK}{uuid.uuid4().hex[:8]}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}{TMP_MARK}{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        for f in tmp.rglob("*"):
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        fsync_dir(tmp)
        old = None
        if path.exists():
            old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(path, old)
        os.rename(tmp, path)
        fsync_dir(path.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
