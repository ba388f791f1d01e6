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
from ..config import ConfigError, ModelConfig, preset, vllm_mla_note
from ..cost import estimate
from ..io import write_atomic
from ..model import Transformer
from ..perf import matmul_peak
from ..tokenizer import Tokenizer
from . import dist, ep
from .args import PretrainConfig, TrainConfig, TrainError, settings
from .common import (LossConfig, MetricsLog, OptimConfig, Trainer, build_optimizer, complete_checkpoints,
                     graceful_sigint, load_training_state, save_checkpoint, set_rng_state)


def parse_mix(text: str | None) -> dict[str, float] | None:
    if not text:
        return None
    try:
        pairs = [part.split("=") for part in text.split(",")]
        return {k.strip(): float(v) for k, v in pairs}
    except ValueError:
        raise TrainError(f"--mix must look like math=2,prose=1 (got {text!r})") from None


def model_config(cfg: PretrainConfig) -> ModelConfig:
    if bool(cfg.preset) == bool(cfg.config):
        raise TrainError("give exactly one of --preset NAME or --config PATH")
    return preset(cfg.preset) if cfg.preset else ModelConfig.from_json(cfg.config)


def config_differences(a: ModelConfig, b: ModelConfig) -> list[str]:
    return [f"{f.name}: checkpoint {getattr(a, f.name)!r}, flags {getattr(b, f.name)!r}"
            for f in dataclasses.fields(a) if f.compare and getattr(a, f.name) != getattr(b, f.name)]


def start_or_resume(resume: bool, cfg: ModelConfig, run: Path, fresh: Callable[[], Transformer]):
    """(model, saved state or None): `fresh()`, or the newest complete checkpoint with --resume."""
    done = complete_checkpoints(run)
    if done and not resume:
        raise TrainError(f"{run} already has checkpoints (newest: {done[-1].name}); pass --resume to continue it "
                         f"or choose another --out")
    if not (resume and done):
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


def train_loop(tc: TrainConfig, model: Transformer, saved: dict | None, next_micro_batch, data_state,
               tok: Tokenizer, world: dist.World, command: dict, extra_state_fn=None) -> Transformer:
    """The loop pretrain and sft share: step, log, checkpoint, stop on Ctrl-C, export at the end. `command` is the
    whole command's settings, recorded in RUN/train_args.json and the metrics loggers."""
    from tqdm import tqdm

    run = Path(tc.out)
    oc = OptimConfig(lr=tc.lr, min_lr_ratio=tc.min_lr_ratio, warmup=tc.warmup, schedule=tc.schedule,
                     decay_frac=tc.decay_frac, weight_decay=tc.weight_decay, optimizer=tc.optimizer,
                     clip=tc.clip)
    lc = LossConfig(tc.mtp_weight, tc.balance_weight, tc.bias_gamma, tc.balance_gamma_schedule, tc.mtp_later(),
                    tc.balance_mtp)
    if world.main:
        run.mkdir(parents=True, exist_ok=True)
        (run / "train_args.json").write_text(json.dumps(command, indent=2, default=str))
    model.to(world.device)
    sharded = tc.expert_parallel > 1
    if sharded:
        if tc.expert_parallel != world.world_size:
            raise TrainError(f"--expert-parallel {tc.expert_parallel} must equal the number of processes "
                             f"({world.world_size}): run it as torchrun --nproc_per_node={tc.expert_parallel} "
                             f"(expert parallel inside data-parallel groups is not built)")
        try:
            ep.shard(model, world)
        except ValueError as e:
            raise TrainError(str(e)) from None
    optim = build_optimizer(model, oc)
    trainer = Trainer(model, optim, oc, lc, tc.steps, world, tc.precision, tc.max_bad_steps,
                      batch_shape=(tc.batch_size, tc.seq_len),
                      resumed_precision=saved["trainer"].get("precision") if saved else None,
                      fp8_scaling=tc.fp8_scaling, compile=tc.compile)
    choice = trainer.precision
    if world.main:
        print(f"precision: {choice.name} ({choice.reason})", file=sys.stderr, flush=True)
        write_atomic(run / "precision.json", json.dumps(
            {"precision": choice.name, "reason": choice.reason, "tokens_per_s": choice.rates}, indent=2))
    if saved:
        optim.load_state_dict(saved["optimizer_ranks"][world.rank] if sharded else saved["optimizer"])
        trainer.load_state_dict(saved["trainer"])
        data_state.load_state_dict(saved["data"])
        set_rng_state(saved["rng"])
    log = MetricsLog(run, world.main, trainer.step_num, tc.tensorboard, tc.wandb, command)
    peak = matmul_peak(trainer.amp or torch.float32, seconds=0.3, device=world.device)
    flops_per_token = estimate(model.cfg, seq_len=tc.seq_len).flops_per_token_train
    tokenizer_files = tok.files(model.cfg.max_position_embeddings)
    bar = tqdm(total=tc.steps, initial=trainer.step_num, disable=tc.quiet or not world.main, unit="step",
               dynamic_ncols=True)
    with graceful_sigint() as stop:
        try:
            while trainer.step_num < tc.steps:
                m = trainer.step([next_micro_batch() for _ in range(tc.grad_accum)])
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
                last = trainer.step_num == tc.steps
                if trainer.step_num % tc.save_every == 0 or last or stop["now"]:
                    extra = {"data": data_state.state_dict(), **(extra_state_fn() if extra_state_fn else {})}
                    with ep.gathered(model, world) if sharded else contextlib.nullcontext():
                        if sharded:  # each rank's optimizer holds its own experts' moments
                            extra["optimizer_ranks"] = dist.gather_objects(optim.state_dict(), world)
                        if world.main:
                            try:
                                save_checkpoint(run, model, optim, trainer, extra, tokenizer_files, tc.keep)
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
    if sharded:
        ep.unshard(model, world)
    if trainer.step_num == tc.steps and world.main:
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


def run(cfg: PretrainConfig) -> Transformer:
    """Pretrain as `cfg` says; returns the trained model (RUN holds it once every step ran)."""
    from ..data.shards import Loader

    tc = cfg.train
    with training_world() as world:
        mcfg = model_config(cfg)
        tok = Tokenizer.load(cfg.tokenizer) if cfg.tokenizer else Tokenizer.byte_level()
        tok.check_fits(mcfg.vocab_size)
        index_path = Path(cfg.data) / "index.json"
        if index_path.exists():
            shards_vocab = json.loads(index_path.read_text()).get("vocab_size")
            if shards_vocab != tok.vocab_size:
                raise TrainError(f"{index_path}: the shards were tokenized with a {shards_vocab}-token tokenizer, "
                                 f"not this {tok.vocab_size}-token one; pass the tokenizer the shards were made with")
        if tc.seq_len > mcfg.max_position_embeddings:
            raise TrainError(f"--seq-len {tc.seq_len} exceeds max_position_embeddings={mcfg.max_position_embeddings}")
        if world.main and not tc.quiet and (note := vllm_mla_note(mcfg)):
            print(f"note: {note}", flush=True)
        model, saved = start_or_resume(tc.resume, mcfg, Path(tc.out), lambda: _seeded_model(mcfg, tc.seed))
        loader = Loader(cfg.data, tc.seq_len, tc.batch_size, parse_mix(cfg.mix), cfg.curriculum, tc.seed,
                        world.rank, world.world_size)
        return train_loop(tc, model, saved, loader.next_batch, loader, tok, world, settings(cfg))
