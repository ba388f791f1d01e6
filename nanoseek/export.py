"""`nanoseek export --gguf`: a model dir as one GGUF file for llama.cpp (and Ollama, LM Studio, ...).

    nanoseek export --model runs/x/final --gguf model.gguf [--dtype f32|f16|q8_0]

Written with `gguf`, the format's own Python library, under llama.cpp's `deepseek2` architecture
(DeepSeek-V2 and V3 alike). What llama.cpp's loader needs and the upstream converter does not
write for models like ours:

- `attention.q_lora_rank` is written as 0 when the model has no query LoRA (llama.cpp tells
  that case apart by layer count, not by a missing key, so the key must be there).
- `expert_gating_func` is written (sigmoid for V3): without it llama.cpp routes with softmax.
- MLA's `kv_b_proj` is split per head into `attn_k_b` (transposed) and `attn_v_b`, so llama.cpp
  decodes with the absorbed latent cache, as nanoseek's engine does.
- The tokenizer's pieces: nanoseek's pre-tokenizer (each digit isolated, then GPT-2's regex) is
  llama.cpp's `smollm` one exactly; a byte-level tokenizer with no merges gets one merge that can
  never apply, since llama.cpp refuses a BPE vocabulary without merges.

The MTP module is left out (llama.cpp's converter leaves it out too): llama.cpp decodes with the
main model only. Norms, the router and its bias stay f32 at every --dtype; with q8_0, a weight
whose rows are not a multiple of 32 wide is written f16, as llama.cpp's converter does.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from .checkpoint import load_model, to_hf_state_dict
from .config import ModelConfig
from .tokenizer import Tokenizer

DTYPES = ("f32", "f16", "q8_0")
ARCH = "deepseek2"

# HF pre-tokenizers (tokenizer.json) that llama.cpp implements, under the name llama.cpp gives them
_SPLIT_DIGITS = {"type": "Split", "pattern": {"Regex": "\\p{N}"}, "behavior": "Isolated", "invert": False}
_GPT2 = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
PRE_TOKENIZERS = {
    "smollm": {"type": "Sequence", "pretokenizers": [_SPLIT_DIGITS, _GPT2]},  # nanoseek's own
    "gpt-2": _GPT2,
}

# the llama.cpp names of an HF layer's tensors (per-expert ones are stacked separately)
_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.q_a_proj.weight": "attn_q_a.weight",
    "self_attn.q_a_layernorm.weight": "attn_q_a_norm.weight",
    "self_attn.q_b_proj.weight": "attn_q_b.weight",
    "self_attn.kv_a_proj_with_mqa.weight": "attn_kv_a_mqa.weight",
    "self_attn.kv_a_layernorm.weight": "attn_kv_a_norm.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
    "mlp.gate.weight": "ffn_gate_inp.weight",
    "mlp.gate.e_score_correction_bias": "exp_probs_b.bias",
    "mlp.shared_experts.gate_proj.weight": "ffn_gate_shexp.weight",
    "mlp.shared_experts.up_proj.weight": "ffn_up_shexp.weight",
    "mlp.shared_experts.down_proj.weight": "ffn_down_shexp.weight",
}
_F32_ALWAYS = ("_norm.weight", "ffn_gate_inp.weight", "exp_probs_b.bias")


class ExportError(ValueError):
    """A model dir that cannot be written as GGUF; the message says which part and why."""


def pre_tokenizer_name(tok: Tokenizer, d: dict) -> str:
    """llama.cpp's name for the tokenizer's pre-tokenizer (`d`: its tokenizer.json), or ExportError if llama.cpp
    has none like it."""
    model = d.get("model") or {}
    if model.get("type") != "BPE" or model.get("ignore_merges"):
        raise ExportError(f"{tok.source}: llama.cpp's gpt2 vocabulary needs a byte-level BPE tokenizer without "
                          f"ignore_merges (this one is {model.get('type')!r})")
    for name, spec in PRE_TOKENIZERS.items():
        if d.get("pre_tokenizer") == spec:
            return name
    raise ExportError(f"{tok.source}: its pre-tokenizer {json.dumps(d.get('pre_tokenizer'))[:200]} is not one "
                      f"llama.cpp implements exactly ({', '.join(PRE_TOKENIZERS)}), so llama.cpp would split text "
                      f"differently; train the tokenizer with `nanoseek tokenizer`, or use a GPT-2 byte-level one")


def _merges(tok: Tokenizer, d: dict) -> list[str]:
    merges = d["model"].get("merges") or []
    out = [m if isinstance(m, str) else " ".join(m) for m in merges]
    if not out:  # llama.cpp refuses a BPE vocabulary without merges: one between two special tokens never applies
        specials = sorted(tok.special_ids)[:2]
        if len(specials) < 2:
            raise ExportError(f"{tok.source}: a tokenizer without merges needs two special tokens for GGUF")
        out = [" ".join(tok.tk.id_to_token(i) for i in specials)]
    return out


def _vocab(tok: Tokenizer, vocab_size: int) -> tuple[list[str], list[int]]:
    """Token strings and llama.cpp token types for every row of the model's vocabulary."""
    from gguf import TokenType

    added = tok.tk.get_added_tokens_decoder()
    tokens, types = [], []
    for i in range(vocab_size):
        piece = tok.tk.id_to_token(i)
        if piece is None:  # rows past the tokenizer's vocabulary
            tokens.append(f"[PAD{i}]")
            types.append(int(TokenType.UNUSED))
        elif i in added:
            tokens.append(piece)
            types.append(int(TokenType.CONTROL if added[i].special else TokenType.USER_DEFINED))
        else:
            tokens.append(piece)
            types.append(int(TokenType.NORMAL))
    return tokens, types


