"""The typed configs of `pretrain` and `sft`, and the command-line flags that fill them.

    cfg = PretrainConfig(data="runs/x/data/tokens", preset="small", train=TrainConfig(out="runs/x/base",
                                                                                      steps=1000, lr=3e-3))
    pretrain.run(cfg)                  # what `nanoseek pretrain --preset small --data ... --out ...` does

The flags take their defaults from the dataclasses, so a config built in code and one parsed from
argv agree. No torch import here, so `nanoseek --help` stays fast.
"""

from __future__ import annotations

import argparse
from dataclasses import MISSING, dataclass, fields, is_dataclass

from ..config import PRESETS, SHAPE_ONLY


class TrainError(RuntimeError):
    """A training run cannot start or continue; the message says why and what to do."""


def check_choice(name: str, value, choices: tuple) -> None:
    """What argparse's `choices` checks on the command line, for configs built in code."""
    if value not in choices:
        raise TrainError(f"--{name.replace('_', '-')} must be one of {', '.join(map(str, choices))} (got {value!r})")


@dataclass(kw_only=True)
class TrainConfig:
    """The training loop's settings, shared by pretrain and sft (`train_loop`)."""
    out: str  # the run dir: checkpoints, metrics, the final model
    steps: int
    lr: float  # peak learning rate
    batch_size: int = 8  # sequences per micro-batch per process
    seq_len: int = 256
    grad_accum: int = 1
    min_lr_ratio: float = 0.1
    warmup: int = 50
    schedule: str = "wsd"  # wsd (warmup-stable-decay) or cosine
    decay_frac: float = 0.2
    weight_decay: float = 0.1
    optimizer: str = "adamw"  # adamw, or muon for hidden matrices
    clip: float = 1.0
    mtp_weight: float = 0.3  # lambda
    balance_weight: float = 1e-4  # alpha
    bias_gamma: float = 1e-3  # gamma; 0 disables bias balancing
    balance_gamma_schedule: float = 0.0  # gamma is 0 for this last share of the steps
    balance_mtp: bool = True  # the MTP modules' gates are bias-balanced too
    mtp_weight_schedule: str | None = None  # "W@F": the MTP weight becomes W from share F of the steps on
    precision: str = "auto"
    fp8_scaling: str = "fine"  # fine (V3's 1x128 tiles, 128x128 blocks) or tensor; with precision fp8
    compile: bool = False  # torch.compile each block's attention and norms (the MoE stays eager)
    expert_parallel: int = 1  # ranks the routed experts are sharded over (= the torchrun processes)
    seed: int = 0
    save_every: int = 100
    keep: int = 2
    resume: bool = False
    max_bad_steps: int = 10
    tensorboard: bool = False
    wandb: bool = False
    quiet: bool = False

    def __post_init__(self) -> None:
        check_choice("schedule", self.schedule, ("wsd", "cosine"))
        check_choice("optimizer", self.optimizer, ("adamw", "muon"))
        check_choice("precision", self.precision, ("auto", "fp32", "bf16", "fp8"))
        check_choice("fp8_scaling", self.fp8_scaling, ("fine", "tensor"))
        if self.expert_parallel < 1:
            raise TrainError(f"--expert-parallel must be >= 1 (got {self.expert_parallel})")
        if not 0 <= self.balance_gamma_schedule <= 1:
            raise TrainError(f"--balance-gamma-schedule must be a share of the steps in [0, 1] "
                             f"(got {self.balance_gamma_schedule})")
        self.mtp_later()  # checks it

    def mtp_later(self) -> tuple[float, float] | None:
        """--mtp-weight-schedule "W@F" as (W, F)."""
        if self.mtp_weight_schedule is None:
            return None
        try:
            weight, share = (float(v) for v in self.mtp_weight_schedule.split("@"))
        except ValueError:
            weight = share = None
        if weight is None or weight < 0 or not 0 <= share <= 1:
            raise TrainError(f"--mtp-weight-schedule must be WEIGHT@SHARE, e.g. 0.1@0.68 for V3's 0.1 from 68% of "
                             f"the steps on (got {self.mtp_weight_schedule!r})")
        return weight, share


@dataclass(kw_only=True)
class PretrainConfig:
    data: str  # token shards from `nanoseek tokenize`
    train: TrainConfig
    preset: str | None = None  # exactly one of preset and config
    config: str | None = None  # a config.json or a model dir
    tokenizer: str | None = None  # default: the byte-level tokenizer
    mix: str | None = None  # domain=weight,...
    curriculum: bool = False


