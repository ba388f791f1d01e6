"""What a DeepSeek-style config costs: parameters, activated parameters, KV cache, FLOPs.

Pure arithmetic on a ModelConfig -- nothing is instantiated, so it works for DeepSeek-V3 itself:
`nanoseek cost --preset deepseek-v3` gives 671B total / 37B activated parameters and 576 cached
elements per token per layer. The MHA baseline caches full keys and values for every head,
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
    return Cost(total, activated, mtp, c.kv_cache_dim, kv_mla, kv_mha, kv_gqa, kv_mla * 131072,
                kv_mha * 131072, forward, 3 * forward, seq_len, dtype)


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
