"""Parity with the reference: transformers' own DeepseekV3 / DeepseekV2 models on the same model dir."""

import pytest
import torch

transformers = pytest.importorskip("transformers")
from safetensors.torch import save_file  # noqa: E402

from nanoseek import Transformer, load_model, preset, save_model  # noqa: E402

transformers.logging.set_verbosity_error()
YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "beta_fast": 32,
        "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}

V3_CONFIGS = {
    "plain-q-shared1": dict(),
    "q-lora-groups": dict(q_lora_rank=24, n_routed_experts=16, n_group=4, topk_group=2, num_experts_per_tok=3),
    "no-dense-no-shared": dict(first_k_dense_replace=0, n_shared_experts=0, num_hidden_layers=3),
    "two-dense-shared2-yarn": dict(first_k_dense_replace=2, num_hidden_layers=3, n_shared_experts=2,
                                   rope_scaling=YARN, max_position_embeddings=128, q_lora_rank=16),
    "no-renorm-tied": dict(norm_topk_prob=False, routed_scaling_factor=1.0, tie_word_embeddings=True,
                           num_nextn_predict_layers=2),
}
V2_CONFIGS = {
    "v2-greedy": dict(scoring_func="softmax", topk_method="greedy", norm_topk_prob=False, n_shared_experts=2),
    "v2-group-limited-yarn": dict(scoring_func="softmax", topk_method="group_limited_greedy", norm_topk_prob=False,
                                  n_routed_experts=16, n_group=4, topk_group=2, q_lora_rank=16,
                                  rope_scaling={**YARN, "mscale": 0.707, "mscale_all_dim": 0.707},
                                  max_position_embeddings=128),
}


def _random_model(overrides, seed):
    torch.manual_seed(seed)
    model = Transformer(preset("tiny", **overrides)).eval()
    with torch.no_grad():
        for p in model.parameters():  # larger weights than the init, so routing and attention matter
            p.add_(torch.randn_like(p) * 0.05)
        for m in model.modules():
            if getattr(m, "e_score_correction_bias", None) is not None:
                m.e_score_correction_bias.normal_(0, 0.1)
    return model


def _hf_logits(cls, path, x):
    hf = cls.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return hf, hf(x).logits


@pytest.mark.parametrize("name", list(V3_CONFIGS) + list(V2_CONFIGS))
def test_our_dir_loads_in_transformers_with_same_logits(name, tmp_path):
    overrides = {**V3_CONFIGS, **V2_CONFIGS}[name]
    model = _random_model(overrides, seed=len(name))
    save_model(model, tmp_path / "m")
    cls = transformers.DeepseekV2ForCausalLM if name.startswith("v2") else transformers.DeepseekV3ForCausalLM
    x = torch.randint(0, 512, (2, 40))  # 40 > the YaRN configs' original context of 32
    _, theirs = _hf_logits(cls, tmp_path / "m", x)
    with torch.no_grad():
        ours = model(x)
        ours_absorbed = model(x, absorb=True)
    assert (ours - theirs).abs().max() <= 1e-4
    assert (ours_absorbed - theirs).abs().max() <= 1e-4


@pytest.mark.parametrize("fused", [False, True])
def test_transformers_saved_model_loads_in_nanoseek(fused, tmp_path):
    cfg = transformers.DeepseekV3Config(
        vocab_size=300, hidden_size=48, intermediate_size=96, moe_intermediate_size=24, num_hidden_layers=3,
        num_attention_heads=3, q_lora_rank=20, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4,
        v_head_dim=12, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, n_group=2, topk_group=1,
        first_k_dense_replace=1, max_position_embeddings=64, routed_scaling_factor=2.5)
    torch.manual_seed(0)
    hf = transformers.DeepseekV3ForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, buf in hf.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.normal_(0, 0.1)
    hf.save_pretrained(tmp_path / "hf")
    if fused:  # the stacked expert layout transformers keeps in memory: gate_up_proj (E, 2I, D)
        save_file({k: v.contiguous() for k, v in hf.state_dict().items()},
                  str(tmp_path / "hf" / "model.safetensors"), metadata={"format": "pt"})
    with pytest.warns(UserWarning, match="declares 1 MTP module"):
        ours = load_model(tmp_path / "hf")
    x = torch.randint(0, 300, (2, 17))
    with torch.no_grad():
        assert (ours(x) - hf(x).logits).abs().max() <= 1e-4
        assert (ours(x, absorb=True) - hf(x).logits).abs().max() <= 1e-4


def test_greedy_generation_matches_transformers(tmp_path):
    """Incremental decoding over our latent cache gives transformers' greedy tokens."""
    from nanoseek import LatentCache

    model = _random_model(V3_CONFIGS["q-lora-groups"], seed=7)
    save_model(model, tmp_path / "m")
    hf = transformers.DeepseekV3ForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32).eval()
    prompt = torch.randint(0, 512, (1, 6))
    with torch.no_grad():
        want = hf.generate(prompt, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)[0, 6:]
        cache = LatentCache(model.cfg, 1, 32)
        logits = model(prompt, 0, cache)
        got = []
        for t in range(12):
            tok = logits[:, -1].argmax(-1, keepdim=True)
            got.append(tok.item())
            logits = model(tok, 6 + t, cache, absorb=True)
    assert got == want.tolist()


