"""The DeepSeek-V2/V3 model: MLA attention, DeepSeekMoE, multi-token prediction.

Read top to bottom: RMSNorm -> RoPE (+YaRN) -> MLA (naive and absorbed paths) -> Gate ->
Experts / MoE / MLP -> Block -> MTP -> Transformer. Names follow the papers and DeepSeek's
HF checkpoints (`kv_a_proj_with_mqa`, `e_score_correction_bias`, ...), so `checkpoint.py`
maps our state dict onto `model.layers.{i}.*` with almost no renaming.

Shapes: B batch, T query length, S key length, H heads, D model width, C latent width
(kv_lora_rank), R rope width, E routed experts, K experts per token, N = B*T tokens.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx.experimental.symbolic_shapes import statically_known_true

from .config import ModelConfig, yarn_mscale
from .train import fp8


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)  # one fused kernel
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


FEW_ROWS = 4  # up to this many rows, a compiled CPU inference graph computes x @ W^T as products and sums


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x (..., in) @ weight (out, in)^T, the projection every dense layer of the model runs through.

    In a compiled inference graph on the CPU whose x has at most FEW_ROWS rows, known when tracing
    (the engine's compiled decode step at batch 1: one row, or two when verifying a draft; dynamo
    specialises a batch of 1), written as products and sums, which inductor turns into a vectorised
    loop inside the graph instead of a BLAS call whose small-M path is slow; past a few rows the GEMM
    wins (docs/engine.md). Training, eager code and batched decoding (the engine compiles with
    dynamic shapes, so a batch of 2 or more is symbolic) take F.linear. This is the model's one
    concession to the compiled engine: every projection goes through it, so it cannot live there.
    Training under `fp8.autocast` runs it as FP8 GEMMs (train/fp8.py).
    """
    recipe = fp8.active()
    if recipe is not None:
        return fp8.linear(x, weight, recipe)
    if (torch.compiler.is_compiling() and not torch.is_grad_enabled() and x.device.type == "cpu"
            and statically_known_true(x.numel() <= FEW_ROWS * x.shape[-1])):
        return (x[..., None, :] * weight).sum(-1)
    return F.linear(x, weight)


class Linear(nn.Linear):
    """A bias-free nn.Linear (the only kind DeepSeek's models use) through `linear`."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype matmuls run in: the autocast dtype inside an autocast region, else x's own."""
    kind = x.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else x.dtype


# ---------------------------------------------------------------------------------------------
# Rotary embeddings on the decoupled rope part only (V2 §2.1.3), with YaRN context extension.


