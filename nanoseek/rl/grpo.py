"""GRPO (DeepSeekMath §4.1, used for DeepSeek-R1): a group of G completions per prompt, each
scored by rules; advantage = (r - mean(group)) / std(group); PPO's clipped ratio against the
policy that sampled, minus beta times an unbiased estimate of KL to a frozen reference; no value
network.

Per token t of completion i:

    ratio   = pi(o_it) / pi_old(o_it)
    surr    = min(ratio * A_i, clip(ratio, 1 - eps, 1 + eps) * A_i)
    kl      = pi_ref / pi - log(pi_ref / pi) - 1            (Schulman's k3: >= 0, unbiased)
    J_it    = surr - beta * kl

averaged either per sequence, then over sequences (`sequence`: DeepSeekMath's 1/G sum_i
1/|o_i| sum_t, which TRL calls "grpo") or over all tokens of the batch at once (`token`: longer
completions weigh more; DAPO's choice). docs/grpo.md compares the variants.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def group_advantages(rewards: torch.Tensor, eps: float = 1e-4, scale: str = "std") -> tuple[torch.Tensor, torch.Tensor]:
    """rewards (P, G) -> advantages (P, G) and a (P,) mask of groups with zero variance.

    scale "std": (r - mean) / std, std the sample standard deviation (unbiased, as TRL); "none":
    r - mean, Dr. GRPO's form, which does not weight groups that are nearly all right or all wrong
    up to the others. A group whose completions all scored the same gets advantage 0 everywhere,
    so it contributes no gradient.
    """
    if scale not in ("std", "none"):
        raise ValueError(f"scale must be 'std' or 'none' (got {scale!r})")
    mean = rewards.mean(-1, keepdim=True)
    flat = (rewards == rewards[:, :1]).all(-1)
    if scale == "none":
        return (rewards - mean).masked_fill(flat[:, None], 0.0), flat
    std = rewards.std(-1, keepdim=True) if rewards.shape[-1] > 1 else torch.zeros_like(mean)
    adv = (rewards - mean) / (std + eps)
    return adv.masked_fill(flat[:, None], 0.0), flat


@dataclass
class LossStats:
    kl: float  # mean k3 estimate over completion tokens
    clip_fraction: float  # share of tokens whose ratio was clipped against their advantage's sign
    ratio: float  # mean ratio (1 on the first inner update)


def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
              ref_logp: torch.Tensor | None = None, clip_eps: float = 0.2, beta: float = 0.04,
              averaging: str = "sequence") -> tuple[torch.Tensor, LossStats]:
    """-J for completions (B, T): log-probs of the chosen tokens now, when sampled, and under the
    reference; advantages (B,); mask (B, T) 1 on completion tokens."""
    mask = mask.to(logp.dtype)
    ratio = torch.exp(logp - old_logp)
    adv = advantages[:, None].to(logp.dtype)
    unclipped, clipped = ratio * adv, ratio.clamp(1 - clip_eps, 1 + clip_eps) * adv
    objective = torch.minimum(unclipped, clipped)
    kl = torch.zeros_like(logp)
    if ref_logp is not None and beta:
        d = ref_logp - logp
        kl = torch.exp(d) - d - 1
        objective = objective - beta * kl
    if averaging == "sequence":
        per_seq = (objective * mask).sum(-1) / mask.sum(-1).clamp(min=1)
        loss = -per_seq.mean()
    elif averaging == "token":
        loss = -(objective * mask).sum() / mask.sum().clamp(min=1)
    else:
        raise ValueError(f"averaging must be 'sequence' or 'token' (got {averaging!r})")
    with torch.no_grad():
        n = mask.sum().clamp(min=1)
        was_clipped = (clipped < unclipped).to(logp.dtype)  # the min picked the clipped side
        stats = LossStats(float((kl * mask).sum() / n), float((was_clipped * mask).sum() / n),
                          float((ratio * mask).sum() / n))
    return loss, stats