def gguf_tensors(cfg: ModelConfig, hf: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """llama.cpp's tensors (fp32, numpy order: the reverse of ggml's) from an HF-named state dict."""
    L, H = cfg.num_hidden_layers, cfg.num_attention_heads
    nope, v = cfg.qk_nope_head_dim, cfg.v_head_dim
    out = {"token_embd.weight": hf["model.embed_tokens.weight"], "output_norm.weight": hf["model.norm.weight"]}
    if "lm_head.weight" in hf:  # tied embeddings: llama.cpp reuses token_embd
        out["output.weight"] = hf["lm_head.weight"]
    for i in range(L):
        p = f"model.layers.{i}."
        for name, ours in _LAYER_NAMES.items():
            if p + name in hf:
                out[f"blk.{i}.{ours}"] = hf[p + name]
        kv_b = hf[p + "self_attn.kv_b_proj.weight"].view(H, nope + v, cfg.kv_lora_rank)
        out[f"blk.{i}.attn_k_b.weight"] = kv_b[:, :nope].transpose(1, 2)  # (H, kv_lora, nope)
        out[f"blk.{i}.attn_v_b.weight"] = kv_b[:, nope:]  # (H, v, kv_lora)
        if i >= cfg.first_k_dense_replace:
            for proj in ("gate", "up", "down"):
                out[f"blk.{i}.ffn_{proj}_exps.weight"] = torch.stack(
                    [hf[f"{p}mlp.experts.{e}.{proj}_proj.weight"] for e in range(cfg.n_routed_experts)])
    return {k: t.detach().float().contiguous().numpy() for k, t in out.items()}


def _group_limited(cfg: ModelConfig) -> bool:
    return cfg.n_group > 1 and cfg.topk_group < cfg.n_group and cfg.topk_method != "greedy"


def _check(cfg: ModelConfig) -> None:
    if _group_limited(cfg) and cfg.topk_method == "group_limited_greedy":
        raise ExportError("DeepSeek-V2's group-limited routing (a group's score is its best expert) is not what "
                          "llama.cpp implements (a group's score is its best two, as in V3); such a model cannot "
                          "be exported for llama.cpp")
    if cfg.extra.get("rope_interleave") is False:
        raise ExportError("rope_interleave=false: llama.cpp rotates interleaved pairs, as DeepSeek's checkpoints "
                          "store them; such a model cannot be exported for llama.cpp")
    lite = cfg.num_hidden_layers in (26, 27) or (cfg.num_hidden_layers == 48 and cfg.vocab_size == 128256)
    if lite and cfg.q_lora_rank:
        raise ExportError(f"llama.cpp takes a deepseek2 model of {cfg.num_hidden_layers} layers to have no query "
                          f"LoRA (as DeepSeek-V2-Lite) and would not load this one's (q_lora_rank "
                          f"{cfg.q_lora_rank}); a model with another layer count exports")
    rs = cfg.rope_scaling or {}
    if rs and ((rs.get("beta_fast") or 32) != 32 or (rs.get("beta_slow") or 1) != 1
               or (rs.get("mscale") or 1) != (rs.get("mscale_all_dim") or 1)):
        raise ExportError("llama.cpp's deepseek2 YaRN takes beta_fast 32, beta_slow 1 and mscale equal to "
                          "mscale_all_dim; this rope_scaling differs, so llama.cpp would compute other positions")


def write_gguf(model_dir: str | os.PathLike, out: str | os.PathLike, dtype: str = "f32",
               progress: bool = False) -> dict:
    """Write the model dir as a GGUF file (atomically); returns a summary (tensors, bytes, dtype, pre-tokenizer)."""
    import gguf
    from gguf.quants import QuantError, quantize

    if dtype not in DTYPES:
        raise ExportError(f"--dtype must be one of {', '.join(DTYPES)} (got {dtype!r})")
    model = load_model(model_dir)
    cfg = model.cfg
    _check(cfg)
    tok = Tokenizer.load(model_dir)
    tok.check_fits(cfg.vocab_size)
    spec = json.loads(tok.tk.to_str())
    pre = pre_tokenizer_name(tok, spec)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    w = gguf.GGUFWriter(tmp, ARCH)
    w.add_name(Path(model_dir).resolve().name)
    w.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                     "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[dtype])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_vocab_size(cfg.vocab_size)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_leading_dense_block_count(cfg.first_k_dense_replace)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(1)  # MLA decodes as one shared latent "head"
    w.add_key_length(cfg.kv_lora_rank + cfg.qk_rope_head_dim)
    w.add_value_length(cfg.kv_lora_rank)
    w.add_key_length_mla(cfg.qk_nope_head_dim + cfg.qk_rope_head_dim)
    w.add_value_length_mla(cfg.v_head_dim)
    w.add_q_lora_rank(cfg.q_lora_rank or 0)
    w.add_kv_lora_rank(cfg.kv_lora_rank)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_dimension_count(cfg.qk_rope_head_dim)
    w.add_rope_freq_base(cfg.rope_theta)
    if cfg.rope_scaling:
        rs = cfg.rope_scaling
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(float(rs["factor"]))
        w.add_rope_scaling_orig_ctx_len(int(rs["original_max_position_embeddings"]))
        if rs.get("mscale_all_dim"):
            w.add_rope_scaling_yarn_log_mul(0.1 * float(rs["mscale_all_dim"]))
    w.add_expert_count(cfg.n_routed_experts)
    w.add_expert_used_count(cfg.num_experts_per_tok)
    w.add_expert_shared_count(cfg.n_shared_experts)
    w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
    w.add_expert_weights_scale(cfg.routed_scaling_factor)
    w.add_expert_weights_norm(bool(cfg.norm_topk_prob))
    w.add_expert_gating_func(gguf.ExpertGatingFuncType.SOFTMAX if cfg.scoring_func == "softmax"
                             else gguf.ExpertGatingFuncType.SIGMOID)
    if _group_limited(cfg):  # all groups chosen, or greedy routing, is no group limit at all
        w.add_expert_group_count(cfg.n_group)
        w.add_expert_group_used_count(cfg.topk_group)

    tokens, types = _vocab(tok, cfg.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(_merges(tok, spec))
    for add, token in ((w.add_bos_token_id, tok.bos_id), (w.add_eos_token_id, tok.eos_id),
                       (w.add_pad_token_id, tok.pad_id)):
        if token is not None:
            add(token)
    own = tok.config or {}  # nanoseek's prompts carry their begin token themselves; other tokenizers say
    w.add_add_bos_token(bool(not tok.native and own.get("add_bos_token")))
    w.add_add_eos_token(bool(not tok.native and own.get("add_eos_token")))
    if tok.chat_template:
        w.add_chat_template(tok.chat_template)

    tensors = gguf_tensors(cfg, to_hf_state_dict(model))
    del model
    for name, arr in tensors.items():
        if arr.ndim == 1 or name.endswith(_F32_ALWAYS) or dtype == "f32":
            w.add_tensor(name, arr)
        elif dtype == "q8_0":
            try:
                w.add_tensor(name, quantize(arr, gguf.GGMLQuantizationType.Q8_0),
                             raw_dtype=gguf.GGMLQuantizationType.Q8_0)
            except QuantError:  # rows not a multiple of 32 wide
                w.add_tensor(name, arr.astype(np.float16))
        else:
            w.add_tensor(name, arr.astype(np.float16))
    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file(progress=progress)
        w.close()
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return {"path": str(out), "tensors": len(tensors), "bytes": out.stat().st_size, "dtype": dtype,
            "pre_tokenizer": pre, "vocab": len(tokens), "mtp": "left out"}
