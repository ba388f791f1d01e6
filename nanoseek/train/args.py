"""Command-line flags of pretrain and sft (kept free of torch so `nanoseek --help` starts fast)."""

from __future__ import annotations

import argparse

from ..config import PRESETS, SHAPE_ONLY


class TrainError(RuntimeError):
    """A training run cannot start or continue; the message says why and what to do."""


def add_common_arguments(p: argparse.ArgumentParser, default_lr: float, default_steps: int) -> None:
    """Flags shared by pretrain and sft."""
    p.add_argument("--out", required=True, metavar="RUN", help="run dir: checkpoints, metrics, the final model")
    p.add_argument("--tokenizer", metavar="DIR",
                   help="tokenizer dir (default: pretrain: the byte-level one; sft: the model dir's)")
    p.add_argument("--steps", type=int, default=default_steps, help=f"optimizer steps (default {default_steps})")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per micro-batch per process (default 8)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per sequence (default 256)")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step (default 1)")
    p.add_argument("--lr", type=float, default=default_lr, help=f"peak learning rate (default {default_lr})")
    p.add_argument("--min-lr-ratio", type=float, default=0.1, help="final lr / peak lr (default 0.1)")
    p.add_argument("--warmup", type=int, default=50, help="linear warm-up steps (default 50)")
    p.add_argument("--schedule", choices=["wsd", "cosine"], default="wsd",
                   help="warmup-stable-decay or cosine (default wsd)")
    p.add_argument("--decay-frac", type=float, default=0.2, help="wsd: share of steps spent decaying (default 0.2)")
    p.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay on matrices (default 0.1)")
    p.add_argument("--optimizer", choices=["adamw", "muon"], default="adamw",
                   help="adamw, or muon for hidden matrices with AdamW for the rest (default adamw)")
    p.add_argument("--clip", type=float, default=1.0, help="gradient-norm clip (default 1.0)")
    p.add_argument("--mtp-weight", type=float, default=0.3, help="lambda, the MTP loss weight (default 0.3)")
    p.add_argument("--balance-weight", type=float, default=1e-4,
                   help="alpha, the sequence-wise balance loss weight (default 1e-4)")
    p.add_argument("--bias-gamma", type=float, default=1e-3,
                   help="gamma, the balancing-bias step per optimizer step; 0 disables (default 1e-3)")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                   help="auto: bf16 autocast where the device supports it (default auto)")
    p.add_argument("--seed", type=int, default=0, help="seed for init and data order (default 0)")
    p.add_argument("--save-every", type=int, default=100, help="checkpoint every N steps (default 100)")
    p.add_argument("--keep", type=int, default=2, help="checkpoints to keep (default 2)")
    p.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint in RUN")
    p.add_argument("--max-bad-steps", type=int, default=10,
                   help="stop after this many non-finite steps in a row (default 10)")
    p.add_argument("--tensorboard", action="store_true", help="also log to RUN/tensorboard (needs tensorboard)")
    p.add_argument("--wandb", action="store_true", help="also log to Weights & Biases (needs wandb)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", choices=[k for k in PRESETS if k not in SHAPE_ONLY], help="model shape")
    p.add_argument("--config", metavar="PATH", help="a config.json (or a model dir) instead of --preset")
    p.add_argument("--data", required=True, metavar="DIR", help="token shards from `nanoseek tokenize`")
    p.add_argument("--mix", metavar="DOMAIN=W,...", help="domain mixture weights, e.g. math=2,prose=1 (default equal)")
    p.add_argument("--curriculum", action="store_true", help="first epoch of each domain easiest first")
    add_common_arguments(p, default_lr=3e-3, default_steps=1000)


def add_sft_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, metavar="DIR", help="the model dir to fine-tune (e.g. a pretrain RUN)")
    p.add_argument("--data", nargs="+", required=True, metavar="JSONL",
                   help='chat examples, one {"messages": [...]} per line')
    p.add_argument("--no-packing", action="store_true",
                   help="one conversation per row, padded (default: pack conversations into full rows)")
    add_common_arguments(p, default_lr=1e-3, default_steps=300)
