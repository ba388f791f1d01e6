"""`nanoseek grpo`: GRPO on a synthetic task with rule rewards, resumable like pretraining.

    nanoseek grpo --model runs/x/sft --task arithmetic --out runs/x/rl --steps 100

Each step: P train problems (a fresh seeded draw per step); G completions each from the engine
(at --temperature, ending at </answer>); rule rewards; group-normalised advantages; the log-probs of
the sampled tokens under the sampling policy (`old`, at the rollouts' temperature) and the frozen reference; then
--inner-updates passes of the clipped GRPO loss over the batch in minibatches, one optimizer
step per pass. Groups whose completions all scored the same are counted and left out: their
advantages are 0, so they would add only the KL term. With --resample N (DAPO's dynamic sampling)
a step draws up to N more sets of P problems while fewer than P groups have reward variance, and
trains on the first P groups that do (from step --resample-from on). The reference can be
refreshed to the current policy every --ref-refresh steps.

RUN/ holds metrics.jsonl (reward, accuracy, format rate, response length, KL, clip fraction,
entropy, zero-variance groups, timings per step), with --eval-every eval.jsonl (greedy pass@1 and
response length on held-out test problems over the steps), checkpoints/step-N/ (committed
atomically; --resume continues from the newest, bit for bit) and, at the end, the final model dir.

    torchrun --nproc_per_node=2 -m nanoseek grpo ...    # each rank samples every second group

Under torchrun the groups are shared out over the ranks; which groups train, the loss's normalisation
and the metrics are global, and the gradients add up over the ranks, so N processes take the step
one process takes.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict
from pathlib import Path

import torch

from ..checkpoint import load_model, save_model
from ..data.tasks import get_task
from ..engine.engine import Engine
from ..io import write_atomic
from ..model import Transformer
from ..tokenizer import Tokenizer
from ..train.args import TrainError, settings
from ..train.common import (AdamW, MetricsLog, OptimConfig, complete_checkpoints, graceful_sigint, load_training_state,
                            lr_at, save_checkpoint, set_rng_state)
from ..train.dist import World, all_reduce, average_gradients, barrier
from ..train.pretrain import export_final, training_world
from .args import GRPOConfig, GRPORun
from .evaluate import answer_params, completion_text, evaluate, prompt_ids
from .grpo import group_advantages, grpo_loss
from .rewards import RewardConfig, score


class _Steps:
    """The step counter save_checkpoint expects of a trainer."""

    def __init__(self, step: int = 0):
        self.step_num = step

    def state_dict(self) -> dict:
        return {"step": self.step_num}


class _SharedPrompts:
    """Stands in for the KV cache in a training forward (MLA layers call `update`): first it records
    the latents of each group's prompt, then hands every completion its group's prompt latents ahead
    of its own. The prompt runs once per group instead of once per completion; gradients flow back
    through the copies into that one forward."""

    def __init__(self, counts: list[int], device: torch.device):
        self.counts, self.latents, self.recording = torch.tensor(counts, device=device), {}, True
        self.rows = sum(counts)  # repeat_interleave told its output size does not wait on a GPU

    def update(self, layer_idx: int, c_kv: torch.Tensor, k_pe: torch.Tensor):
        if self.recording:
            self.latents[layer_idx] = (c_kv, k_pe)
            return c_kv, k_pe
        c_pre, k_pre = (t.repeat_interleave(self.counts, 0, output_size=self.rows)
                        for t in self.latents[layer_idx])
        return torch.cat((c_pre, c_kv), 1), torch.cat((k_pre, k_pe), 1)


def sequence_logprobs(model: Transformer, seqs: list[list[int]], starts: list[int], entropy: bool = False,
                      temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Log-probs (B, W) of each completion's tokens (completion b = seqs[b][starts[b]:], its token t in
    column t; W the longest) under the policy at `temperature` (the distribution the rollouts sampled
    from), their mask, and with `entropy` that distribution's per-token entropy there (for logging, no
    gradient).

    Consecutive sequences with the same prompt (a GRPO group) share its forward: the prompt less its
    last token runs once per group, then each sequence runs from its prompt's last token on,
    attending to its group's prompt latents. Same numbers as a forward per sequence (up to float
    rounding); the head only runs where a completion token is predicted.
    """
    device = next(model.parameters()).device
    prefixes, counts = [], []  # one per group: the prompt less its last token; sequences sharing it
    for s, start in zip(seqs, starts):
        if counts and s[: start - 1] == prefixes[-1]:
            counts[-1] += 1
        else:
            prefixes.append(s[: start - 1])
            counts.append(1)
    own = [s[start - 1:] for s, start in zip(seqs, starts)]  # the prompt's last token and the completion

    def batch(rows: list[list[int]]) -> torch.Tensor:
        x = torch.zeros(len(rows), max(1, max(len(r) for r in rows)), dtype=torch.long)
        for b, r in enumerate(rows):
            x[b, : len(r)] = torch.tensor(r, dtype=torch.long)
        return x.to(device)

    shared = _SharedPrompts(counts, device)
    P = max(len(p) for p in prefixes)
    if P:
        model.trunk(batch(prefixes), cache=shared)  # causal: right padding is never attended to
    shared.recording = False
    x = batch(own)
    T = x.shape[1]
    lengths = torch.tensor([len(p) for p, n in zip(prefixes, counts) for _ in range(n)])
    attend = None  # with no prompt to share, plain causal attention over each sequence's own tokens
    if P:
        sees_prompt = (torch.arange(P)[None, :] < lengths[:, None])[:, None, :].expand(-1, T, -1)  # (B, T, P)
        causal = torch.ones(T, T, dtype=torch.bool).tril()[None].expand(len(seqs), -1, -1)
        attend = torch.cat((sees_prompt, causal), -1)[:, None].to(device)  # (B, 1, T, P + T)
    h, _ = model.trunk(x, start_pos=lengths.to(device), cache=shared if P else None, mask=attend)
    W = T - 1  # position t predicts token t + 1; completion b has len(own[b]) - 1 tokens
    mask = (torch.arange(W)[None, :] < torch.tensor([len(r) - 1 for r in own])[:, None]).float().to(device)
    where = mask.bool()  # the head runs only on these rows, not on the padding after shorter completions
    logits = model.lm_head(h[:, :-1][where]).float()  # (N, V)
    logp_rows = (logits if temperature == 1.0 else logits / temperature).log_softmax(-1)
    logp = torch.zeros(len(seqs), W, dtype=logp_rows.dtype, device=device)
    logp = logp.masked_scatter(where, logp_rows.gather(-1, x[:, 1:][where][:, None])[:, 0])
    ent = None
    if entropy:
        with torch.no_grad():
            ent = torch.zeros_like(logp).masked_scatter(where, -(logp_rows.exp() * logp_rows).sum(-1))
    return logp, mask, ent


