"""`nanoseek <command>`: one argparse subcommand per verb.

Run `nanoseek --help` for the list and `nanoseek COMMAND --help` for every flag of a command.
Also runs as `python -m nanoseek`.
"""

from __future__ import annotations

import argparse
import json
import sys

from .checkpoint import CheckpointError
from .config import PRESETS, SHAPE_ONLY, ConfigError, ModelConfig, preset

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


class UsageError(Exception):
    """Bad command-line input; printed without a traceback."""


def _config_from(args: argparse.Namespace) -> tuple[str, ModelConfig]:
    if bool(args.preset) == bool(args.config):
        raise UsageError("give exactly one of --preset NAME or --config PATH")
    if args.preset:
        return args.preset, preset(args.preset)
    return args.config, ModelConfig.from_json(args.config)


def cmd_init(args: argparse.Namespace) -> int:
    import torch

    from .checkpoint import save_model
    from .model import Transformer

    name, cfg = _config_from(args)
    if args.preset in SHAPE_ONLY:
        raise UsageError(f"preset {args.preset!r} is shape-only (for `nanoseek cost`); it is far too large "
                         f"to instantiate here. Use one of: {', '.join(p for p in PRESETS if p not in SHAPE_ONLY)}")
    torch.manual_seed(args.seed)
    model = Transformer(cfg)
    out = save_model(model, args.out, dtype=getattr(torch, DTYPES[args.dtype]))
    print(f"wrote {out}: {name}, {model.num_parameters():,} parameters, seed {args.seed}, {args.dtype}")
    return 0


def cmd_cost(args: argparse.Namespace) -> int:
    from .cost import estimate, format_cost

    name, cfg = _config_from(args)
    try:
        cost = estimate(cfg, seq_len=args.seq_len, dtype=args.dtype)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if args.json:
        print(json.dumps({"name": name, **cost.as_dict()}, indent=2))
    else:
        print(format_cost(name, cost))
    return 0


def cmd_speedrun(args: argparse.Namespace) -> int:
    print("nanoseek speedrun is not built yet: it lands with the speedrun issue, after training, GRPO and the "
          "engine. Available now: `nanoseek init`, `nanoseek cost`.", file=sys.stderr)
    return 2


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nanoseek", description="DeepSeek's LLM system in miniature.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def add_config_flags(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--preset", choices=list(PRESETS), help="a built-in model shape")
        sp.add_argument("--config", metavar="PATH", help="a config.json file, or a model dir holding one")

    sp = sub.add_parser("init", help="write a randomly initialised model dir (HF deepseek_v3 layout)",
                        description="Write a randomly initialised model dir that nanoseek, transformers, "
                                    "vLLM and SGLang load.")
    add_config_flags(sp)
    sp.add_argument("--out", required=True, metavar="DIR", help="model dir to write (replaced atomically)")
    sp.add_argument("--seed", type=int, default=0, help="random seed for the initial weights (default 0)")
    sp.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="weight dtype on disk (default fp32)")
    sp.set_defaults(func=cmd_init)

    sp = sub.add_parser("cost", help="parameters, activated parameters, KV-cache bytes and FLOPs of a config",
                        description="Print total and activated parameters, KV-cache bytes per token (MLA "
                                    "against MHA and GQA-8), FLOPs per token and the cache of a 128K context.")
    add_config_flags(sp)
    sp.add_argument("--seq-len", type=int, default=4096,
                    help="context length for the attention FLOPs (default 4096)")
    sp.add_argument("--dtype", choices=["bf16", "fp16", "fp32", "fp8"], default="bf16",
                    help="cache element type (default bf16)")
    sp.add_argument("--json", action="store_true", help="print JSON instead of a table")
    sp.set_defaults(func=cmd_cost)

    sp = sub.add_parser("speedrun", help="the main job, end to end (not built yet)",
                        description="Data, tokenizer, pretraining, SFT, GRPO, evaluation and a report. "
                                    "Not built yet.")
    sp.add_argument("--out", metavar="DIR", help="run directory")
    sp.add_argument("--quick", action="store_true", help="a few-minute version")
    sp.set_defaults(func=cmd_speedrun)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (UsageError, ConfigError, CheckpointError) as e:
        print(f"nanoseek {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
