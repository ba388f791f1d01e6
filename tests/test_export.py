"""GGUF export: what llama.cpp reads back equals the model, read with the format's own reader."""

import json

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from nanoseek import Transformer, preset, save_model  # noqa: E402
from nanoseek.checkpoint import to_hf_state_dict  # noqa: E402
from nanoseek.cli import main  # noqa: E402
from nanoseek.tokenizer import Tokenizer  # noqa: E402

TEXT = ["The 3 cats sat on 12 mats; 1234 + 987 = 2221.\n  Indented  twice\t\ttabs.", "東京タワー 🙂🙂 naïve café",
        "x=  42 , y='s ll 've", "sort 9 1 4: 1 4 9\n\n\n", "    "]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A q-LoRA, grouped-routing V3 model with a trained tokenizer, and the weights perturbed off the init."""
    tok = Tokenizer.train(TEXT * 40, vocab_size=400)
    torch.manual_seed(0)
    model = Transformer(preset("tiny", vocab_size=400, q_lora_rank=32, n_routed_experts=8, n_group=4,
                               topk_group=2)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        for m in model.modules():
            if getattr(m, "e_score_correction_bias", None) is not None:
                m.e_score_correction_bias.normal_(0, 0.1)
    d = tmp_path_factory.mktemp("export") / "m"
    save_model(model, d, extra_files=tok.files())
    return d, model, tok


def _field(reader, key):
    return reader.fields[key].contents()


def test_f32_gguf_holds_the_model_exactly(trained, tmp_path):
    d, model, tok = trained
    assert main(["export", "--model", str(d), "--gguf", str(tmp_path / "m.gguf"), "--dtype", "f32", "--quiet"]) == 0
    r = gguf.GGUFReader(tmp_path / "m.gguf")
    cfg = model.cfg
    want = {"general.architecture": "deepseek2", "deepseek2.block_count": cfg.num_hidden_layers,
            "deepseek2.embedding_length": cfg.hidden_size, "deepseek2.attention.head_count": cfg.num_attention_heads,
            "deepseek2.attention.head_count_kv": 1, "deepseek2.attention.q_lora_rank": 32,
            "deepseek2.attention.kv_lora_rank": cfg.kv_lora_rank,
            "deepseek2.attention.key_length_mla": cfg.qk_nope_head_dim + cfg.qk_rope_head_dim,
            "deepseek2.attention.value_length_mla": cfg.v_head_dim,
            "deepseek2.rope.dimension_count": cfg.qk_rope_head_dim, "deepseek2.expert_count": 8,
            "deepseek2.expert_used_count": cfg.num_experts_per_tok, "deepseek2.expert_shared_count": 1,
            "deepseek2.expert_feed_forward_length": cfg.moe_intermediate_size,
            "deepseek2.leading_dense_block_count": 1, "deepseek2.expert_gating_func": 2,
            "deepseek2.expert_weights_norm": True, "deepseek2.expert_group_count": 4,
            "deepseek2.expert_group_used_count": 2, "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "smollm",
            "tokenizer.ggml.bos_token_id": tok.bos_id, "tokenizer.ggml.eos_token_id": tok.eos_id}
    assert {k: _field(r, k) for k in want} == want
    assert _field(r, "deepseek2.expert_weights_scale") == pytest.approx(cfg.routed_scaling_factor)
    assert "deepseek2.rope.scaling.type" not in r.fields  # plain RoPE
    vocab = json.loads(tok.tk.to_str())["model"]
    n = tok.vocab_size  # the model's rows past the tokenizer's vocabulary are named, unused tokens
    assert n < 400 and _field(r, "tokenizer.ggml.tokens") == [tok.tk.id_to_token(i) for i in range(n)] + [
        f"[PAD{i}]" for i in range(n, 400)]
    assert _field(r, "tokenizer.ggml.merges") == [m if isinstance(m, str) else " ".join(m) for m in vocab["merges"]]
    types = _field(r, "tokenizer.ggml.token_type")
    assert types == [3] * 9 + [1] * (n - 9) + [5] * (400 - n)  # control, normal, unused
    assert _field(r, "tokenizer.chat_template") == tok.chat_template

    tensors = {t.name: np.array(t.data) for t in r.tensors}
    hf = {k: v.numpy() for k, v in to_hf_state_dict(model).items()}
    H, nope, v = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.v_head_dim
    for i in range(cfg.num_hidden_layers):  # MLA's up-projection, split per head for the absorbed decode
        k_b, v_b = tensors.pop(f"blk.{i}.attn_k_b.weight"), tensors.pop(f"blk.{i}.attn_v_b.weight")
        kv_b = np.concatenate([k_b.transpose(0, 2, 1), v_b], axis=1).reshape(H * (nope + v), cfg.kv_lora_rank)
        assert np.array_equal(kv_b, hf.pop(f"model.layers.{i}.self_attn.kv_b_proj.weight"))
        if i >= cfg.first_k_dense_replace:
            for proj in ("gate", "up", "down"):
                stacked = tensors.pop(f"blk.{i}.ffn_{proj}_exps.weight")
                for e in range(cfg.n_routed_experts):
                    assert np.array_equal(stacked[e], hf.pop(f"model.layers.{i}.mlp.experts.{e}.{proj}_proj.weight"))
    mtp = [k for k in hf if k.startswith(f"model.layers.{cfg.num_hidden_layers}.")]
    assert mtp and all(hf.pop(k) is not None for k in mtp)  # the MTP module is left out
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    from nanoseek.export import _LAYER_NAMES
    for i in range(cfg.num_hidden_layers):
        names.update({f"model.layers.{i}.{k}": f"blk.{i}.{ours}" for k, ours in _LAYER_NAMES.items()})
    assert sorted(names[k] for k in hf) == sorted(tensors)
    for k, t in hf.items():
        assert tensors[names[k]].dtype == np.float32 and np.array_equal(tensors[names[k]], t), k


def test_f16_and_q8_0_are_the_weights_rounded(trained, tmp_path):
    d, model, _ = trained
    hf = to_hf_state_dict(model)
    for dtype in ("f16", "q8_0"):
        assert main(["export", "--model", str(d), "--gguf", str(tmp_path / f"{dtype}.gguf"), "--dtype", dtype,
                     "--quiet"]) == 0
        t = {t.name: t for t in gguf.GGUFReader(tmp_path / f"{dtype}.gguf").tensors}
        norm = t["blk.0.attn_norm.weight"]
        assert norm.tensor_type == gguf.GGMLQuantizationType.F32  # norms and the router stay f32
        assert t["blk.1.ffn_gate_inp.weight"].tensor_type == gguf.GGMLQuantizationType.F32
        q = t["blk.0.attn_q_a.weight"]
        w = hf["model.layers.0.self_attn.q_a_proj.weight"].numpy()
        got = gguf.quants.dequantize(q.data, q.tensor_type).reshape(w.shape)
        if dtype == "f16":
            assert q.tensor_type == gguf.GGMLQuantizationType.F16 and np.array_equal(got, w.astype(np.float16))
        else:
            assert q.tensor_type == gguf.GGMLQuantizationType.Q8_0
            block_max = np.abs(w.reshape(-1, 32)).max(1, keepdims=True)
            # half a step of the block's scale, plus that f16 scale's own rounding over up to 127 steps
            assert (np.abs(got - w).reshape(-1, 32) <= block_max * (0.5 / 127 + 2 ** -10)).all()
            # k_b's rows are qk_nope_head_dim (16) wide: not a Q8_0 block, so f16 as llama.cpp's converter does
            assert t["blk.0.attn_k_b.weight"].tensor_type == gguf.GGMLQuantizationType.F16


def _reference_pieces(text: str) -> list[str]:
    """llama.cpp's `smollm` pre-tokenizer: its two regexes, each splitting the pieces of the one before,
    what a regex does not match kept as pieces too."""
    import regex

    pieces = [text]
    for pattern in (r"\p{N}", r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"):
        out = []
        for p in pieces:
            at = 0
            for m in regex.finditer(pattern, p):
                out += [p[at:m.start()]] if m.start() > at else []
                out.append(m.group())
                at = m.end()
            out += [p[at:]] if at < len(p) else []
        pieces = out
    return pieces


@pytest.mark.parametrize("text", TEXT + ["", "a1b22c333", " 42", "it's 'S 'LL", "\u3000全角 ２３", "🙂x 🙂 \n🙂",
                                         "tab\tthen  two\n\n  spaces ", "ℕ½ ⅷ 3.14e-5", "\r\n\r\n end"])
def test_our_pre_tokenizer_is_llama_cpp_s_smollm(text):
    tok = Tokenizer.byte_level()
    pieces = [text[a:b] for _, (a, b) in tok.tk.pre_tokenizer.pre_tokenize_str(text)]
    assert pieces == _reference_pieces(text)


def test_a_pre_tokenizer_llama_cpp_lacks_is_refused(tmp_path):
    from tokenizers import Regex, pre_tokenizers

    torch.manual_seed(0)
    tok = Tokenizer.byte_level()
    tok.tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(r"\p{N}{1,3}"), "isolated"),
                                                    pre_tokenizers.ByteLevel(add_prefix_space=False)])
    save_model(Transformer(preset("tiny")), tmp_path / "m", extra_files=tok.files())
    assert main(["export", "--model", str(tmp_path / "m"), "--gguf", str(tmp_path / "m.gguf"), "--quiet"]) == 2
    assert not (tmp_path / "m.gguf").exists()


def test_routing_is_written_as_llama_cpp_reads_it(tmp_path, capsys):
    """Greedy (V2) routing ignores groups, so no group limit is written; V2's group-limited routing scores a group
    by its best expert, which llama.cpp cannot do, and a 26-layer model with a query LoRA llama.cpp would read
    as having none: both refused."""
    torch.manual_seed(0)
    v2 = dict(scoring_func="softmax", norm_topk_prob=False, n_routed_experts=8, n_group=4, topk_group=2)
    files = Tokenizer.byte_level().files()
    save_model(Transformer(preset("tiny", topk_method="greedy", **v2)), tmp_path / "greedy", extra_files=files)
    assert main(["export", "--model", str(tmp_path / "greedy"), "--gguf", str(tmp_path / "g.gguf"), "--quiet"]) == 0
    r = gguf.GGUFReader(tmp_path / "g.gguf")
    assert _field(r, "deepseek2.expert_gating_func") == 1 and "deepseek2.expert_group_count" not in r.fields
    assert "blk.1.exp_probs_b.bias" not in {t.name for t in r.tensors}  # V2 has no balancing bias
    save_model(Transformer(preset("tiny", topk_method="group_limited_greedy", **v2)), tmp_path / "limited",
               extra_files=files)
    save_model(Transformer(preset("tiny", num_hidden_layers=26, q_lora_rank=16, num_nextn_predict_layers=0)),
               tmp_path / "lite", extra_files=files)
    for name, why in (("limited", "best expert"), ("lite", "query LoRA")):
        assert main(["export", "--model", str(tmp_path / name), "--gguf", str(tmp_path / "x.gguf"), "--quiet"]) == 2
        assert why in capsys.readouterr().err