def rope_frequencies(cfg: ModelConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies (R/2,) and the cos/sin magnitude YaRN prescribes."""
    dim, base = cfg.qk_rope_head_dim, cfg.rope_theta
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    rs = cfg.rope_scaling
    if not rs:
        return inv_freq, 1.0
    factor = float(rs["factor"])
    original = rs["original_max_position_embeddings"]
    beta_fast, beta_slow = rs.get("beta_fast") or 32, rs.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        # the dimension whose wavelength completes `rotations` turns over the original context
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(beta_fast)), 0)
    high = min(math.ceil(correction_dim(beta_slow)), dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    # high-frequency dims (ramp 0) keep their frequency; low-frequency dims are interpolated
    inv_freq = inv_freq / factor * ramp + inv_freq * (1 - ramp)
    m, m_all = rs.get("mscale"), rs.get("mscale_all_dim")
    magnitude = yarn_mscale(factor, m) / yarn_mscale(factor, m_all) if m and m_all else yarn_mscale(factor)
    return inv_freq, magnitude


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x0, x1), (x2, x3), ... as DeepSeek's complex-number RoPE does.

    x: (B, T, ..., R); cos, sin: (B or 1, T, R/2). Eagerly as complex numbers (fewer kernels); in a
    compiled graph written out in real arithmetic, which fuses into one kernel (complex has none).
    """
    shape = cos.shape[:2] + (1,) * (x.dim() - 3) + cos.shape[2:]
    cos, sin = cos.float().view(shape), sin.float().view(shape)
    pairs = x.float().unflatten(-1, (-1, 2))
    if torch.compiler.is_compiling():
        real, imag = pairs[..., 0], pairs[..., 1]
        return torch.stack((real * cos - imag * sin, real * sin + imag * cos), -1).flatten(-2).to(x.dtype)
    rotation = torch.complex(cos, sin)  # e^{i m theta}; complex32 does not exist for bf16
    return torch.view_as_real(torch.view_as_complex(pairs) * rotation).flatten(-2).to(x.dtype)


# ---------------------------------------------------------------------------------------------
# Multi-head latent attention (V2 §2.1).


def causal_mask(T: int, S: int, device: torch.device) -> torch.Tensor | None:
    """Boolean (T, S) mask, queries aligned to the end of the keys; None where no mask is needed."""
    if T == 1:
        return None
    q_pos = torch.arange(S - T, S, device=device)[:, None]
    return torch.arange(S, device=device)[None, :] <= q_pos


class MLA(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        D, H = cfg.hidden_size, cfg.num_attention_heads
        self.n_heads = H
        if cfg.q_lora_rank is None:
            self.q_proj = Linear(D, H * cfg.qk_head_dim)
        else:
            self.q_a_proj = Linear(D, cfg.q_lora_rank)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps)
            self.q_b_proj = Linear(cfg.q_lora_rank, H * cfg.qk_head_dim)
        self.kv_a_proj_with_mqa = Linear(D, cfg.kv_lora_rank + cfg.qk_rope_head_dim)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank, cfg.rms_norm_eps)
        self.kv_b_proj = Linear(cfg.kv_lora_rank, H * (cfg.qk_nope_head_dim + cfg.v_head_dim))
        self.o_proj = Linear(H * cfg.v_head_dim, D)
        self.scale = cfg.softmax_scale

    def queries(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        c = self.cfg
        q = self.q_proj(x) if c.q_lora_rank is None else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.unflatten(-1, (self.n_heads, c.qk_head_dim))  # (B, T, H, Dn+R)
        q_nope, q_pe = q.split([c.qk_nope_head_dim, c.qk_rope_head_dim], dim=-1)
        return q_nope, apply_rope(q_pe, cos, sin)

    def latents(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """What MLA caches per token: the normalised latent c_KV (B, T, C) and the roped key (B, T, R)."""
        c_kv, k_pe = self.kv_a_proj_with_mqa(x).split([self.cfg.kv_lora_rank, self.cfg.qk_rope_head_dim], -1)
        return self.kv_a_layernorm(c_kv), apply_rope(k_pe, cos, sin)

    def naive(self, q_nope, q_pe, c_kv, k_pe, mask):
        """Expand the latents into per-head keys and values, then standard attention."""
        c = self.cfg
        B, S, _ = c_kv.shape
        T = q_nope.shape[1]
        kv = self.kv_b_proj(c_kv).unflatten(-1, (self.n_heads, c.qk_nope_head_dim + c.v_head_dim))  # (B, S, H, Dn+Dv)
        k_nope, v = kv.split([c.qk_nope_head_dim, c.v_head_dim], dim=-1)
        k = torch.cat((k_nope, k_pe[:, :, None, :].expand(B, S, self.n_heads, c.qk_rope_head_dim)), -1)
        q = torch.cat((q_nope, q_pe), -1)
        # SDPA's fused (flash) kernels want values as wide as keys; MLA's are narrower (128 vs 192 in V3),
        # which would send it to the unfused path that materialises every (T, S) score. Zero columns
        # added to v come out as zero columns of the output, sliced off below.
        pad = q.shape[-1] - c.v_head_dim
        if pad > 0:
            v = F.pad(v, (0, pad))
        o = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),  # (B, H, T|S, .)
            attn_mask=mask, is_causal=mask is None and T == S and T > 1, scale=self.scale)
        return o[..., :c.v_head_dim].transpose(1, 2).flatten(2)  # (B, T, H*Dv)

    def absorbed_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """W_UK (H, Dn, C) and W_UV (H, Dv, C): kv_b_proj's per-head blocks, views of its weight.

        They are applied on their own, not multiplied into the query and output projections: for every
        DeepSeek shape the products are larger than their factors (for `medium` 3x the weights and the
        FLOPs per token), and batch-1 decoding reads every weight once per token.
        """
        c = self.cfg
        kv_b = self.kv_b_proj.weight.unflatten(0, (self.n_heads, c.qk_nope_head_dim + c.v_head_dim))  # (H, ., C)
        return kv_b[:, :c.qk_nope_head_dim], kv_b[:, c.qk_nope_head_dim:]

    def absorbed(self, x, cos, sin, c_kv, k_pe, mask, weights: tuple[torch.Tensor, torch.Tensor] | None = None):
        """Attend directly over the cached latents: each head's query is taken into the latent space by
        W_UK, and the attention-weighted latents out of it by W_UV, so nothing is expanded per cached token.

        Multi-query attention with (C+R)-wide keys and C-wide values.
        weights: `absorbed_weights()` from the caller (a compiled graph takes them as inputs).
        """
        c = self.cfg
        S = c_kv.shape[1]
        w_uk, w_uv = weights if weights is not None else self.absorbed_weights()
        q_nope, q_pe = self.queries(x, cos, sin)  # (B, T, H, Dn), (B, T, H, R)
        B, T, H, _ = q_nope.shape
        q_lat = torch.bmm(q_nope.permute(2, 0, 1, 3).reshape(H, B * T, -1), w_uk)  # (H, B*T, C)
        q_lat = q_lat.view(H, B, T, -1).permute(1, 2, 0, 3)  # (B, T, H, C)
        # heads and query positions share one key set: fold them into one axis, (B, T*H, .)
        scores = (torch.bmm(q_lat.reshape(B, T * H, -1), c_kv.mT) + torch.bmm(q_pe.flatten(1, 2), k_pe.mT)).float()
        scores = scores.view(B, T, H, S) * self.scale
        if mask is None and T > 1:
            mask = causal_mask(T, S, c_kv.device)
        if mask is not None:
            mask = mask.view(-1, T, 1, S) if mask.dim() == 4 else mask.unsqueeze(-2)  # heads on axis 2 here
            scores = scores.masked_fill(~mask, float("-inf"))
        o_lat = torch.bmm(scores.softmax(-1).to(c_kv.dtype).flatten(1, 2), c_kv)  # (B, T*H, C)
        o = torch.bmm(o_lat.view(B * T, H, -1).transpose(0, 1), w_uv.mT)  # (H, B*T, Dv)
        return self.o_proj(o.transpose(0, 1).reshape(B, T, H * c.v_head_dim))  # (B, T, D)

    def forward(self, x, cos, sin, cache=None, layer_idx: int = 0, mask=None, absorb: bool = False):
        c_kv, k_pe = self.latents(x, cos, sin)
        if cache is not None:
            c_kv, k_pe = cache.update(layer_idx, c_kv, k_pe)  # (B, S, C), (B, S, R)
        if mask is None and x.shape[1] != c_kv.shape[1]:
            mask = causal_mask(x.shape[1], c_kv.shape[1], x.device)
        if absorb:
            return self.absorbed(x, cos, sin, c_kv, k_pe, mask)
        q_nope, q_pe = self.queries(x, cos, sin)
        return self.o_proj(self.naive(q_nope, q_pe, c_kv, k_pe, mask))


