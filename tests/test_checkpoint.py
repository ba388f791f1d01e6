import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from nanoseek import CheckpointError, Transformer, load_model, preset, save_model
import nanoseek.checkpoint as ckpt


def _logits(model, x):
    with torch.no_grad():
        return model(x)


def test_save_load_is_exact(tiny_model, tmp_path):
    save_model(tiny_model, tmp_path / "m")
    loaded = load_model(tmp_path / "m")
    for (n, a), (_, b) in zip(tiny_model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), n
    x = torch.randint(0, 512, (2, 9))
    assert torch.equal(_logits(tiny_model, x), _logits(loaded, x))


def test_hf_tensor_names(tiny_model, tmp_path):
    save_model(tiny_model, tmp_path / "m")
    names = set(load_file(tmp_path / "m" / "model.safetensors"))
    L = tiny_model.cfg.num_hidden_layers
    for want in ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight",
                 "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.kv_a_proj_with_mqa.weight",
                 "model.layers.0.self_attn.kv_a_layernorm.weight", "model.layers.0.self_attn.kv_b_proj.weight",
                 "model.layers.0.self_attn.o_proj.weight", "model.layers.0.mlp.gate_proj.weight",
                 "model.layers.1.mlp.gate.weight", "model.layers.1.mlp.gate.e_score_correction_bias",
                 "model.layers.1.mlp.experts.7.down_proj.weight", "model.layers.1.mlp.experts.0.gate_proj.weight",
                 "model.layers.1.mlp.shared_experts.up_proj.weight",
                 f"model.layers.{L}.enorm.weight", f"model.layers.{L}.hnorm.weight", f"model.layers.{L}.eh_proj.weight",
                 f"model.layers.{L}.shared_head.norm.weight", f"model.layers.{L}.shared_head.head.weight",
                 f"model.layers.{L}.embed_tokens.weight", f"model.layers.{L}.mlp.experts.3.up_proj.weight"]:
        assert want in names, want
    assert not any("gate_up_proj" in n for n in names)
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["model_type"] == "deepseek_v3" and config["architectures"] == ["DeepseekV3ForCausalLM"]
    assert json.loads((tmp_path / "m" / "generation_config.json").read_text())["eos_token_id"] == 1


def test_q_lora_names(tmp_path):
    model = Transformer(preset("tiny", q_lora_rank=16))
    names = set(ckpt.to_hf_state_dict(model))
    assert {"model.layers.0.self_attn.q_a_proj.weight", "model.layers.0.self_attn.q_a_layernorm.weight",
            "model.layers.0.self_attn.q_b_proj.weight"} <= names


def test_sharded_and_bf16(tiny_model, tmp_path):
    save_model(tiny_model, tmp_path / "m", dtype=torch.bfloat16, max_shard_bytes=100_000)
    index = json.loads((tmp_path / "m" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    loaded = load_model(tmp_path / "m")  # bf16 on disk, fp32 in memory
    for n, p in tiny_model.state_dict().items():
        assert torch.equal(loaded.state_dict()[n], p.to(torch.bfloat16).float()), n


def test_truncated_file_names_the_file(tiny_model, tmp_path):
    save_model(tiny_model, tmp_path / "m")
    f = tmp_path / "m" / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="model.safetensors.*truncated or corrupt"):
        load_model(tmp_path / "m")
    f.write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_model(tmp_path / "m")


def _rewrite(path, edit):
    f = path / "model.safetensors"
    tensors = load_file(f)
    edit(tensors)
    save_file(tensors, f, metadata={"format": "pt"})


def test_missing_unexpected_and_misshapen_tensors(tiny_model, tmp_path):
    m = tmp_path / "m"
    save_model(tiny_model, m)
    _rewrite(m, lambda t: t.pop("model.layers.0.self_attn.kv_b_proj.weight"))
    with pytest.raises(CheckpointError, match="missing tensor.*model.layers.0.self_attn.kv_b_proj.weight"):
        load_model(m)
    save_model(tiny_model, m)
    _rewrite(m, lambda t: t.pop("model.layers.1.mlp.experts.5.up_proj.weight"))
    with pytest.raises(CheckpointError, match="missing tensor model.layers.1.mlp.experts.5.up_proj.weight"):
        load_model(m)
    save_model(tiny_model, m)
    _rewrite(m, lambda t: t.update({"model.layers.0.self_attn.bogus.weight": torch.zeros(2)}))
    with pytest.raises(CheckpointError, match="model.safetensors: unexpected tensor model.layers.0.self_attn.bogus"):
        load_model(m)
    save_model(tiny_model, m)
    _rewrite(m, lambda t: t.update({"model.norm.weight": torch.zeros(65)}))
    with pytest.raises(CheckpointError, match=r"model.safetensors: tensor model.norm.weight has shape \(65,\), "
                                              r"expected \(64,\)"):
        load_model(m)


def test_missing_shard_and_dir(tiny_model, tmp_path):
    save_model(tiny_model, tmp_path / "m", max_shard_bytes=100_000)
    shard = sorted((tmp_path / "m").glob("model-00002-of-*.safetensors"))[0]
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"lists shard {shard.name}, which is missing"):
        load_model(tmp_path / "m")
    with pytest.raises(CheckpointError, match="model dir not found"):
        load_model(tmp_path / "nope")


def test_failed_write_keeps_the_previous_dir(tiny_model, tmp_path, monkeypatch):
    m = tmp_path / "m"
    save_model(tiny_model, m)
    before = (m / "model.safetensors").read_bytes()

    def crash(*a, **k):
        raise OSError(28, "No space left on device")

    other = Transformer(preset("tiny"))
    monkeypatch.setattr(ckpt, "save_file", crash)
    with pytest.raises(OSError, match="No space left"):
        save_model(other, m)
    assert (m / "model.safetensors").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m"]  # no temporary dir left behind
    load_model(m)


def test_temporary_dir_is_never_a_model(tiny_model, tmp_path):
    save_model(tiny_model, tmp_path / "m")
    tmp = tmp_path / ".m.tmp-deadbeef"
    (tmp_path / "m").rename(tmp)
    with pytest.raises(CheckpointError, match="unfinished write"):
        load_model(tmp)


def test_mtp_copies_are_real_copies(tiny_model, tmp_path):
    save_model(tiny_model, tmp_path / "m")
    L = tiny_model.cfg.num_hidden_layers
    with safe_open(str(tmp_path / "m" / "model.safetensors"), "pt") as f:
        assert torch.equal(f.get_tensor(f"model.layers.{L}.shared_head.head.weight"), f.get_tensor("lm_head.weight"))
        assert torch.equal(f.get_tensor(f"model.layers.{L}.embed_tokens.weight"),
                           f.get_tensor("model.embed_tokens.weight"))


def test_tied_embeddings_round_trip(tmp_path):
    torch.manual_seed(0)
    model = Transformer(preset("tiny", tie_word_embeddings=True))
    save_model(model, tmp_path / "m")
    assert "lm_head.weight" not in load_file(tmp_path / "m" / "model.safetensors")
    loaded = load_model(tmp_path / "m")
    assert loaded.lm_head.weight is loaded.embed_tokens.weight
    x = torch.randint(0, 512, (1, 5))
    assert torch.equal(_logits(model.eval(), x), _logits(loaded, x))
