"""`nanoseek pretrain`: next-token + MTP pretraining with auxiliary-loss-free balancing, resumable.

    nanoseek pretrain --preset small --data runs/x/tokens --tokenizer runs/x/tokenizer --out runs/x/base
    torchrun --nproc_per_node=2 -m nanoseek pretrain ...        # data parallel, same code

RUN/ holds metrics.jsonl, checkpoints/step-N/ (each an HF model dir + training_state/, committed
atomically; the newest --keep are kept) and, once training ends, the final model's files at
the top level, so RUN itself is a model dir for nanoseek, transformers, vLLM and SGLang.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Callable

import torch

from ..checkpoint import load_model, write_model
from ..config import ConfigError, ModelConfig, preset
from ..cost import estimate
from ..model import Transformer
from ..perf import matmul_peak
from ..tokenizer import Tokenizer
from . import dist
from .common import (LossConfig, MetricsLog, OptimConfig, Trainer, build_optimizer, complete_checkpoints,
                     graceful_sigint, load_training_state, save_checkpoint, set_rng_state)


from .args import TrainError


def parse_mix(text: str | None) -> dict[str, float] | None:
    if not text:
        return None
    try:
        pairs = [part.split("=") for part in text.split(",")]
        return {k.strip(): float(v) for k, v in pairs}
    except ValueError:
        raise TrainError(f"--mix must look like math=2,prose=1 (got {text!r})") from None


def model_config(args) -> ModelConfig:
    if bool(args.preset) == bool(args.config):
        raise TrainError("give exactly one of --preset NAME or --config PATH")
    return preset(args.preset) if args.preset else ModelConfig.from_json(args.config)


def config_differences(a: ModelConfig, b: ModelConfig) -> list[str]:
    return [f"{f.name}: checkpoint {getattr(a, f.name)!r}, flags {getattr(b, f.name)!r}"
            for f in dataclasses.fields(a) if f.compare and getattr(a, f.name) != getattr(b, f.name)]


def start_or_resume(args, cfg: ModelConfig, run: Path, fresh: Callable[[], Transformer]):
    """(model, saved state or None): `fresh()`, or the newest complete checkpoint with --resume."""
    done = complete_checkpoints(run)
    if done and not args.resume:
        raise TrainError(f"{run} already has checkpoints (newest: {done[-1].name}); pass --resume to continue it "
                         f"or choose another --out")
    if not (args.resume and done):
        return fresh(), None
    newest = done[-1]
    diffs = config_differences(ModelConfig.from_json(newest), cfg)
    if diffs:
        raise TrainError(f"{newest}: the checkpoint's config disagrees with the flags ({'; '.join(diffs)}); "
                         f"resume with the same model flags or choose another --out")
    return load_model(newest), load_training_state(newest)


def _seeded_model(cfg: ModelConfig, seed: int) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(cfg)


def export_final(model: Transformer, run: Path, tokenizer_files: dict[str, str]) -> None:
    """Put the final model's files at the top of RUN, each replaced atomically, weights last."""
    tmp = run / f".final.tmp-{os.getpid()}"
    tmp.mkdir(exist_ok=True)
    write_model(model, tmp, extra_files=tokenizer_files)
    names = sorted((p.name for p in tmp.iterdir()), key=lambda n: n.endswith(".safetensors"))
    for name in names:
        os.replace(tmp / name, run / name)
    tmp.rmdir()


