"""Token shards and the packed, mixture-weighted, resumable training loader.

    nanoseek tokenize --input runs/x/data --tokenizer runs/x/tokenizer --out runs/x/tokens

One curated shard becomes `tokens-00000.bin` (uint16 when the vocabulary fits, else uint32: all
documents' tokens back to back) and `docs-00000.npy` (per document: offset, length, domain id,
difficulty), tokenized by a pool of worker processes. `index.json` lists the shards, domains,
dtype and token counts.

`Loader` packs documents into rows of seq_len + 1 tokens (BOS before each document). A document
that does not fit in what is left of a row is started again, whole, at the next row (the row ends
with its beginning); only a document longer than a row continues from one row into the next. It
picks each next document's domain by mixture weights, walks a domain's documents in a seeded
shuffled order (or easiest first, with `curriculum=True`), and yields (inputs, targets) =
(row[:-1], row[1:]). Its `state_dict()` resumes exactly: the batches after a resume are the
batches an uninterrupted run would have seen. With `world_size` > 1, rank r takes rows r, r + W,
... of the one global stream, so data parallel sees the same data as one process with the same
global batch.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..io import atomic_dir

if TYPE_CHECKING:
    import torch

INDEX = "index.json"


class ShardError(ValueError):
    """Token shards are missing, corrupt or inconsistent; the message names the file."""


def token_dtype(vocab_size: int) -> str:
    """The narrowest unsigned dtype that holds every token id."""
    return "uint16" if vocab_size <= 2**16 else "uint32"


def _tokenize_shard(args: tuple[str, str, str, int, str, list[str]]) -> dict:
    """Worker: one curated shard -> tokens-i.bin + docs-i.npy. Returns its index entry."""
    from ..tokenizer import Tokenizer
    from .curate import read_shard

    src, tok_dir, out, i, dtype, domains = args
    tok = Tokenizer.load(tok_dir)
    tokens_name, docs_name = f"tokens-{i:05d}.bin", f"docs-{i:05d}.npy"
    rows, offset = [], 0
    with open(Path(out) / tokens_name, "wb") as f:
        batch: list[dict] = []

        def flush():
            nonlocal offset
            for rec, ids in zip(batch, tok.encode_batch([r["text"] for r in batch])):
                np.asarray(ids, dtype=dtype).tofile(f)
                diff = rec.get("difficulty", rec.get("level", 0))
                rows.append((offset, len(ids), domains.index(rec.get("domain", "prose")),
                             int(diff) if isinstance(diff, (int, float)) else 0))
                offset += len(ids)
            batch.clear()

        for rec in read_shard(src):
            batch.append(rec)
            if len(batch) >= 256:
                flush()
        flush()
    np.save(Path(out) / docs_name, np.asarray(rows, dtype=np.int64).reshape(-1, 4))
    return {"tokens": tokens_name, "docs": docs_name, "num_tokens": offset, "num_docs": len(rows)}


def tokenize_dir(curated: str | Path, tokenizer_dir: str | Path, out: str | Path, workers: int | None = None,
                 progress: bool = False) -> dict:
    """Tokenize every shard of a curated dir into `out` (written atomically); returns the index."""
    from tqdm import tqdm

    from ..tokenizer import Tokenizer

    curated = Path(curated)
    report_path = curated / "curate_report.json"
    if not report_path.exists():
        raise ShardError(f"{report_path}: not found; is {curated} the output of `nanoseek curate`?")
    report = json.loads(report_path.read_text())
    tok = Tokenizer.load(tokenizer_dir)
    if tok.bos_id is None:
        raise ShardError(f"{tokenizer_dir}: the tokenizer has no beginning-of-sentence token (bos_token in "
                         f"tokenizer_config.json), which pretraining puts before every document")
    dtype = token_dtype(tok.vocab_size)
    domains = sorted(report.get("domains", {})) or ["prose"]
    jobs = [(str(curated / name), str(tokenizer_dir), "", i, dtype, domains)
            for i, name in enumerate(report["shards"])]
    workers = max(1, min(workers or os.cpu_count() or 1, len(jobs)))
    with atomic_dir(out) as tmp:
        jobs = [(src, t, str(tmp), i, d, dom) for src, t, _, i, d, dom in jobs]
        if workers == 1:
            results = [_tokenize_shard(j) for j in tqdm(jobs, disable=not progress, desc="tokenize")]
        else:
            with ProcessPoolExecutor(workers) as pool:
                results = list(tqdm(pool.map(_tokenize_shard, jobs), total=len(jobs), disable=not progress,
                                    desc=f"tokenize ({workers} processes)"))
        index = {"dtype": dtype, "vocab_size": tok.vocab_size, "bos_id": tok.bos_id, "domains": domains,
                 "num_tokens": sum(r["num_tokens"] for r in results),
                 "num_docs": sum(r["num_docs"] for r in results), "shards": results}
        (tmp / INDEX).write_text(json.dumps(index, indent=2))
    return index


class Loader:
    def __init__(self, path: str | Path, seq_len: int, batch_size: int, weights: dict[str, float] | None = None,
                 curriculum: bool = False, seed: int = 0, rank: int = 0, world_size: int = 1):
        self.path = Path(path)
        index_path = self.path / INDEX
        try:
            self.index = json.loads(index_path.read_text())
        except FileNotFoundError:
            raise ShardError(f"{index_path}: not found; run `nanoseek tokenize` first") from None
        except json.JSONDecodeError as e:
            raise ShardError(f"{index_path}: corrupt ({e})") from None
        self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed
        self.rank, self.world_size, self.curriculum = rank, world_size, curriculum
        self.bos = self.index["bos_id"]
        self.tokens, docs = [], []
        for s, shard in enumerate(self.index["shards"]):
            f = self.path / shard["tokens"]
            want = shard["num_tokens"] * np.dtype(self.index["dtype"]).itemsize
            if not f.exists() or f.stat().st_size != want:
                got = f.stat().st_size if f.exists() else "missing"
                raise ShardError(f"{f}: expected {want} bytes, found {got}; re-run `nanoseek tokenize`")
            self.tokens.append(np.memmap(f, dtype=self.index["dtype"], mode="r") if want else np.zeros(0))
            d = np.load(self.path / shard["docs"])
            docs.append(np.column_stack([np.full(len(d), s), d]))
        docs = np.concatenate(docs) if docs else np.zeros((0, 5), dtype=np.int64)
        docs = docs[docs[:, 2] > 0]  # (shard, offset, length, domain, difficulty); empty docs never help
        names = self.index["domains"]
        weights = weights or {d: 1.0 for d in names}
        unknown = set(weights) - set(names)
        if unknown:
            raise ShardError(f"mixture weights name unknown domain(s) {sorted(unknown)}; the shards have {names}")
        self.domains = [d for d in names if weights.get(d, 0) > 0 and (docs[:, 3] == names.index(d)).any()]
        if not self.domains:
            raise ShardError(f"{self.path}: no documents in the domains given weight ({weights})")
        self.docs = {d: docs[docs[:, 3] == names.index(d)] for d in self.domains}
        p = np.array([weights[d] for d in self.domains], dtype=np.float64)
        self.p = p / p.sum()
        self.rng = np.random.default_rng(seed)
        self.cursor = {d: 0 for d in self.domains}
        self.epoch = {d: 0 for d in self.domains}
        self.pending: tuple[str, int, int] | None = None  # (domain, position in order, tokens consumed)
        self.rows_done = 0
        self._orders: dict[tuple[str, int], np.ndarray] = {}

    def _order(self, domain: str, epoch: int) -> np.ndarray:
        key = (domain, epoch)
        if key not in self._orders:
            docs = self.docs[domain]
            rng = np.random.default_rng([self.seed, self.domains.index(domain), epoch])
            perm = rng.permutation(len(docs))
            if self.curriculum and epoch == 0:  # easiest first; ties in seeded random order
                perm = perm[np.argsort(docs[perm, 4], kind="stable")]
            self._orders = {k: v for k, v in self._orders.items() if k[0] != domain}
            self._orders[key] = perm
        return self._orders[key]

    def _next_doc(self) -> tuple[str, int]:
        domain = self.domains[self.rng.choice(len(self.domains), p=self.p)]
        order = self._order(domain, self.epoch[domain])
        position = self.cursor[domain]
        self.cursor[domain] += 1
        if self.cursor[domain] == len(order):
            self.cursor[domain], self.epoch[domain] = 0, self.epoch[domain] + 1
        return domain, int(order[position])

    def _doc_tokens(self, domain: str, doc: int) -> np.ndarray:
        shard, offset, length = self.docs[domain][doc, :3]
        return self.tokens[shard][offset:offset + length]

    def _row(self) -> np.ndarray:
        """The next seq_len + 1 tokens of the global stream."""
        need, parts = self.seq_len + 1, []
        while need > 0:
            if self.pending is None:
                domain, doc = self._next_doc()
                self.pending = (domain, doc, -1)  # -1: the BOS is still to come
            domain, doc, used = self.pending
            toks = self._doc_tokens(domain, doc)
            row_started, fits_a_row = need <= self.seq_len, len(toks) + 1 <= self.seq_len + 1
            if used < 0 and row_started and fits_a_row and len(toks) + 1 > need:
                # A document that fits in a row but not in this row's rest starts the next row whole; this
                # row ends with its beginning. Carried over, its rest would be trained without its start:
                # a task's working without the prompt, which teaches the model to make the numbers up.
                parts.append(np.concatenate([[self.bos], toks[:need - 1]]))
                break
            if used < 0:
                parts.append(np.array([self.bos]))
                need -= 1
                used = 0
            take = toks[used:used + need]
            parts.append(take)
            need -= len(take)
            used += len(take)
            self.pending = None if used >= len(toks) else (domain, doc, used)
        self.rows_done += 1
        return np.concatenate(parts).astype(np.int64)

    def next_batch(self) -> tuple["torch.Tensor", "torch.Tensor"]:
        import torch

        rows = []
        for _ in range(self.batch_size):
            for r in range(self.world_size):  # rank r keeps the r-th of every world_size rows
                row = self._row()
                if r == self.rank:
                    rows.append(row)
        batch = torch.from_numpy(np.stack(rows))
        return batch[:, :-1], batch[:, 1:]

    def __iter__(self):
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict:
        return {"rng": self.rng.bit_generator.state, "cursor": dict(self.cursor), "epoch": dict(self.epoch),
                "pending": list(self.pending) if self.pending else None, "rows_done": self.rows_done,
                "seed": self.seed, "domains": self.domains}

    def load_state_dict(self, state: dict) -> None:
        if state["domains"] != self.domains or state["seed"] != self.seed:
            raise ShardError(f"loader state is for domains {state['domains']} seed {state['seed']}, "
                             f"this loader has {self.domains} seed {self.seed}")
        self.rng.bit_generator.state = state["rng"]
        self.cursor, self.epoch = dict(state["cursor"]), dict(state["epoch"])
        self.pending = tuple(state["pending"]) if state["pending"] else None
        self.rows_done = state["rows_done"]