def rollout(engine: Engine, task, cfg: GRPOConfig, step: int, tok: Tokenizer, draw: int = 0, world: World = World()):
    """This rank's share of P problems x G completions: prompt ids, requests and scores of groups
    rank, rank + W, ... (all P in one process). `draw` k > 0 is the step's k-th extra draw under
    --resample: other problems and sampling seeds, as fixed as the first. Every completion's seed is
    its place among the P x G, so any number of ranks samples the same tokens."""
    problems = task.problems("train", cfg.prompts, level=cfg.level,
                             seed=cfg.seed * 1_000_003 + step + draw * 100_000_007)
    mine = range(world.rank, cfg.prompts, world.world_size)
    prompts = [prompt_ids(tok, problems[i], cfg.template) for i in mine]
    params = [answer_params(tok, temperature=cfg.temperature, max_tokens=cfg.max_tokens,
                            seed=(cfg.seed * 7919 + step) * 10_007 + i * cfg.group + j + draw * 1_000_000_007)
              for i in mine for j in range(cfg.group)]
    reqs = engine.generate([p for p in prompts for _ in range(cfg.group)], params)
    rewards = RewardConfig(cfg.format_weight, cfg.language_weight)
    scores = [[score(task, problems[i], completion_text(tok, reqs[n * cfg.group + j]), rewards)
               for j in range(cfg.group)] for n, i in enumerate(mine)]
    return list(mine), prompts, reqs, scores


