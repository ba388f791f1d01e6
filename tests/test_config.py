import json

import pytest

from nanoseek.config import PRESETS, ConfigError, ModelConfig, preset


@pytest.mark.parametrize("changes, message", [
    ({"kv_lora_rank": 0}, "kv_lora_rank must be an integer > 0 (got 0)"),
    ({"hidden_size": -4}, "hidden_size must be an integer > 0"),
    ({"qk_rope_head_dim": 7}, "qk_rope_head_dim must be even"),
    ({"q_lora_rank": 0}, "q_lora_rank must be null"),
    ({"scoring_func": "relu"}, "scoring_func must be one of sigmoid, softmax (got 'relu')"),
    ({"topk_method": "greedy"}, "topk_method must be one of noaux_tc when scoring_func is 'sigmoid'"),
    ({"scoring_func": "softmax", "topk_method": "greedy", "norm_topk_prob": True}, "norm_topk_prob must be false"),
    ({"num_experts_per_tok": 9}, "num_experts_per_tok must be between 1 and n_routed_experts=8 (got 9)"),
    ({"n_group": 3}, "n_group must be >= 1 and divide n_routed_experts=8 (got 3)"),
    ({"topk_group": 3}, "topk_group must be between 1 and n_group=2 (got 3)"),
    ({"n_group": 4, "topk_group": 1, "num_experts_per_tok": 3}, "cannot hold num_experts_per_tok=3"),
    ({"eos_token_id": 512}, "eos_token_id must be null or in [0, vocab_size=512) (got 512)"),
    ({"rope_scaling": {"type": "linear", "factor": 2}}, "rope_scaling.type must be 'yarn'"),
    ({"rope_scaling": {"type": "yarn", "factor": 4}}, "rope_scaling.original_max_position_embeddings"),
    ({"rms_norm_eps": 0.0}, "rms_norm_eps must be > 0"),
])
def test_validation_names_the_field(changes, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        preset("tiny", **changes)


def test_presets_validate_and_round_trip(tmp_path):
    for name in PRESETS:
        cfg = preset(name)
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(cfg.to_hf_dict()))
        again = ModelConfig.from_json(path)
        assert again == cfg, name


def test_plain_rope_is_written_as_factor_one_yarn_and_read_back_as_plain():
    """vLLM rotates MLA's key only on its YaRN path; factor-1 YaRN is the identity, so the dir says YaRN."""
    import torch

    from nanoseek.model import rope_frequencies
    d = preset("tiny").to_hf_dict()
    assert d["rope_scaling"]["type"] == "yarn" and d["rope_scaling"]["factor"] == 1.0
    assert d["rope_scaling"]["original_max_position_embeddings"] == d["max_position_embeddings"]
    assert ModelConfig.from_dict(d).rope_scaling is None
    plain, m = rope_frequencies(preset("tiny"))
    yarn, m1 = rope_frequencies(preset("tiny", rope_scaling=d["rope_scaling"]))
    assert m == m1 == 1.0 and torch.allclose(plain, yarn, rtol=1e-6, atol=0)
    assert preset("deepseek-v3").to_hf_dict()["rope_scaling"]["factor"] == 40  # a real YaRN stays as it is


def test_vllm_note_names_the_latent_width():
    from nanoseek.config import vllm_mla_note
    assert "is 40" in vllm_mla_note(preset("tiny")) and "is 80" in vllm_mla_note(preset("small"))
    assert vllm_mla_note(preset("medium")) is None and vllm_mla_note(preset("deepseek-v3")) is None
    gpu_only = vllm_mla_note(preset("tiny", kv_lora_rank=256, qk_rope_head_dim=64))  # 320: some GPU backends
    assert "is 320" in gpu_only and "not on the CPU" in gpu_only


def test_reads_transformers_v5_rope_parameters(tmp_path):
    d = preset("tiny").to_hf_dict()
    del d["rope_theta"], d["rope_scaling"]
    d["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 5000.0, "factor": 4.0,
                            "original_max_position_embeddings": 128, "mscale": 1.0, "mscale_all_dim": 1.0}
    d["num_mtp_layers"] = 0
    del d["num_nextn_predict_layers"]
    cfg = ModelConfig.from_dict(d)
    assert cfg.rope_theta == 5000.0
    assert cfg.rope_scaling["type"] == "yarn" and cfg.rope_scaling["factor"] == 4.0
    assert cfg.num_nextn_predict_layers == 0


def test_file_errors_name_the_file(tmp_path):
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match=r"config.json: invalid JSON at line 1"):
        ModelConfig.from_json(tmp_path)
    bad.write_text(json.dumps({**preset("tiny").to_hf_dict(), "kv_lora_rank": 0}))
    with pytest.raises(ConfigError, match=r"config.json: kv_lora_rank must be an integer > 0"):
        ModelConfig.from_json(bad)
    bad.write_text(json.dumps({**preset("tiny").to_hf_dict(), "hidden_act": "gelu"}))
    with pytest.raises(ConfigError, match="hidden_act must be 'silu'"):
        ModelConfig.from_json(bad)


def test_unknown_preset():
    with pytest.raises(ConfigError, match="unknown preset 'huge'; choose one of: tiny, small"):
        preset("huge")
