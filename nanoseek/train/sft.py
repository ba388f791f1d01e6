"""`nanoseek sft`: supervised fine-tuning on chat examples, loss on the assistant's tokens only.

    nanoseek sft --model runs/x/base --data examples.jsonl --out runs/x/sft

Each line of the data is `{"messages": [{"role": "user", "content": ...}, {"role": "assistant", ...}]}`.
Conversations are rendered with the model dir's chat template (`Tokenizer.render_chat`), whose
mask marks the assistant's tokens; every other target is -100. With packing (the default)
conversations are concatenated into rows of seq_len + 1 tokens; with --no-packing each row is one
conversation, padded. The loop, checkpoints and resume are pretrain's (`train_loop`).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from ..checkpoint import load_model
from ..config import ModelConfig
from ..model import Transformer
from ..tokenizer import Tokenizer, TokenizerError
from .args import SFTConfig, TrainError, settings
from .pretrain import start_or_resume, train_loop, training_world


def read_conversations(paths: list[str], tok: Tokenizer) -> list[tuple[list[int], list[int]]]:
    """(ids, mask) of every conversation; a bad line is an error naming file and line."""
    out = []
    for path in paths:
        try:
            lines = Path(path).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise TrainError(f"{path}: cannot read SFT data ({e})") from None
        for lineno, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                messages = json.loads(line)["messages"]
                ids, mask = tok.render_chat(messages)
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise TrainError(f"{path}:{lineno}: expected a JSON object with a 'messages' list ({e})") from None
            except TokenizerError as e:
                raise TrainError(f"{path}:{lineno}: {e}") from None
            if not any(mask):
                raise TrainError(f"{path}:{lineno}: no assistant message, so nothing to learn from")
            out.append((ids, mask))
    if not out:
        raise TrainError(f"no conversations in {', '.join(paths)}")
    return out


class ChatBatches:
    """Seeded, shuffled, resumable batches of conversations; packed rows or one padded row each."""

    def __init__(self, convs, seq_len: int, batch_size: int, pad_id: int, packing: bool, seed: int,
                 rank: int = 0, world_size: int = 1):
        self.convs, self.seq_len, self.batch_size = convs, seq_len, batch_size
        self.pad, self.packing, self.seed = pad_id, packing, seed
        self.rank, self.world_size = rank, world_size
        self.epoch, self.position, self.carry = 0, 0, ([], [])  # carry: packed tokens not yet in a row
        self.truncated = 0 if packing else sum(len(ids) > seq_len + 1 for ids, _ in convs)

    def _order(self) -> np.ndarray:
        if getattr(self, "_order_epoch", None) != self.epoch:
            self._order_epoch = self.epoch
            self._perm = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.convs))
        return self._perm

    def _next_conv(self):
        order = self._order()
        ids, mask = self.convs[order[self.position]]
        self.position += 1
        if self.position == len(order):
            self.epoch, self.position = self.epoch + 1, 0
        return ids, mask

    def _row(self) -> tuple[list[int], list[int]]:
        n = self.seq_len + 1
        if not self.packing:
            ids, mask = self._next_conv()
            ids, mask = ids[:n], mask[:n]
            return ids + [self.pad] * (n - len(ids)), mask + [0] * (n - len(mask))
        ids, mask = list(self.carry[0]), list(self.carry[1])
        while len(ids) < n:
            i, m = self._next_conv()
            ids += i
            mask += m
        self.carry = (ids[n:], mask[n:])
        return ids[:n], mask[:n]

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        rows, masks = [], []
        for _ in range(self.batch_size):
            for r in range(self.world_size):
                ids, mask = self._row()
                if r == self.rank:
                    rows.append(ids)
                    masks.append(mask)
        ids, mask = torch.tensor(rows), torch.tensor(masks, dtype=torch.bool)
        targets = ids[:, 1:].masked_fill(~mask[:, 1:], -100)  # learn the assistant's tokens only
        return ids[:, :-1], targets

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "carry": [list(self.carry[0]), list(self.carry[1])]}

    def load_state_dict(self, s: dict) -> None:
        self.epoch, self.position, self.carry = s["epoch"], s["position"], (list(s["carry"][0]), list(s["carry"][1]))


def run(cfg: SFTConfig) -> Transformer:
    """Fine-tune as `cfg` says; returns the trained model (RUN holds it once every step ran)."""
    tc = cfg.train
    with training_world() as world:
        base_cfg = ModelConfig.from_json(cfg.model)
        tok = Tokenizer.load(cfg.tokenizer or cfg.model)
        tok.check_fits(base_cfg.vocab_size)
        convs = read_conversations(cfg.data, tok)
        model, saved = start_or_resume(tc.resume, base_cfg, Path(tc.out), lambda: load_model(cfg.model))
        batches = ChatBatches(convs, tc.seq_len, tc.batch_size, tok.pad_id, not cfg.no_packing, tc.seed,
                              world.rank, world.world_size)
        if world.main and batches.truncated:
            print(f"note: {batches.truncated} conversation(s) longer than --seq-len are cut", flush=True)
        return train_loop(tc, model, saved, batches.next_batch, batches, tok, world, settings(cfg))