@dataclass(kw_only=True)
class SFTConfig:
    model: str  # the model dir to fine-tune
    data: list[str]  # jsonl chat examples
    train: TrainConfig
    tokenizer: str | None = None  # default: the model dir's
    no_packing: bool = False


def settings(cfg) -> dict:
    """A command config as one flat dict (what RUN/train_args.json and the metrics loggers record)."""
    flat = {}
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        flat.update(settings(value) if is_dataclass(value) else {f.name: value})
    return flat


def from_args(cls, args: argparse.Namespace, **given):
    """A dataclass from the parsed flags of the same names (and `given` values for the rest)."""
    return cls(**{f.name: getattr(args, f.name) for f in fields(cls) if f.name not in given and hasattr(args, f.name)},
               **given)


def pretrain_config(args: argparse.Namespace) -> PretrainConfig:
    return from_args(PretrainConfig, args, train=from_args(TrainConfig, args))


def sft_config(args: argparse.Namespace) -> SFTConfig:
    return from_args(SFTConfig, args, train=from_args(TrainConfig, args))


def default(cls, name: str):
    """A dataclass field's default (for the flag of the same name)."""
    f = next(f for f in fields(cls) if f.name == name)
    return f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]


def shown(value) -> str:
    """A default as a help text writes it: 1e-4, not 0.0001."""
    if isinstance(value, float):
        return f"{value:.0e}".replace("e-0", "e-") if 0 < abs(value) < 1e-2 else f"{value:g}"
    return str(value)