def train_loop(args, model: Transformer, saved: dict | None, next_micro_batch, data_state, tok: Tokenizer,
               world: dist.World, run: Path, extra_state_fn=None) -> Transformer:
    """The loop pretrain and sft share: step, log, checkpoint, stop on Ctrl-C, export at the end."""
    from tqdm import tqdm

    oc = OptimConfig(lr=args.lr, min_lr_ratio=args.min_lr_ratio, warmup=args.warmup, schedule=args.schedule,
                     decay_frac=args.decay_frac, weight_decay=args.weight_decay, optimizer=args.optimizer,
                     clip=args.clip)
    lc = LossConfig(args.mtp_weight, args.balance_weight, args.bias_gamma)
    if world.main:
        run.mkdir(parents=True, exist_ok=True)
        (run / "train_args.json").write_text(json.dumps(vars(args), indent=2, default=str))
    model.to(world.device)
    optim = build_optimizer(model, oc)
    trainer = Trainer(model, optim, oc, lc, args.steps, world, args.precision, args.max_bad_steps)
    if saved:
        optim.load_state_dict(saved["optimizer"])
        trainer.load_state_dict(saved["trainer"])
        data_state.load_state_dict(saved["data"])
        set_rng_state(saved["rng"])
    log = MetricsLog(run, world.main, trainer.step_num, args.tensorboard, args.wandb, vars(args))
    peak = matmul_peak(trainer.amp or torch.float32, seconds=0.3, device=world.device)
    flops_per_token = estimate(model.cfg, seq_len=args.seq_len).flops_per_token_train
    tokenizer_files = tok.files(model.cfg.max_position_embeddings)
    bar = tqdm(total=args.steps, initial=trainer.step_num, disable=args.quiet or not world.main, unit="step",
               dynamic_ncols=True)
    with graceful_sigint() as stop:
        try:
            while trainer.step_num < args.steps:
                m = trainer.step([next_micro_batch() for _ in range(args.grad_accum)])
                if "seconds" in m:
                    m["tokens_per_s"] = m["tokens"] / m["seconds"]
                    m["mfu"] = flops_per_token * m["tokens_per_s"] / peak
                log.write(m)
                if m.get("skipped") and world.main:
                    tqdm.write(f"warning: step {m['step']} skipped: non-finite loss ({m['loss']}) or gradient norm "
                               f"({m['grad_norm']}); {trainer.skipped} skipped so far", file=sys.stderr)
                bar.update(1)
                bar.set_postfix(loss=f"{m['loss']:.3f}", lr=f"{m['lr']:.2e}",
                                tok_s=f"{m.get('tokens_per_s', 0):.0f}", refresh=False)
                last = trainer.step_num == args.steps
                if trainer.step_num % args.save_every == 0 or last or stop["now"]:
                    if world.main:
                        try:
                            save_checkpoint(run, model, optim, trainer,
                                            {"data": data_state.state_dict(), **(extra_state_fn() if extra_state_fn else {})},
                                            tokenizer_files, args.keep)
                        except OSError as e:
                            done = complete_checkpoints(run)
                            raise TrainError(f"could not save a checkpoint in {run}: {e.strerror or e}; "
                                             f"the previous one ({done[-1] if done else 'none'}) is intact") from None
                    dist.barrier(world)
                if stop["now"]:
                    break
        finally:
            bar.close()
            log.close()
    if trainer.step_num == args.steps and world.main:
        export_final(model, run, tokenizer_files)
    return model


@contextlib.contextmanager
def training_world():
    """The process group for a training command: config errors become TrainError, and the group is
    always shut down."""
    world = dist.init()
    try:
        yield world
    except ConfigError as e:
        raise TrainError(str(e)) from None
    finally:
        dist.shutdown(world)


def main(args) -> int:
    from ..data.shards import Loader

    run = Path(args.out)
    with training_world() as world:
        cfg = model_config(args)
        tok = Tokenizer.load(args.tokenizer) if args.tokenizer else Tokenizer.byte_level()
        tok.check_fits(cfg.vocab_size)
        index_path = Path(args.data) / "index.json"
        if index_path.exists():
            shards_vocab = json.loads(index_path.read_text()).get("vocab_size")
            if shards_vocab != tok.vocab_size:
                raise TrainError(f"{index_path}: the shards were tokenized with a {shards_vocab}-token tokenizer, "
                                 f"not this {tok.vocab_size}-token one; pass the tokenizer the shards were made with")
        if args.seq_len > cfg.max_position_embeddings:
            raise TrainError(f"--seq-len {args.seq_len} exceeds max_position_embeddings={cfg.max_position_embeddings}")
        model, saved = start_or_resume(args, cfg, run, lambda: _seeded_model(cfg, args.seed))
        loader = Loader(args.data, args.seq_len, args.batch_size, parse_mix(args.mix), args.curriculum, args.seed,
                        world.rank, world.world_size)
        train_loop(args, model, saved, loader.next_batch, loader, tok, world, run)
    return 0
