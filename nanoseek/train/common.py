"""The pieces every training loop shares: optimizer, schedule, one step, balancing, checkpoints, metrics.

pretrain.py and sft.py differ only in where batches come from; both call `Trainer.step` and
`save_checkpoint` / `load_checkpoint` from here.

One step (DeepSeek-V3 recipe): for each micro-batch, loss = CE + mtp_weight * MTP CE +
balance_weight * sequence-wise balance loss, in fp32 or under bf16 autocast (precision.py);
gradients averaged over data-parallel ranks; a non-finite loss or gradient norm skips the step;
clip to `clip`; optimizer step at the scheduled lr; then the auxiliary-loss-free balancing bias
of every MoE layer moves by gamma toward balance, from the step's expert loads summed over ranks.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..checkpoint import write_model
from ..io import COMMIT, atomic_dir
from ..model import MoE, Transformer, compile_dense
from .args import TrainError
from .dist import World, all_reduce, average_gradients
from . import ep, fp8
from .precision import choose, measure


@dataclass
class OptimConfig:
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup: int = 50
    schedule: str = "wsd"  # wsd: warmup-stable-decay; cosine
    decay_frac: float = 0.2  # wsd: the final share of steps that decays to min_lr
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    optimizer: str = "adamw"  # or muon (hidden matrices), AdamW for the rest
    clip: float = 1.0


def lr_at(step: int, total: int, c: OptimConfig) -> float:
    """Learning rate for optimizer step `step` (0-based) of `total`."""
    if step < c.warmup:
        return c.lr * (step + 1) / c.warmup
    floor = c.lr * c.min_lr_ratio
    if c.schedule == "cosine":
        progress = (step - c.warmup) / max(1, total - c.warmup)
        return floor + (c.lr - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    decay_start = int(total * (1 - c.decay_frac))
    if step < decay_start:
        return c.lr
    progress = (step - decay_start) / max(1, total - decay_start)
    return c.lr + (floor - c.lr) * min(1.0, progress)


# ---- optimizers --------------------------------------------------------------------------------

def _newton_schulz(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """Approximately orthogonalise the last two dims of g (Muon's quintic iteration)."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g.float()
    transpose = x.shape[-2] > x.shape[-1]
    if transpose:
        x = x.transpose(-2, -1)
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for _ in range(steps):
        s = x @ x.transpose(-2, -1)
        x = a * x + (b * s + c * s @ s) @ x
    if transpose:
        x = x.transpose(-2, -1)
    return x.to(g.dtype)


class Muon(torch.optim.Optimizer):
    """Momentum, then orthogonalised updates for hidden weight matrices (stacked experts: per expert)."""

    def __init__(self, params, lr: float = 0.02, momentum: float = 0.95, weight_decay: float = 0.0):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                buf = self.state[p].setdefault("momentum", torch.zeros_like(p))
                buf.mul_(group["momentum"]).add_(p.grad)
                update = _newton_schulz(p.grad.add(buf, alpha=group["momentum"]))  # Nesterov
                scale = max(1.0, p.shape[-2] / p.shape[-1]) ** 0.5
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(update, alpha=-group["lr"] * scale)


class AdamW(torch.optim.AdamW):
    """torch's fused AdamW, 4-5x its default per-tensor loop on a CPU. Unlike that loop it writes the
    weights without bumping their version counters, which autograd's checks on saved tensors rely on,
    so a hook bumps them after each step. A state saved by the unfused AdamW loads into the fused one."""

    def __init__(self, params, **kwargs):
        super().__init__(params, fused=True, **kwargs)
        self.register_step_post_hook(lambda opt, args, kwargs: torch.autograd.graph.increment_version(
            [p for g in opt.param_groups for p in g["params"]]))

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        for g in self.param_groups:  # a state from the unfused AdamW brings back fused=None
            g["fused"], g["foreach"] = True, None
            for p in g["params"]:
                if "step" in self.state.get(p, {}):  # the fused kernel wants the step beside the weight
                    self.state[p]["step"] = self.state[p]["step"].to(p.device, torch.float32)


class Optimizers:
    """One or two torch optimizers stepped together, with per-group lr multipliers."""

    def __init__(self, opts: list[torch.optim.Optimizer]):
        self.opts = opts

    def set_lr(self, lr: float) -> None:
        for opt in self.opts:
            for g in opt.param_groups:
                g["lr"] = lr * g.get("lr_scale", 1.0)

    def step(self) -> None:
        for opt in self.opts:
            opt.step()

    def zero_grad(self) -> None:
        for opt in self.opts:
            opt.zero_grad(set_to_none=True)

    def state_dict(self) -> list[dict]:
        return [opt.state_dict() for opt in self.opts]

    def load_state_dict(self, states: list[dict]) -> None:
        for opt, s in zip(self.opts, states, strict=True):
            opt.load_state_dict(s)


def build_optimizer(model: Transformer, c: OptimConfig) -> Optimizers:
    """AdamW with weight decay on matrices only; with `muon`, Muon takes the hidden matrices."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    outer = ("embed_tokens", "lm_head", "gate.weight")  # Muon is for hidden layers only
    if c.optimizer == "muon":
        hidden = [p for n, p in named if p.dim() >= 2 and not any(o in n for o in outer)]
        rest = [(n, p) for n, p in named if not any(p is h for h in hidden)]
        muon = Muon(hidden, lr=c.lr, weight_decay=c.weight_decay)
        for g in muon.param_groups:
            g["lr_scale"] = 1.0
    elif c.optimizer == "adamw":
        rest, muon = named, None
    else:
        raise ValueError(f"optimizer must be adamw or muon (got {c.optimizer!r})")
    decay = [p for _, p in rest if p.dim() >= 2]
    no_decay = [p for _, p in rest if p.dim() < 2]
    # with Muon, AdamW's share (embeddings, head, norms) runs at a tenth of Muon's lr
    scale = 0.1 if muon else 1.0
    adamw = AdamW([{"params": decay, "weight_decay": c.weight_decay, "lr_scale": scale},
                   {"params": no_decay, "weight_decay": 0.0, "lr_scale": scale}],
                  lr=c.lr * scale, betas=c.betas)
    return Optimizers([adamw] + ([muon] if muon else []))


# ---- auxiliary-loss-free balancing ---------------------------------------------------------------

@torch.no_grad()
def update_balance_bias(model: Transformer, counts: torch.Tensor, gamma: float, mtp: bool = True) -> None:
    """V3 §2.1.2: b_i += gamma for underloaded experts, -= gamma for overloaded ones, per MoE layer.

    counts: (MoE layers, E) tokens routed to each expert this step, summed over all ranks, in
    `model.moe_gates()` order (the MTP modules' last; a module that did not run has all zeros,
    and moves no bias). mtp=False leaves the MTP modules' gates as they are.
    """
    if gamma == 0 or counts.numel() == 0:
        return
    gates = model.moe_gates()
    if not mtp:
        gates = gates[:len(gates) - sum(isinstance(m.block.mlp, MoE) for m in model.mtp)]
    for gate, load in zip(gates, counts.float()[:len(gates)], strict=True):
        gate.e_score_correction_bias += gamma * torch.sign(load.mean() - load)


# ---- the step ---------------------------------------------------------------------------------------

@dataclass
class LossConfig:
    mtp_weight: float = 0.3
    balance_weight: float = 1e-4  # alpha
    bias_gamma: float = 1e-3  # gamma; 0 turns bias balancing off
    gamma_off_share: float = 0.0  # gamma is 0 for this last share of the steps (V3: its last 500B of 14.8T tokens)
    mtp_later: tuple[float, float] | None = None  # (weight, from share): V3's 0.3, then 0.1 for the last 4.8T tokens
    balance_mtp: bool = True  # the MTP modules' gates are bias-balanced like the main layers'

    def at(self, step: int, total: int) -> tuple[float, float]:
        """The MTP weight and the bias step gamma in force at optimizer step `step` (0-based) of `total`."""
        mtp = self.mtp_weight
        if self.mtp_later is not None and step >= self.mtp_later[1] * total:
            mtp = self.mtp_later[0]
        gamma = 0.0 if step >= (1 - self.gamma_off_share) * total else self.bias_gamma
        return mtp, gamma


class Trainer:
    def __init__(self, model: Transformer, optim: Optimizers, optim_cfg: OptimConfig, loss_cfg: LossConfig,
                 total_steps: int, world: World, precision: str = "auto", max_bad_steps: int = 10,
                 batch_shape: tuple[int, int] = (8, 256), resumed_precision: str | None = None,
                 fp8_scaling: str = "fine", compile: bool = False):
        """`precision`: fp32, bf16, fp8 or auto (measured at `batch_shape`, see precision.py);
        `resumed_precision`: what a resumed run computed in, which `auto` keeps; `fp8_scaling`: fine
        (V3's tiles and blocks) or tensor, for fp8; `compile`: compile the blocks' dense parts
        (`model.py`'s `compile_dense`) after the precision is chosen, which measures them eager."""
        self.model, self.optim, self.oc, self.lc = model, optim, optim_cfg, loss_cfg
        self.total, self.world = total_steps, world
        self.requested = precision
        self.precision = choose(precision, world.device, lambda: self._measure(batch_shape),
                                f"batch {batch_shape[0]} x {batch_shape[1]} tokens", resumed_precision)
        self.amp = self.precision.dtype
        self.fp8 = fp8.Recipe(fp8_scaling, kernel="auto") if self.precision.fp8 else None
        self.step_num = 0  # optimizer steps taken (or skipped) so far
        self.skipped, self.bad_in_a_row, self.max_bad = 0, 0, max_bad_steps
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.shards = [p for p in self.params if ep.is_sharded(p)]  # expert parallel: this rank's experts
        self.replicated = [p for p in self.params if not ep.is_sharded(p)]
        if self.shards:
            ep.traffic(model, world)  # the measurement's passes are not training traffic
        self.compiling = compile  # until the first step has run (and compiled)
        if compile:
            if self.fp8:
                raise TrainError("--compile with --precision fp8 is not built (fp8's scaled GEMMs run eagerly); "
                                 "drop one of them")
            compile_dense(model)

    def step(self, micro_batches: list[tuple[torch.Tensor, torch.Tensor]]) -> dict:
        """One optimizer step over the micro-batches; returns its metrics."""
        model, dev = self.model, self.world.device
        model.train()
        self.optim.zero_grad()
        t0 = time.perf_counter()
        sums = torch.zeros(4, dtype=torch.float64)  # loss, lm, mtp, balance
        counts, tokens = None, 0
        mtp_weight, gamma = self.lc.at(self.step_num, self.total)
        for x, y in micro_batches:
            x, y = x.to(dev), y.to(dev)
            try:
                with (torch.autocast(dev.type, dtype=self.amp or torch.float32, enabled=self.amp is not None),
                      fp8.autocast(self.fp8)):
                    out = model.loss(x, y, mtp_weight, self.lc.balance_weight)
                (out.loss / len(micro_batches)).backward()
            except Exception as e:  # torch.compile raises its backends' own exception types
                if not self.compiling or isinstance(e, TrainError):
                    raise
                raise TrainError(f"the compiled training step failed ({type(e).__name__}: {str(e)[:300]}); "
                                 f"torch.compile needs a working C++ compiler (g++) on CPU. Run without "
                                 f"--compile") from e
            sums += torch.tensor([out.loss.item(), out.lm_loss.item(), out.mtp_loss.item(),
                                  out.balance_loss.item()], dtype=torch.float64)
            counts = out.expert_counts if counts is None else counts + out.expert_counts
            tokens += int((y != -100).sum())
        sums /= len(micro_batches)
        self.compiling = False
        average_gradients(self.replicated, self.world)
        all_reduce(sums, self.world, average=True)
        counts = all_reduce(counts.to(torch.float64), self.world)
        tokens = int(all_reduce(torch.tensor(tokens, dtype=torch.float64), self.world).item())
        grad_norm = self._clip()
        lr = lr_at(self.step_num, self.total, self.oc)
        self.step_num += 1
        metrics = {"step": self.step_num, "loss": sums[0].item(), "lm_loss": sums[1].item(),
                   "mtp_loss": sums[2].item(), "balance_loss": sums[3].item(), "grad_norm": grad_norm.item(),
                   "lr": lr, "tokens": tokens, "mtp_weight": mtp_weight, "bias_gamma": gamma}
        if not (math.isfinite(metrics["loss"]) and math.isfinite(metrics["grad_norm"])):
            self.optim.zero_grad()
            self.skipped += 1
            self.bad_in_a_row += 1
            if self.bad_in_a_row >= self.max_bad:
                raise FloatingPointError(
                    f"{self.bad_in_a_row} steps in a row had a non-finite loss or gradient (last: loss "
                    f"{metrics['loss']}, grad norm {metrics['grad_norm']}); lower --lr or check the data")
            return {**metrics, "skipped": True}
        self.bad_in_a_row = 0
        self.optim.set_lr(lr)
        self.optim.step()
        update_balance_bias(model, counts, gamma, self.lc.balance_mtp)
        if counts.numel():
            load = counts / counts.sum(-1, keepdim=True).clamp(min=1) * counts.shape[-1]  # load / mean load
            metrics["expert_load_max_over_mean"] = [round(v, 4) for v in load.max(-1).values.tolist()]
            metrics["expert_counts"] = counts.long().tolist()
        if self.shards:
            metrics.update(ep.traffic(model, self.world))
        metrics["seconds"] = time.perf_counter() - t0
        return metrics

    def _clip(self) -> torch.Tensor:
        """Clip to the global gradient norm; expert shards hold the sum over every rank's tokens (ep.py),
        so they are averaged by dividing, and their norms add up over the ranks."""
        if not self.shards:
            return torch.nn.utils.clip_grad_norm_(self.params, self.oc.clip)
        for p in self.shards:  # a shard whose experts got no tokens: zero, as its slice of one process's stack
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        grads = [p.grad for p in self.shards]
        torch._foreach_div_(grads, self.world.world_size)
        local = torch.nn.utils.get_total_norm(grads).pow(2)
        norm = (torch.nn.utils.get_total_norm([p.grad for p in self.replicated if p.grad is not None]).pow(2)
                + all_reduce(local, self.world)).sqrt()
        torch.nn.utils.clip_grads_with_norm_(self.params, self.oc.clip, norm)
        return norm

    def _measure(self, batch_shape: tuple[int, int]) -> dict[str, float]:
        """Both precisions' rates, averaged over ranks so that every rank makes the same choice."""
        r = measure(self.model, self.world.device, *batch_shape, self.lc.mtp_weight, self.lc.balance_weight)
        t = all_reduce(torch.tensor([r["fp32"], r["bf16"]], dtype=torch.float64), self.world, average=True)
        return {"fp32": t[0].item(), "bf16": t[1].item()}

    def state_dict(self) -> dict:
        return {"step": self.step_num, "skipped": self.skipped, "bad_in_a_row": self.bad_in_a_row,
                "precision": self.precision.name}

    def load_state_dict(self, s: dict) -> None:
        self.step_num, self.skipped, self.bad_in_a_row = s["step"], s["skipped"], s["bad_in_a_row"]
        if self.requested == "auto" and s.get("precision") and s["precision"] != self.precision.name:
            self.precision = choose("auto", self.world.device, None, resumed=s["precision"])
            self.amp = self.precision.dtype


# ---- random state -----------------------------------------------------------------------------------

def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(s: dict) -> None:
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    torch.set_rng_state(s["torch"])
    if torch.cuda.is_available() and s["cuda"]:
        torch.cuda.set_rng_state_all(s["cuda"])


# ---- stopping ------------------------------------------------------------------------------------------

_INTERRUPTS = [0]  # Ctrl-Cs training loops have taken gracefully in this process (see interrupts())


def interrupts() -> int:
    """How many Ctrl-Cs training loops have taken gracefully in this process (a loop on its last step still
    finishes; whoever runs the next one should not)."""
    return _INTERRUPTS[0]


@contextlib.contextmanager
def graceful_sigint():
    """Ctrl-C sets stop["now"] so the loop saves a checkpoint and leaves; a second Ctrl-C aborts."""
    stop = {"now": False}

    def on_sigint(signum, frame):
        if stop["now"]:
            raise KeyboardInterrupt
        stop["now"] = True
        _INTERRUPTS[0] += 1
        print("\nstopping: saving a checkpoint first (Ctrl-C again to abort without saving)", file=sys.stderr)

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield stop
    finally:
        signal.signal(signal.SIGINT, previous)


# ---- checkpoints --------------------------------------------------------------------------------------

def checkpoint_dir(run: Path, step: int) -> Path:
    return run / "checkpoints" / f"step-{step:08d}"


def complete_checkpoints(run: Path) -> list[Path]:
    """Committed checkpoints of a run, oldest first."""
    root = run / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.name.startswith("step-") and (p / COMMIT).exists())


def save_checkpoint(run: Path, model: Transformer, optim: Optimizers, trainer: Trainer, extra_state: dict,
                    extra_files: dict[str, str], keep: int) -> Path:
    """An HF model dir plus training_state/, written atomically, marked committed; keeps the newest `keep`."""
    path = checkpoint_dir(run, trainer.step_num)
    with atomic_dir(path) as tmp:
        write_model(model, tmp, extra_files=extra_files)
        state = tmp / "training_state"
        state.mkdir()
        torch.save({"optimizer": optim.state_dict(), "trainer": trainer.state_dict(), "rng": rng_state(),
                    **extra_state}, state / "state.pt")
        (tmp / COMMIT).write_text(json.dumps({"step": trainer.step_num, "time": time.time()}))
    for old in complete_checkpoints(run)[:-keep]:
        (old / COMMIT).unlink()  # un-commit first: a kill mid-delete never leaves a "complete" husk
        shutil.rmtree(old, ignore_errors=True)
    return path


def load_training_state(path: Path) -> dict:
    return torch.load(path / "training_state" / "state.pt", weights_only=False)


def _step_of(line: str) -> float:
    """The step of a metrics line; infinity for a line a killed run left half-written."""
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return math.inf


class MetricsLog:
    """metrics.jsonl, or another `name` (append; on resume, lines past the resumed step are dropped) + optional
    TB / W&B."""

    def __init__(self, run: Path, enabled: bool, resume_step: int = 0, tensorboard: bool = False,
                 wandb: bool = False, config: dict | None = None, name: str = "metrics.jsonl"):
        self.enabled, self.path = enabled, run / name
        self.tb = self.wb = None
        if not enabled:
            return
        if resume_step and self.path.exists():
            kept = [ln for ln in self.path.read_text().splitlines() if _step_of(ln) <= resume_step]
            self.path.write_text("".join(ln + "\n" for ln in kept))
        elif self.path.exists():
            self.path.unlink()
        try:
            if tensorboard:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(str(run / "tensorboard"))
            if wandb:
                import wandb as wb
                self.wb = wb.init(project="nanoseek", dir=str(run), config=config or {})
        except ImportError as e:
            raise TrainError(f"--tensorboard needs `pip install tensorboard`, --wandb needs `pip install wandb` "
                             f"({e})") from None

    def write(self, m: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(m) + "\n")
        scalars = {k: v for k, v in m.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self.tb:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, m["step"])
        if self.wb:
            self.wb.log(scalars, step=m["step"])

    def close(self) -> None:
        if self.tb:
            self.tb.close()
        if self.wb:
            self.wb.finish()