def add_common_arguments(p: argparse.ArgumentParser, default_lr: float, default_steps: int) -> None:
    """Flags shared by pretrain and sft: the fields of TrainConfig."""
    d = lambda name: default(TrainConfig, name)  # noqa: E731
    p.add_argument("--out", required=True, metavar="RUN", help="run dir: checkpoints, metrics, the final model")
    p.add_argument("--tokenizer", metavar="DIR",
                   help="tokenizer dir (default: pretrain: the byte-level one; sft: the model dir's)")
    p.add_argument("--steps", type=int, default=default_steps, help=f"optimizer steps (default {default_steps})")
    p.add_argument("--batch-size", type=int, default=d("batch_size"),
                   help=f"sequences per micro-batch per process (default {d('batch_size')})")
    p.add_argument("--seq-len", type=int, default=d("seq_len"), help=f"tokens per sequence (default {d('seq_len')})")
    p.add_argument("--grad-accum", type=int, default=d("grad_accum"),
                   help=f"micro-batches per optimizer step (default {d('grad_accum')})")
    p.add_argument("--lr", type=float, default=default_lr, help=f"peak learning rate (default {default_lr})")
    p.add_argument("--min-lr-ratio", type=float, default=d("min_lr_ratio"),
                   help=f"final lr / peak lr (default {d('min_lr_ratio')})")
    p.add_argument("--warmup", type=int, default=d("warmup"), help=f"linear warm-up steps (default {d('warmup')})")
    p.add_argument("--schedule", choices=["wsd", "cosine"], default=d("schedule"),
                   help=f"warmup-stable-decay or cosine (default {d('schedule')})")
    p.add_argument("--decay-frac", type=float, default=d("decay_frac"),
                   help=f"wsd: share of steps spent decaying (default {d('decay_frac')})")
    p.add_argument("--weight-decay", type=float, default=d("weight_decay"),
                   help=f"AdamW weight decay on matrices (default {d('weight_decay')})")
    p.add_argument("--optimizer", choices=["adamw", "muon"], default=d("optimizer"),
                   help=f"adamw, or muon for hidden matrices with AdamW for the rest (default {d('optimizer')})")
    p.add_argument("--clip", type=float, default=d("clip"), help=f"gradient-norm clip (default {d('clip')})")
    p.add_argument("--mtp-weight", type=float, default=d("mtp_weight"),
                   help=f"lambda, the MTP loss weight (default {d('mtp_weight')})")
    p.add_argument("--balance-weight", type=float, default=d("balance_weight"),
                   help=f"alpha, the sequence-wise balance loss weight (default {shown(d('balance_weight'))})")
    p.add_argument("--bias-gamma", type=float, default=d("bias_gamma"),
                   help="gamma, the balancing-bias step per optimizer step; 0 disables "
                        f"(default {shown(d('bias_gamma'))})")
    p.add_argument("--balance-gamma-schedule", type=float, default=d("balance_gamma_schedule"), metavar="SHARE",
                   help="stop moving the balancing bias (gamma 0) for this last share of the steps, as V3 did for "
                        "its last 500B of 14.8T tokens, about 0.034 (default 0: never)")
    p.add_argument("--no-balance-mtp", dest="balance_mtp", action="store_false",
                   help="leave the MTP module's gate bias where it starts (only the main layers' gates are "
                        "balanced); the speedrun's plan does, docs/log.md says why")
    p.add_argument("--mtp-weight-schedule", default=d("mtp_weight_schedule"), metavar="WEIGHT@SHARE",
                   help="change the MTP weight to WEIGHT from SHARE of the steps on; V3: --mtp-weight 0.3 "
                        "--mtp-weight-schedule 0.1@0.68 (default: --mtp-weight throughout)")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp8"], default=d("precision"),
                   help="fp32, bf16 (autocast), fp8 or auto: on a CPU with bf16 instructions, time a few "
                        "forward+backward passes in both and keep bf16 only if it is 1.1x faster; bf16 on a GPU "
                        "that has it; fp32 elsewhere. fp8: DeepSeek-V3's FP8 training of the linear layers "
                        "(real FP8 GEMMs on Hopper GPUs, simulated exactly elsewhere, so slower on a CPU; "
                        "docs/fp8.md). The choice and its reason go to RUN/precision.json; --resume keeps it "
                        "(default auto)")
    p.add_argument("--fp8-scaling", choices=["fine", "tensor"], default=d("fp8_scaling"),
                   help="with --precision fp8: fine, V3's scales per 1x128 activation tile and 128x128 weight "
                        "block, or tensor, one scale per GEMM operand, to compare (default fine)")
    p.add_argument("--compile", action="store_true",
                   help="compile each block's attention, norms and residual with torch.compile (needs g++; the "
                        "MoE stays eager): faster steps in bf16, a little faster in fp32 (docs/benchmarks.md), "
                        "after 10-30 s of compiling per run; static shapes, so each new batch shape compiles "
                        "again. Not with --precision fp8")
    p.add_argument("--expert-parallel", type=int, default=d("expert_parallel"), metavar="N",
                   help="shard every MoE layer's routed experts over the N torchrun processes and send tokens to "
                        "them with all-to-all; the rest stays data parallel. N must equal --nproc_per_node; "
                        "n_group a multiple of N makes topk_group bound the ranks a token visits (docs/training.md) "
                        "(default 1: every rank holds every expert)")
    p.add_argument("--seed", type=int, default=d("seed"), help=f"seed for init and data order (default {d('seed')})")
    p.add_argument("--save-every", type=int, default=d("save_every"),
                   help=f"checkpoint every N steps (default {d('save_every')})")
    p.add_argument("--keep", type=int, default=d("keep"), help=f"checkpoints to keep (default {d('keep')})")
    p.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint in RUN")
    p.add_argument("--max-bad-steps", type=int, default=d("max_bad_steps"),
                   help=f"stop after this many non-finite steps in a row (default {d('max_bad_steps')})")
    p.add_argument("--tensorboard", action="store_true", help="also log to RUN/tensorboard (needs tensorboard)")
    p.add_argument("--wandb", action="store_true", help="also log to Weights & Biases (needs wandb)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """`nanoseek pretrain`'s flags: the fields of PretrainConfig and TrainConfig."""
    p.add_argument("--preset", choices=[k for k in PRESETS if k not in SHAPE_ONLY], help="model shape")
    p.add_argument("--config", metavar="PATH", help="a config.json (or a model dir) instead of --preset")
    p.add_argument("--data", required=True, metavar="DIR", help="token shards from `nanoseek tokenize`")
    p.add_argument("--mix", metavar="DOMAIN=W,...", help="domain mixture weights, e.g. math=2,prose=1 (default equal)")
    p.add_argument("--curriculum", action="store_true", help="first epoch of each domain easiest first")
    add_common_arguments(p, default_lr=3e-3, default_steps=1000)


def add_sft_arguments(p: argparse.ArgumentParser) -> None:
    """`nanoseek sft`'s flags: the fields of SFTConfig and TrainConfig."""
    p.add_argument("--model", required=True, metavar="DIR", help="the model dir to fine-tune (e.g. a pretrain RUN)")
    p.add_argument("--data", nargs="+", required=True, metavar="JSONL",
                   help='chat examples, one {"messages": [...]} per line')
    p.add_argument("--no-packing", action="store_true",
                   help="one conversation per row, padded (default: pack conversations into full rows)")
    add_common_arguments(p, default_lr=1e-3, default_steps=300)
