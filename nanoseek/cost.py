"""What a DeepSeek-style config costs: parameters, activated parameters, KV cache, FLOPs.

Pure arithmetic on a ModelConfig -- nothing is instantiated, so it works for DeepSeek-V3 itself:
`nanoseek cost --preset deepseek-v3` gives 671B total / 37B activated parameters and 576 cached
elements per token per layer; with `dollars`, what a training run and serving cost in GPU-hours and
dollars at a stated throughput and price. The MHA baseline caches full keys and values for every head,
2 * heads * head_dim with head_dim = qk_nope_head_dim (the paper's d_h); GQA-8 keeps 8 KV heads.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .config import ModelConfig

DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4, "fp8": 1}


@dataclass
class Cost:
    params_total: int  # main model, embeddings and head included, MTP excluded (as DeepSeek reports)
    params_activated: int  # per token: shared + top-K routed experts instead of all experts
    params_mtp: int  # the MTP modules on top (embedding and head are shared, not counted again)
    kv_elements_per_token_per_layer: int
    kv_bytes_per_token: int  # MLA latent cache, all main layers
    kv_bytes_per_token_mha: int
    kv_bytes_per_token_gqa8: int
    kv_bytes_128k: int  # one 131072-token context with MLA
    kv_bytes_128k_mha: int
    flops_per_token_forward: int  # at `seq_len` tokens of causal context
    flops_per_token_train: int  # forward + backward = 3x forward
    flops_per_token_train_mtp: int  # the MTP modules' share on top, when trained with them
    seq_len: int
    dtype: str

    def as_dict(self) -> dict:
        return asdict(self)


def _attention_params(c: ModelConfig) -> int:
    D, H = c.hidden_size, c.num_attention_heads
    if c.q_lora_rank is None:
        q = D * H * c.qk_head_dim
    else:
        q = D * c.q_lora_rank + c.q_lora_rank + c.q_lora_rank * H * c.qk_head_dim
    kv = D * c.kv_cache_dim + c.kv_lora_rank + c.kv_lora_rank * H * (c.qk_nope_head_dim + c.v_head_dim)
    return q + kv + H * c.v_head_dim * D


def _layer_params(c: ModelConfig, layer_idx: int) -> tuple[int, int]:
    """(total, activated) parameters of one block."""
    D = c.hidden_size
    fixed = _attention_params(c) + 2 * D  # attention + the two norms
    if not c.is_moe_layer(layer_idx):
        dense = 3 * D * c.intermediate_size
        return fixed + dense, fixed + dense
    expert = 3 * D * c.moe_intermediate_size
    shared = c.n_shared_experts * expert + c.n_routed_experts * D  # shared experts + router
    return (fixed + shared + c.n_routed_experts * expert,
            fixed + shared + c.num_experts_per_tok * expert)


def estimate(c: ModelConfig, seq_len: int = 4096, dtype: str = "bf16") -> Cost:
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPE_BYTES)} (got {dtype!r})")
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1 (got {seq_len})")
    D, V, L, H = c.hidden_size, c.vocab_size, c.num_hidden_layers, c.num_attention_heads
    head = 0 if c.tie_word_embeddings else V * D
    total = activated = V * D + head + D  # embedding, head, final norm
    for i in range(L):
        t, a = _layer_params(c, i)
        total, activated = total + t, activated + a
    mtp = sum(_layer_params(c, L + k)[0] + 2 * D + 2 * D * D + D for k in range(c.num_nextn_predict_layers))
    # each MTP module runs a block, its projection and the shared head once more per token
    mtp_activated = sum(_layer_params(c, L + k)[1] + 2 * D * D + V * D for k in range(c.num_nextn_predict_layers))

    nbytes = DTYPE_BYTES[dtype]
    kv_mla = L * c.kv_cache_dim * nbytes
    kv_mha = L * 2 * H * c.qk_nope_head_dim * nbytes
    kv_gqa = L * 2 * min(8, H) * c.qk_nope_head_dim * nbytes

    # matmul FLOPs: 2 per activated weight (the embedding lookup is not a matmul), plus attention
    # scores and weighted values over the causal context (mean (seq_len + 1) / 2 keys per query)
    matmul = 2 * (activated - V * D)
    ctx = (seq_len + 1) / 2
    attention = L * 2 * H * (c.qk_head_dim + c.v_head_dim) * ctx
    forward = int(matmul + attention)
    mtp_forward = int(2 * mtp_activated + attention / L * c.num_nextn_predict_layers)
    return Cost(total, activated, mtp, c.kv_cache_dim, kv_mla, kv_mha, kv_gqa, kv_mla * 131072,
                kv_mha * 131072, forward, 3 * forward, 3 * mtp_forward, seq_len, dtype)


# ---- what training and serving cost in GPU-hours and dollars ----------------------------------------
# The defaults are DeepSeek-V3's own: 14.8T training tokens on H800s at $2 per GPU-hour, 119K + 5K
# GPU-hours for context extension and post-training (V3 §1, Table 1); the H800's dense bf16 peak,
# 989 TFLOP/s; and the V2 paper's generation throughput, over 50K tokens/s on one node of 8 H800s.
# The MFU is an assumption: V3's 180K GPU-hours per trillion tokens imply about 40% under this FLOP count.


@dataclass
class Budget:
    train_tokens: float
    peak_tflops: float  # per GPU
    mfu: float
    gpu_hour_usd: float
    extra_gpu_hours: float  # beside pretraining: context extension, post-training
    decode_tokens_per_s: float  # per serving node
    node_gpus: int
    usd_to_rmb: float


V3_BUDGET = Budget(train_tokens=14.8e12, peak_tflops=989.0, mfu=0.40, gpu_hour_usd=2.0, extra_gpu_hours=124e3,
                   decode_tokens_per_s=50e3, node_gpus=8, usd_to_rmb=7.2)


def dollars(cost: Cost, b: Budget) -> dict[str, float]:
    """GPU-hours and dollars of pretraining `cost`'s model on b.train_tokens (MTP included) and of serving it."""
    flops = cost.flops_per_token_train + cost.flops_per_token_train_mtp
    per_gpu = b.peak_tflops * 1e12 * b.mfu
    hours_per_t = flops * 1e12 / per_gpu / 3600
    pretrain_hours = hours_per_t * b.train_tokens / 1e12
    serve_usd = b.node_gpus * b.gpu_hour_usd / (b.decode_tokens_per_s * 3600) * 1e6
    return {"train_flops_per_token": flops, "gpu_hours_per_trillion_tokens": hours_per_t,
            "pretrain_gpu_hours": pretrain_hours, "pretrain_usd": pretrain_hours * b.gpu_hour_usd,
            "total_gpu_hours": pretrain_hours + b.extra_gpu_hours,
            "total_usd": (pretrain_hours + b.extra_gpu_hours) * b.gpu_hour_usd,
            "serve_usd_per_million_output_tokens": serve_usd,
            "serve_rmb_per_million_output_tokens": serve_usd * b.usd_to_rmb}