def grpo_step(policy: Transformer, ref: Transformer | None, optim, engine: Engine, task, cfg: GRPOConfig, step: int,
              tok: Tokenizer, world: World = World()) -> dict:
    """One GRPO step. Under torchrun each rank samples and scores its share of the groups; which groups
    train, the loss's normalisation and the metrics are global, and the update is data parallel, so
    any number of ranks takes the step one process takes."""
    t0 = time.perf_counter()
    ids, prompts, reqs, scores, draws = [], [], [], [], 0
    flat_all = torch.zeros(0, dtype=torch.bool)  # every group of every draw so far, in draw order: no signal
    while True:  # one draw of P groups; with --resample, more while fewer than P groups carry signal
        mine, p, r, sc = rollout(engine, task, cfg, step, tok, draws, world)
        flags = torch.zeros(cfg.prompts, dtype=torch.float64)
        flags[mine] = torch.tensor([float(len({s.reward for s in row}) == 1) for row in sc], dtype=torch.float64)
        flat_all = torch.cat((flat_all, all_reduce(flags, world).bool()))
        ids, prompts, reqs, scores = ids + [draws * cfg.prompts + i for i in mine], prompts + p, reqs + r, scores + sc
        draws += 1
        if int((~flat_all).sum()) >= cfg.prompts or draws > (cfg.resample if step >= cfg.resample_from else 0):
            break
    t_roll = time.perf_counter() - t0
    rewards = torch.tensor([[s.reward for s in row] for row in scores]).view(len(scores), cfg.group)
    adv, flat = group_advantages(rewards, scale=cfg.advantage_scale)
    trained = [g for g in range(len(flat_all)) if not flat_all[g]][: cfg.prompts]  # at most P groups, all ranks
    groups = [n for n, g in enumerate(ids) if g in set(trained)]  # this rank's of them
    keep = [(i, j) for i in groups for j in range(cfg.group)]
    lengths = [len(r.output) for r in reqs]
    sums = all_reduce(torch.tensor([rewards.sum().item(), rewards.numel(),
                                    sum(s.correct for row in scores for s in row),
                                    sum(s.formatted for row in scores for s in row), sum(lengths)],
                                   dtype=torch.float64), world)
    m = {"step": step + 1, "reward": (sums[0] / sums[1]).item(), "accuracy": (sums[2] / sums[1]).item(),
         "format": (sums[3] / sums[1]).item(), "response_length": (sums[4] / sums[1]).item(),
         "zero_variance_groups": int(flat_all.sum()), "draws": draws, "trained_sequences": len(trained) * cfg.group,
         "rollout_seconds": t_roll}
    kl = clip_frac = entropy = 0.0
    if trained:
        seqs = [prompts[i] + reqs[i * cfg.group + j].output for i, j in keep]
        starts = [len(prompts[i]) for i, _ in keep]
        rows, cols = (torch.tensor(v, dtype=torch.long) for v in ([i for i, _ in keep], [j for _, j in keep]))
        advantages = adv[rows, cols].to(next(policy.parameters()).device)  # empty where this rank trains none
        batches = [range(k, min(k + cfg.minibatch, len(seqs))) for k in range(0, len(seqs), cfg.minibatch)]
        T = cfg.temperature or 1.0  # greedy rollouts (0) have no distribution of their own: score them at 1
        with torch.no_grad():  # the sampling policy (needed from the second update on) and the reference
            old = ([sequence_logprobs(policy, [seqs[b] for b in mb], [starts[b] for b in mb], temperature=T)[0]
                    for mb in batches] if cfg.inner_updates > 1 else [None] * len(batches))
            refs = ([sequence_logprobs(ref, [seqs[b] for b in mb], [starts[b] for b in mb], temperature=T)[0]
                     for mb in batches] if ref is not None else [None] * len(batches))
        total_tokens = all_reduce(torch.tensor(float(sum(len(s) - st for s, st in zip(seqs, starts)))), world).item()
        total_seqs = len(trained) * cfg.group
        # --normalize batch: the published objective's mean over all P x G completions, where a group
        # without reward variance counts with advantage 0, so a step with little signal moves little
        signal_share = len(trained) / cfg.prompts if cfg.normalize == "batch" else 1.0
        policy.train()
        for _ in range(cfg.inner_updates):
            optim.zero_grad(set_to_none=True)
            kl = clip_frac = entropy = 0.0
            for mb, old_lp, ref_lp in zip(batches, old, refs):
                logp, mask, ent = sequence_logprobs(policy, [seqs[b] for b in mb], [starts[b] for b in mb],
                                                    entropy=True, temperature=T)
                if old_lp is None:  # one update per rollout: the policy is still the sampling policy
                    old_lp = logp.detach()
                loss, stats = grpo_loss(logp, old_lp, advantages[list(mb)], mask, ref_lp, cfg.clip_eps, cfg.beta,
                                        cfg.averaging)
                share = (len(mb) / total_seqs if cfg.averaging == "sequence" else float(mask.sum()) / total_tokens)
                (loss * share * signal_share).backward()
                tokens_share = float(mask.sum()) / total_tokens
                kl += stats.kl * tokens_share
                clip_frac += stats.clip_fraction * tokens_share
                entropy += float((ent * mask).sum()) / total_tokens
            if world.world_size > 1:  # each rank's share of one global mean: their gradients add up
                for p in policy.parameters():
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                average_gradients(list(policy.parameters()), world, average=False)
            grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.clip)
            optim.step()
        policy.eval()
        m["grad_norm"] = float(grad_norm)
        kl, clip_frac, entropy = all_reduce(torch.tensor([kl, clip_frac, entropy], dtype=torch.float64), world).tolist()
    m.update(kl=kl, clip_fraction=clip_frac, entropy=entropy, seconds=time.perf_counter() - t0)
    return m