def _transformers_dir(path, tokenizer, num_nextn_predict_layers=0):
    """A DeepSeek-V3 dir written by transformers alone, with `tokenizer` (a PreTrainedTokenizerFast)."""
    cfg = transformers.DeepseekV3Config(
        vocab_size=len(tokenizer), hidden_size=48, intermediate_size=96, moe_intermediate_size=24,
        num_hidden_layers=2, num_attention_heads=3, q_lora_rank=None, kv_lora_rank=16, qk_nope_head_dim=8,
        qk_rope_head_dim=4, v_head_dim=12, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
        n_group=2, topk_group=1, first_k_dense_replace=1, max_position_embeddings=128, routed_scaling_factor=2.5,
        num_nextn_predict_layers=num_nextn_predict_layers, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    hf = transformers.DeepseekV3ForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    hf.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return hf


def _plain_bpe(vocab_size=300):
    """A byte-level BPE trained here, with no special tokens at all (no begin, end or chat tokens)."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tk = HFTokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    text = ["the cat sat on the mat, and 12 + 30 = 42. " * 3, "Zwölf Äpfel und 東京 🙂 " * 2]
    tk.train_from_iterator(text * 50, trainers.BpeTrainer(vocab_size=vocab_size,
                                                          initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tk)


def test_a_transformers_dir_with_a_plain_bpe_generates_transformers_greedy_text(tmp_path):
    """No special tokens: plain completion needs none, and `nanoseek generate` prints what transformers does."""
    import subprocess
    import sys

    tok = _plain_bpe()
    assert tok.bos_token is None and tok.eos_token is None
    hf = _transformers_dir(tmp_path / "m", tok)
    prompt = "the cat sat on"
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = hf.generate(ids, max_new_tokens=16, do_sample=False, pad_token_id=0)[0, ids.shape[1]:]
    want = tok.decode(out)
    got = subprocess.run([sys.executable, "-m", "nanoseek", "generate", "--model", str(tmp_path / "m"), "--prompt",
                          prompt, "--max-tokens", "16"], capture_output=True, text=True, check=True).stdout
    assert got.rstrip("\n") == want
    report = subprocess.run([sys.executable, "-m", "nanoseek", "eval", "--model", str(tmp_path / "m"), "--task",
                             "arithmetic", "--template", "plain", "--n", "3", "--max-tokens", "8", "--json"],
                            capture_output=True, text=True, check=True).stdout
    assert '"pass1"' in report  # scored (an untrained model scores 0): eval needs no special token either


def test_a_foreign_chat_template_renders_as_transformers_and_masks_the_assistant(tmp_path):
    """A tokenizer with its own chat template and special tokens, but without nanoseek's: chat ids equal
    apply_chat_template's, the SFT mask covers exactly the assistant's turns, tags it lacks are text."""
    from nanoseek.rl.evaluate import answer_params
    from nanoseek.tokenizer import Tokenizer

    tok = _plain_bpe()
    tok.add_special_tokens({"bos_token": "<s>", "eos_token": "</s>", "additional_special_tokens": ["<|u|>", "<|a|>"]})
    tok.chat_template = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}<|u|>{{ m['content'] }}"
                         "{% else %}<|a|>{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
                         "{% if add_generation_prompt %}<|a|>{% endif %}")
    tok.save_pretrained(tmp_path / "t")
    ours = Tokenizer.load(tmp_path / "t")
    assert not ours.native and ours.bos_id == tok.bos_token_id and ours.eos_id == tok.eos_token_id
    assert ours.answer_end_id is None and answer_params(ours).stop == ["</answer>"]
    messages = [{"role": "user", "content": "2 + 2?"}, {"role": "assistant", "content": "<answer>4</answer>"},
                {"role": "user", "content": "and 3 + 3?"}]
    for gen in (False, True):
        ids, _ = ours.render_chat(messages, add_generation_prompt=gen)
        assert ids == tok.apply_chat_template(messages, add_generation_prompt=gen, tokenize=True, return_dict=False)
    ids, mask = ours.render_chat(messages[:2])
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == "<answer>4</answer></s>"
    assert Tokenizer.load(tmp_path / "t").encode_prompt("hi") == tok("hi").input_ids
    tok.chat_template = None
    tok.save_pretrained(tmp_path / "plain")
    (tmp_path / "plain" / "chat_template.jinja").unlink(missing_ok=True)
    with pytest.raises(ValueError, match="no chat_template"):
        Tokenizer.load(tmp_path / "plain").render_chat(messages)