def format_dollars(d: dict[str, float], b: Budget, seq_len: int) -> str:
    rows = [
        ("training FLOPs / token (MTP incl.)", f"{_human(d['train_flops_per_token'], 'FLOP')} at {seq_len} ctx"),
        ("GPU-hours / trillion tokens", f"{d['gpu_hours_per_trillion_tokens'] / 1e3:,.1f}K at {b.peak_tflops:g} "
                                        f"TFLOP/s peak x {b.mfu:.0%} MFU"),
        (f"pretraining, {_human(b.train_tokens)} tokens", f"{d['pretrain_gpu_hours'] / 1e6:.3f}M GPU-hours, "
                                                          f"${d['pretrain_usd'] / 1e6:.3f}M at ${b.gpu_hour_usd:g}/h"),
        ("with other stages' GPU-hours", f"+{b.extra_gpu_hours / 1e3:,.0f}K = {d['total_gpu_hours'] / 1e6:.3f}M "
                                         f"GPU-hours, ${d['total_usd'] / 1e6:.3f}M"),
        ("serving, per million output tokens", f"${d['serve_usd_per_million_output_tokens']:.3f} "
                                               f"({d['serve_rmb_per_million_output_tokens']:.2f} RMB at {b.usd_to_rmb:g}) "
                                               f"at {b.decode_tokens_per_s:,.0f} tok/s per {b.node_gpus}-GPU node"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(["cost (every assumption beside its number; change them with the flags)"] +
                     [f"  {k:<{width}}  {v}" for k, v in rows])


def _human(n: float, unit: str = "") -> str:
    for div, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= div:
            return f"{n / div:.2f}{suffix}{unit}"
    return f"{n:.0f}{unit}"


def _bytes(n: float) -> str:
    for div, suffix in ((2**40, "TiB"), (2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if n >= div:
            return f"{n / div:.2f} {suffix}"
    return f"{n:.0f} B"


def format_cost(name: str, cost: Cost) -> str:
    c = cost
    rows = [
        ("parameters, total", _human(c.params_total)),
        ("parameters, activated per token", _human(c.params_activated)),
        ("parameters, MTP modules", _human(c.params_mtp)),
        ("KV elements / token / layer (MLA)", f"{c.kv_elements_per_token_per_layer}"),
        (f"KV cache / token, MLA ({c.dtype})", f"{c.kv_bytes_per_token:,} B ({_bytes(c.kv_bytes_per_token)})"),
        (f"KV cache / token, MHA ({c.dtype})",
         f"{c.kv_bytes_per_token_mha:,} B ({c.kv_bytes_per_token / c.kv_bytes_per_token_mha:.1%} of it with MLA)"),
        (f"KV cache / token, GQA-8 ({c.dtype})",
         f"{c.kv_bytes_per_token_gqa8:,} B ({c.kv_bytes_per_token / c.kv_bytes_per_token_gqa8:.1%} of it with MLA)"),
        ("KV cache, 128K-token context, MLA", _bytes(c.kv_bytes_128k)),
        ("KV cache, 128K-token context, MHA", _bytes(c.kv_bytes_128k_mha)),
        (f"FLOPs / token, forward @ {c.seq_len} ctx", _human(c.flops_per_token_forward, "FLOP")),
        (f"FLOPs / token, train @ {c.seq_len} ctx", _human(c.flops_per_token_train, "FLOP")),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join([f"{name}"] + [f"  {k:<{width}}  {v}" for k, v in rows])