def run(r: GRPORun) -> Transformer:
    """A GRPO run as `r` says; returns the policy (RUN holds it once every step ran). Under torchrun,
    every rank runs it and samples its share of the groups (grpo_step)."""
    cfg = r.grpo
    for name, value in [(n, getattr(r, n)) for n in ("steps", "save_every", "keep")] + \
                       [(n, getattr(cfg, n)) for n in ("prompts", "group", "max_tokens", "inner_updates", "minibatch")]:
        if value < 1:
            raise TrainError(f"--{name.replace('_', '-')} must be >= 1 (got {value})")
    if cfg.warmup < 0:
        raise TrainError(f"--warmup must be >= 0 (got {cfg.warmup})")
    for name in ("temperature", "beta", "lr", "clip_eps", "clip"):
        if not getattr(cfg, name) >= 0 or (name in ("lr", "clip_eps") and getattr(cfg, name) == 0):
            raise TrainError(f"--{name.replace('_', '-')} must be {'> 0' if name in ('lr', 'clip_eps') else '>= 0'} "
                             f"(got {getattr(cfg, name)})")
    if cfg.resample < 0 or cfg.resample_from < 0:
        raise TrainError(f"--resample and --resample-from must be >= 0 (got {cfg.resample}, {cfg.resample_from})")
    if cfg.group < 2:
        raise TrainError("--group must be >= 2: advantages compare completions within a group")
    if r.max_running is not None and r.max_running < 1:
        raise TrainError(f"--max-running must be >= 1 (got {r.max_running})")
    if r.eval_every < 0 or r.eval_n < 1:
        raise TrainError(f"--eval-every must be >= 0 and --eval-n >= 1 (got {r.eval_every}, {r.eval_n})")
    try:
        task = get_task(cfg.task)
        held_out = task.problems("test", r.eval_n, level=cfg.level, strict=False) if r.eval_every else []
    except ValueError as e:
        raise TrainError(str(e)) from None
    if r.eval_every and not held_out:
        raise TrainError(f"--eval-every: {task.name} has no test problems at level {cfg.level}")
    with training_world() as world:
        if cfg.prompts < world.world_size:
            raise TrainError(f"--prompts {cfg.prompts} is fewer than the {world.world_size} processes: each needs a group")
        return _train(r, task, held_out, world)