# ---------------------------------------------------------------------------------------------
# DeepSeekMoE (V2 §2.2, V3 §2.1.2).


class MLP(nn.Module):
    """SwiGLU feed-forward: the dense layers and the shared experts."""

    def __init__(self, dim: int, inter: int):
        super().__init__()
        self.gate_proj = Linear(dim, inter)
        self.up_proj = Linear(dim, inter)
        self.down_proj = Linear(inter, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def route(scores: torch.Tensor, bias: torch.Tensor | None, cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick K experts per token from gate scores (N, E); returns weights (N, K) and indices (N, K).

    V3: choose by score + bias inside the best `topk_group` groups (a group scores the sum of its
    top-2 biased scores), weight by the unbiased score, renormalised. V2: choose by softmax
    probability (group-limited: a group scores its max), weight by it unnormalised.
    """
    N, E = scores.shape
    choice = scores if bias is None else scores + bias
    if cfg.n_group > 1 and cfg.topk_method != "greedy":
        grouped = choice.view(N, cfg.n_group, E // cfg.n_group)  # (N, G, E/G)
        if cfg.topk_method == "noaux_tc":
            group_scores = grouped.topk(2, dim=-1).values.sum(-1)
        else:
            group_scores = grouped.amax(-1)
        keep = group_scores.topk(cfg.topk_group, dim=-1).indices  # (N, topk_group)
        kept = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep, True)
        choice = choice.masked_fill(~kept[:, :, None].expand_as(grouped).reshape(N, E), float("-inf"))
    indices = choice.topk(cfg.num_experts_per_tok, dim=-1).indices
    weights = scores.gather(1, indices)
    if cfg.norm_topk_prob:
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    return weights * cfg.routed_scaling_factor, indices


class Gate(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size))
        if cfg.scoring_func == "sigmoid":
            # the auxiliary-loss-free balancing bias: training moves it, gradients never touch it
            self.register_buffer("e_score_correction_bias", torch.zeros(cfg.n_routed_experts))
        else:
            self.e_score_correction_bias = None

    def forward(self, x: torch.Tensor):
        """x: (N, D) -> weights (N, K), indices (N, K), scores (N, E), all float32."""
        with torch.autocast(x.device.type, enabled=False):  # autocast would run the router in bf16
            logits = F.linear(x.float(), self.weight.float())
        scores = logits.sigmoid() if self.cfg.scoring_func == "sigmoid" else logits.softmax(-1)
        bias = None if self.e_score_correction_bias is None else self.e_score_correction_bias.float()
        weights, indices = route(scores, bias, self.cfg)
        return weights, indices, scores


class PermuteRows(torch.autograd.Function):
    """x[perm] for a permutation `perm`; the backward is the inverse permutation, again a gather.

    Autograd's own indexing backward scatters with accumulation, which is several times slower.
    """

    @staticmethod
    def forward(ctx, x, perm, inverse):
        ctx.save_for_backward(inverse)
        return x.index_select(0, perm)

    @staticmethod
    def backward(ctx, grad):
        (inverse,) = ctx.saved_tensors
        return grad.index_select(0, inverse), None, None


def expert_ffn(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """One routed expert's SwiGLU, x (n, D) -> (n, D), its gate and up rows stacked in w13 (2I, D); as
    FP8 GEMMs when training in FP8."""
    recipe = fp8.active()

    def mm(a, w):  # a @ w^T
        return a @ w.T if recipe is None else fp8.linear(a, w, recipe)

    gate, up = mm(x, w13).chunk(2, dim=-1)
    return mm(F.silu(gate) * up, w2)


class PadRows(torch.autograd.Function):
    """Rows of x placed at rows `dest` of a zero (rows, D) matrix; the backward gathers them back."""

    @staticmethod
    def forward(ctx, x, dest, rows: int):
        ctx.save_for_backward(dest)
        return x.new_zeros(rows, x.shape[1]).index_copy_(0, dest, x)

    @staticmethod
    def backward(ctx, grad):
        (dest,) = ctx.saved_tensors
        return grad.index_select(0, dest), None, None


class TakeRows(torch.autograd.Function):
    """x[dest], the inverse of PadRows: the backward places the gradient rows back without accumulating."""

    @staticmethod
    def forward(ctx, x, dest):
        ctx.save_for_backward(dest)
        ctx.rows = x.shape[0]
        return x.index_select(0, dest)

    @staticmethod
    def backward(ctx, grad):
        (dest,) = ctx.saved_tensors
        return grad.new_zeros(ctx.rows, grad.shape[1]).index_copy_(0, dest, grad), None


GROUP_ROWS = 64  # in bf16 every expert's rows are padded to a multiple of this


def combine(weights: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """sum_k g_k * y_k: weights (N, K), y (N, K, D) -> (N, D) in y's dtype (the sum accumulates in fp32).
    Products and a sum: a batched (1, K) x (K, D) matmul per token is a slow GEMM shape."""
    return (y * weights.unsqueeze(-1).to(y.dtype)).sum(1)


class Experts(nn.Module):
    """E SwiGLU experts stored stacked; the checkpoint splits them into `experts.{e}.*_proj`."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        E, D, I = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(E, 2 * I, D))  # gate rows then up rows
        self.down_proj = nn.Parameter(torch.empty(E, D, I))

    def forward(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, counts: list[int]):
        """x (N, D) -> (N, D). Token slots are sorted by expert so each expert multiplies only its own
        tokens: one GEMM per expert; in bf16 on a CPU each expert's rows padded with zeros to a multiple
        of GROUP_ROWS (`grouped`). Without autograd, the slots are gathered from x and summed back per
        token directly, with no K-fold copy of x."""
        N, K = indices.shape
        D = x.shape[-1]
        dtype = compute_dtype(x)
        order = indices.flatten().argsort(stable=True)  # (N*K,) slots sorted by expert
        if dtype in (torch.bfloat16, torch.float16) and x.device.type == "cpu" and fp8.active() is None:
            y = self.grouped(x.to(dtype).unsqueeze(1).expand(N, K, D).reshape(N * K, D), order, counts)
        elif not torch.is_grad_enabled() and x.device.type == "cpu":
            # inference (prefill, scoring): gather each sorted slot's token straight from x and add the
            # weighted outputs back per token. Training goes through slot order instead, because the
            # backward of this gather and of index_add would be accumulating scatters (PermuteRows);
            # a GPU too, whose index_add adds with atomics, in no fixed order.
            tokens = order // K
            segments = x.to(dtype).index_select(0, tokens).split(counts)
            gate_up, down = self.gate_up_proj.unbind(0), self.down_proj.unbind(0)
            outs = [expert_ffn(seg, w13, w2) for seg, w13, w2 in zip(segments, gate_up, down) if seg.shape[0]]
            y = torch.cat(outs) * weights.flatten()[order].unsqueeze(1).to(dtype)
            out = torch.zeros(N, D, dtype=torch.float32, device=x.device)
            return out.index_add_(0, tokens, y.float()).to(x.dtype)
        else:
            # cast before copying K times: fewer elements to convert under autocast
            slots = x.to(dtype).unsqueeze(1).expand(N, K, D).reshape(N * K, D)
            inverse = torch.empty_like(order)
            inverse[order] = torch.arange(N * K, device=x.device)
            # split and unbind once: slicing per expert would make backward fill a full-size zero
            # gradient for every expert
            segments = PermuteRows.apply(slots, order, inverse).split(counts)  # E tensors (n_e, D)
            gate_up, down = self.gate_up_proj.unbind(0), self.down_proj.unbind(0)
            outs = [expert_ffn(seg, w13, w2) for seg, w13, w2 in zip(segments, gate_up, down) if seg.shape[0]]
            y = PermuteRows.apply(torch.cat(outs), inverse, order)  # back in slot order
        return combine(weights, y.view(N, K, D)).to(x.dtype)

    def grouped(self, slots: torch.Tensor, order: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """Every expert's SwiGLU on its rows padded with zeros to a multiple of GROUP_ROWS; slot rows in,
        slot rows out (N*K, D). oneDNN's bf16 GEMMs build a kernel per new shape, which costs more than
        the product at these sizes, and the experts' row counts change every step: rounded up, the
        shapes recur. Each expert is padded alone, not all to the busiest one's rows: real routing is
        skewed enough that one (E, C, D) batch computed several times the real rows (docs/training.md)."""
        E = len(counts)
        padded = [-(-c // GROUP_ROWS) * GROUP_ROWS for c in counts]
        n = torch.tensor(counts, device=slots.device)
        p = torch.tensor(padded, device=slots.device)
        first = torch.cumsum(n, 0) - n  # each expert's first row among the sorted slots
        sorted_expert = torch.repeat_interleave(torch.arange(E, device=slots.device), n)
        rank = torch.arange(order.numel(), device=slots.device) - first[sorted_expert]
        dest = torch.empty_like(order)
        dest[order] = (torch.cumsum(p, 0) - p)[sorted_expert] + rank  # slot -> its row in the stack
        segments = PadRows.apply(slots, dest, sum(padded)).split(padded)
        gate_up = self.gate_up_proj.to(slots.dtype).unbind(0)  # one cast per step, not per expert
        down = self.down_proj.to(slots.dtype).unbind(0)
        outs = [expert_ffn(seg, w13, w2) for seg, w13, w2 in zip(segments, gate_up, down) if seg.shape[0]]
        return TakeRows.apply(torch.cat(outs), dest)


class RouterStats:
    """Per-forward routing facts: counts (E,) of tokens per expert, and the sequence-wise balance
    loss sum_i f_i P_i averaged over sequences, computed only when read (inference never does)."""

    def __init__(self, moe: "MoE", counts: torch.Tensor, scores: torch.Tensor, indices: torch.Tensor):
        self.counts = counts
        self._moe, self._scores, self._indices = moe, scores, indices

    @functools.cached_property
    def balance_loss(self) -> torch.Tensor:
        return self._moe.balance_loss(self._scores, self._indices)


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.gate = Gate(cfg)
        self.experts = Experts(cfg)
        self.shared_experts = (MLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts)
                               if cfg.n_shared_experts > 0 else None)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, RouterStats]:
        """x (B, T, D) -> output (B, T, D) and the router's statistics. (The engine's inference paths
        over few tokens are in engine/decode.py.)"""
        B, T, D = x.shape
        flat = x.reshape(B * T, D)
        weights, indices, scores = self.gate(flat)
        counts = torch.bincount(indices.flatten(), minlength=self.cfg.n_routed_experts)
        y = self.experts(flat, weights, indices, counts.tolist()).view(B, T, D)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)
        return y, RouterStats(self, counts, scores.view(B, T, -1), indices.view(B, T, -1))

    def balance_loss(self, scores: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """V3 eq. 17-20: f_i = E/(K T) * #tokens of the sequence routed to i; P_i = mean_t s'_{i,t}."""
        B, T, E = scores.shape
        K = indices.shape[-1]
        load = torch.zeros(B, E, device=scores.device).scatter_add_(
            1, indices.reshape(B, T * K), torch.ones(B, T * K, device=scores.device))
        f = load * E / (K * T)
        p = (scores / scores.sum(-1, keepdim=True)).mean(1)  # (B, E)
        return (f * p).sum(-1).mean()


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.compiled_attend = None  # `attend` through torch.compile, once `compile_dense` has run
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = MLA(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MoE(cfg) if cfg.is_moe_layer(layer_idx) else MLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, h, cos, sin, cache=None, mask=None, absorb=False):
        if cache is None and mask is None and not absorb:
            h, x = (self.compiled_attend or Block.attend)(self, h, cos, sin)
        else:
            h = h + self.self_attn(self.input_layernorm(h), cos, sin, cache, self.layer_idx, mask, absorb)
            x = self.post_attention_layernorm(h)
        out = self.mlp(x)
        if isinstance(out, tuple):
            out, stats = out
            return h + out, stats
        return h + out, None

    def attend(self, h, cos, sin):
        """The block's dense part without a cache (training, scoring): attention, residual, then the
        MoE's input norm. `compile_dense` compiles it; the MoE stays eager, as its row counts vary."""
        h = h + self.self_attn(self.input_layernorm(h), cos, sin)
        return h, self.post_attention_layernorm(h)


def compile_dense(model: nn.Module) -> None:
    """Compile every block's dense part (`Block.attend`, main and MTP blocks) with torch.compile, static
    shapes: one graph per (shape, grad mode), shared by the blocks, which pass themselves in (so a copy
    of the model runs its own weights). Training speed-ups: docs/benchmarks.md."""
    attend = torch.compile(Block.attend, dynamic=False)
    for block in (m for m in model.modules() if isinstance(m, Block)):
        block.compiled_attend = attend


class SharedHead(nn.Module):
    """The MTP module's final norm; its output projection is the main model's lm_head."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class MTP(nn.Module):
    """Multi-token prediction module k (V3 §2.2): h' = eh_proj[enorm(Emb(t_{i+k})); hnorm(h^{k-1}_i)].

    The embedding comes first in the concatenation, as in DeepSeek-V3's released weights.
    """

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.enorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.eh_proj = Linear(2 * cfg.hidden_size, cfg.hidden_size)
        self.block = Block(cfg, layer_idx)
        self.shared_head = SharedHead(cfg)

    def forward(self, h_prev, emb, cos, sin, cache=None, mask=None, absorb=False):
        h = self.eh_proj(torch.cat((self.enorm(emb), self.hnorm(h_prev)), -1))
        return self.block(h, cos, sin, cache, mask, absorb)


# ---------------------------------------------------------------------------------------------


class LinearCrossEntropy(torch.autograd.Function):
    """mean CE of (h @ W^T) against targets, without ever holding the (N, vocab) logits.

    Rows are processed in chunks; each chunk's softmax gradient is turned into grad_h and
    grad_W at once (the logits never leave cache). Same result as
    F.cross_entropy(h @ W^T, targets, ignore_index=-100), faster (docs/benchmarks.md), and with
    vocab/hidden times less activation memory.
    """

    @staticmethod
    def forward(ctx, h, weight, targets, chunk: int, dtype: torch.dtype):
        valid = targets != -100
        n = valid.sum().clamp(min=1)
        w = weight.to(dtype)
        grad_h = torch.empty_like(h)
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=h.device)
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        for s in range(0, h.shape[0], chunk):
            hc, tc, vc = h[s:s + chunk].to(dtype), targets[s:s + chunk].clamp(min=0), valid[s:s + chunk]
            logp = (hc @ w.T).float().log_softmax(-1)  # (chunk, V)
            total -= (logp.gather(1, tc[:, None]).squeeze(1) * vc).sum()
            grad = logp.exp_()  # softmax, in place
            grad[torch.arange(len(tc), device=h.device), tc] -= 1.0
            grad = grad.mul_((vc / n)[:, None]).to(dtype)
            grad_h[s:s + chunk] = grad @ w
            grad_w += (grad.T @ hc).float()
        ctx.save_for_backward(grad_h, grad_w.to(weight.dtype))
        return total / n

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * grad_out, grad_w * grad_out, None, None, None


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         chunk: int = 1024) -> torch.Tensor:
    """h (..., D), weight (V, D), targets (...) with -100 ignored -> mean cross-entropy."""
    return LinearCrossEntropy.apply(h.reshape(-1, h.shape[-1]), weight, targets.reshape(-1), chunk,
                                    compute_dtype(h))


@dataclass
class LossOutput:
    loss: torch.Tensor  # what to backpropagate: lm + mtp_weight * mtp + balance_weight * balance
    lm_loss: torch.Tensor
    mtp_loss: torch.Tensor  # (1/D) sum_k CE_k, unweighted; 0 without MTP or with mtp_weight=0
    balance_loss: torch.Tensor  # summed over MoE layers, unweighted
    expert_counts: torch.Tensor  # (MoE layers, E) tokens per expert, in `moe_gates` order (zeros: MTP not run)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        L = cfg.num_hidden_layers
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(L))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mtp = nn.ModuleList(MTP(cfg, L + k) for k in range(cfg.num_nextn_predict_layers))
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        inv_freq, self.rope_magnitude = rope_frequencies(cfg)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        std = self.cfg.initializer_range
        for name, p in self.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name or name.endswith("enorm.weight") \
                    or name.endswith("hnorm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, std)
        for m in self.modules():
            if isinstance(m, Gate) and m.e_score_correction_bias is not None:
                m.e_score_correction_bias.zero_()

    def rope(self, positions: torch.Tensor, dtype: torch.dtype):
        """cos, sin (B or 1, T, R/2) for integer positions (T,) or (B, T)."""
        if positions.dim() == 1:
            positions = positions[None]
        angles = positions.float()[..., None] * self.inv_freq
        return (angles.cos() * self.rope_magnitude).to(dtype), (angles.sin() * self.rope_magnitude).to(dtype)

    def rope_from(self, start_pos: int | torch.Tensor, T: int, dtype: torch.dtype):
        """`rope` for T consecutive positions from start_pos: one int for the batch, or a (B,) tensor per
        sequence."""
        device = self.inv_freq.device
        if isinstance(start_pos, torch.Tensor):
            return self.rope(start_pos.to(device)[:, None] + torch.arange(T, device=device), dtype)  # (B, T)
        return self.rope(torch.arange(start_pos, start_pos + T, device=device), dtype)

    def trunk(self, input_ids, start_pos: int | torch.Tensor = 0, cache=None, mask=None, absorb=False):
        """Embed and run the main layers; returns the final-normed hidden (B, T, D) and router stats.

        start_pos: the position of input_ids[:, 0], one int for the batch or a (B,) tensor per
        sequence (e.g. negative by the padding of left-padded prompts). mask: (B, 1, T, S) bool,
        True where a query may attend a key; None means causal with queries at the end of the keys.
        """
        h = self.embed_tokens(input_ids)
        cos, sin = self.rope_from(start_pos, input_ids.shape[1], h.dtype)
        stats = []
        for layer in self.layers:
            h, s = layer(h, cos, sin, cache, mask, absorb)
            if s is not None:
                stats.append(s)
        return self.norm(h), stats

    def moe_gates(self) -> list[Gate]:
        """Every MoE layer's gate: the main layers' in order, then the MTP modules'."""
        blocks = [*self.layers, *(m.block for m in self.mtp)]
        return [b.mlp.gate for b in blocks if isinstance(b.mlp, MoE)]

    def forward(self, input_ids: torch.Tensor, start_pos: int | torch.Tensor = 0, cache=None, mask=None,
                absorb: bool = False) -> torch.Tensor:
        """Logits (B, T, vocab). With a cache, `input_ids` continue the cached context at `start_pos`."""
        h, _ = self.trunk(input_ids, start_pos, cache, mask, absorb)
        return self.lm_head(h)

    def loss(self, input_ids: torch.Tensor, targets: torch.Tensor, mtp_weight: float = 0.3,
             balance_weight: float = 1e-4) -> LossOutput:
        """Next-token CE + mtp_weight * MTP CE + balance_weight * sequence-wise balance loss.

        targets (B, T) are the next tokens (input_ids shifted left by one); -100 is ignored.
        MTP depth k at position i sees Emb(t_{i+k}) and predicts t_{i+k+1}, i.e. targets[i+k].
        """
        T = input_ids.shape[1]
        h, stats = self.trunk(input_ids)
        lm_loss = linear_cross_entropy(h, self.lm_head.weight, targets)
        mtp_losses, mtp_stats, h_prev = [], [], h
        for k, mtp in enumerate(self.mtp, start=1):
            if T - k < 1 or mtp_weight == 0:
                break
            h_prev = h_prev[:, : T - k]
            cos, sin = self.rope(torch.arange(T - k, device=h.device), h.dtype)
            emb = self.embed_tokens(input_ids[:, k:])  # Emb(t_{i+k})
            h_prev, s = mtp(h_prev, emb, cos, sin)
            mtp_stats.append(s)
            mtp_losses.append(linear_cross_entropy(mtp.shared_head.norm(h_prev), self.lm_head.weight,
                                                   targets[:, k:]))
        zero = lm_loss.new_zeros(())
        mtp_loss = torch.stack(mtp_losses).mean() if mtp_losses else zero
        # the balance loss covers the main layers; every gate's bias is balanced, the MTP modules' too,
        # from the counts (`moe_gates` order)
        balance = torch.stack([s.balance_loss for s in stats]).sum() if stats else zero
        ran = stats + [s for s in mtp_stats if s is not None]
        E, layers = self.cfg.n_routed_experts, len(self.moe_gates())
        skipped = [torch.zeros(E, dtype=torch.long, device=h.device)] * (layers - len(ran))
        counts = torch.stack([s.counts for s in ran] + skipped) if layers else torch.zeros(0, E, dtype=torch.long)
        total = lm_loss + mtp_weight * mtp_loss + balance_weight * balance
        return LossOutput(total, lm_loss, mtp_loss, balance, counts)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


class LatentCache:
    """The simplest MLA cache: contiguous (B, S_max, C) latents and (B, S_max, R) rope keys per layer.

    All sequences share one length. The engine's paged cache follows the same `update` contract.
    """

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int, dtype=torch.float32, device=None):
        n = cfg.num_hidden_layers + cfg.num_nextn_predict_layers
        self.c_kv = torch.zeros(n, batch_size, max_len, cfg.kv_lora_rank, dtype=dtype, device=device)
        self.k_pe = torch.zeros(n, batch_size, max_len, cfg.qk_rope_head_dim, dtype=dtype, device=device)
        self.lengths = [0] * n

    def update(self, layer_idx: int, c_kv: torch.Tensor, k_pe: torch.Tensor):
        start, T = self.lengths[layer_idx], c_kv.shape[1]
        if start + T > self.c_kv.shape[2]:
            raise ValueError(f"LatentCache full: {start} + {T} tokens exceed max_len={self.c_kv.shape[2]}")
        self.c_kv[layer_idx, :, start:start + T] = c_kv
        self.k_pe[layer_idx, :, start:start + T] = k_pe
        self.lengths[layer_idx] = start + T
        return self.c_kv[layer_idx, :, : start + T], self.k_pe[layer_idx, :, : start + T]

    def bytes_per_token(self) -> int:
        n = self.c_kv.shape[0]
        return n * (self.c_kv.shape[-1] + self.k_pe.shape[-1]) * self.c_kv.element_size()