def _train(r: GRPORun, task, held_out: list, world: World) -> Transformer:
    """The run itself, on every rank: rank 0 alone writes files and scores the held-out problems."""
    from tqdm import tqdm

    cfg = r.grpo
    run = Path(r.out)
    done = complete_checkpoints(run)
    if done and not r.resume:
        raise TrainError(f"{run} already has checkpoints (newest: {done[-1].name}); pass --resume to continue it "
                         f"or choose another --out")
    saved = load_training_state(done[-1]) if (r.resume and done) else None
    device = world.device  # rollouts and updates on a GPU if there is one
    policy = load_model(done[-1] if saved else r.model).to(device)
    tok = Tokenizer.load(r.model)
    tok.check_fits(policy.cfg.vocab_size)
    ref = None
    if cfg.beta:  # the frozen reference: the starting policy, kept in RUN/reference for resumes
        ref = load_model(run / "reference").to(device) if saved else copy.deepcopy(policy)
        ref.requires_grad_(False)
        if saved and cfg.ref_refresh and saved["trainer"]["step"] % cfg.ref_refresh == 0:
            ref.load_state_dict(policy.state_dict())  # stopped between a refresh's checkpoint and its reference
    optim = AdamW(policy.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.99))
    engine = Engine(policy, tok, max_running=r.max_running or cfg.prompts * cfg.group, compile=r.compile)
    if r.compile:
        try:
            engine.warm_up()  # compile now; later steps reuse the graph (the weights are its inputs)
        except RuntimeError as e:
            raise TrainError(f"--compile: {e}") from None
    steps = _Steps()
    if saved:
        optim.load_state_dict(saved["optimizer"])
        steps.step_num = saved["trainer"]["step"]
        set_rng_state(saved["rng"])
    if world.main:
        run.mkdir(parents=True, exist_ok=True)
        write_atomic(run / "grpo_args.json", json.dumps(settings(r), indent=2, default=str))
        if ref is not None and not saved:
            save_model(ref, run / "reference")
    log = MetricsLog(run, world.main, steps.step_num)
    curve = MetricsLog(run, bool(held_out) and world.main, steps.step_num, name="eval.jsonl")

    def evaluate_held_out() -> None:
        if world.main:
            report = evaluate(engine, task, held_out, max_tokens=cfg.max_tokens, template=cfg.template)
            curve.write({"step": steps.step_num, "pass1": report.pass1, "format": report.format_rate,
                         "mean_tokens": report.mean_tokens, "n": report.n})
        barrier(world)

    if held_out and steps.step_num == 0:
        evaluate_held_out()
    files = tok.files(policy.cfg.max_position_embeddings)
    schedule = OptimConfig(lr=cfg.lr, warmup=cfg.warmup, decay_frac=0.0)  # linear warm-up, then constant
    bar = tqdm(total=r.steps, initial=steps.step_num, disable=r.quiet or not world.main, unit="step",
               dynamic_ncols=True)
    with graceful_sigint() as stop:
        try:
            while steps.step_num < r.steps:
                lr = lr_at(steps.step_num, r.steps, schedule)
                for group in optim.param_groups:
                    group["lr"] = lr
                m = {**grpo_step(policy, ref, optim, engine, task, cfg, steps.step_num, tok, world), "lr": lr}
                steps.step_num += 1
                log.write(m)
                bar.update(1)
                bar.set_postfix(reward=f"{m['reward']:.3f}", acc=f"{m['accuracy']:.2f}",
                                len=f"{m['response_length']:.0f}", refresh=False)
                if held_out and (steps.step_num % r.eval_every == 0 or steps.step_num == r.steps):
                    evaluate_held_out()
                refresh = ref is not None and cfg.ref_refresh and steps.step_num % cfg.ref_refresh == 0
                if refresh or steps.step_num % r.save_every == 0 or steps.step_num == r.steps or stop["now"]:
                    if world.main:
                        save_checkpoint(run, policy, optim, steps, {"config": asdict(cfg)}, files, r.keep)
                    barrier(world)
                if refresh:  # after its checkpoint: a resume never finds a reference newer than its step
                    ref.load_state_dict(policy.state_dict())
                    if world.main:
                        save_model(ref, run / "reference")
                    barrier(world)
                if stop["now"]:
                    break
        finally:
            bar.close()
            log.close()
            curve.close()
    if steps.step_num == r.steps and world.main:
        export_final(policy, run, files)
    return policy
