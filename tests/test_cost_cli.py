import json
import subprocess
import sys

import pytest
import torch

from nanoseek import load_model, preset
from nanoseek.cli import main
from nanoseek.cost import estimate


def test_deepseek_v3_published_figures():
    c = estimate(preset("deepseek-v3"))
    assert c.kv_elements_per_token_per_layer == 576
    assert c.kv_bytes_per_token == 576 * 61 * 2 == 70272  # ~70 KB per token in bf16
    assert abs(c.params_total / 671e9 - 1) < 0.02
    assert abs(c.params_activated / 37e9 - 1) < 0.02
    assert c.kv_bytes_per_token_mha == 61 * 32768 * 2  # 2 * heads * head_dim per layer


def test_deepseek_v2_figures():
    c = estimate(preset("deepseek-v2"))
    assert abs(c.params_total / 236e9 - 1) < 0.02 and abs(c.params_activated / 21e9 - 1) < 0.02
    lite = estimate(preset("deepseek-v2-lite"))
    assert abs(lite.params_total / 15.7e9 - 1) < 0.02


def test_cost_counts_match_instantiated_model():
    from nanoseek import Transformer
    for name in ("tiny", "small"):
        cfg = preset(name)
        model = Transformer(cfg)
        c = estimate(cfg)
        mtp = sum(p.numel() for p in model.mtp.parameters())
        assert c.params_total + c.params_mtp == model.num_parameters(), name
        assert c.params_mtp == mtp


def test_cli_cost_json(capsys):
    assert main(["cost", "--preset", "deepseek-v3", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["kv_bytes_per_token"] == 70272 and out["name"] == "deepseek-v3"


def test_cli_cost_table_and_config(tmp_path, capsys):
    assert main(["init", "--preset", "tiny", "--out", str(tmp_path / "m"), "--seed", "3"]) == 0
    assert main(["cost", "--config", str(tmp_path / "m")]) == 0
    out = capsys.readouterr().out
    assert "KV elements / token / layer (MLA)  40" in out


def test_cli_init_seed_is_deterministic(tmp_path):
    for name in ("a", "b"):
        assert main(["init", "--preset", "tiny", "--out", str(tmp_path / name), "--seed", "5"]) == 0
    assert main(["init", "--preset", "tiny", "--out", str(tmp_path / "c"), "--seed", "6"]) == 0
    a, b, c = (load_model(tmp_path / n) for n in "abc")
    assert torch.equal(a.embed_tokens.weight, b.embed_tokens.weight)
    assert not torch.equal(a.embed_tokens.weight, c.embed_tokens.weight)


@pytest.mark.parametrize("argv, message", [
    (["init", "--preset", "deepseek-v3", "--out", "x"], "shape-only"),
    (["cost"], "give exactly one of --preset NAME or --config PATH"),
    (["cost", "--config", "/nonexistent/dir"], "not found"),
    (["cost", "--preset", "tiny", "--seq-len", "0"], "seq_len must be >= 1"),
    (["serve", "--model", "x", "--prefill-hold", "-1"], "--prefill-hold >= 0"),
])
def test_cli_errors_are_clear(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_python_m_and_help():
    out = subprocess.run([sys.executable, "-m", "nanoseek", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "init" in out.stdout and "cost" in out.stdout
    out = subprocess.run([sys.executable, "-m", "nanoseek", "init", "--help"], capture_output=True, text=True)
    assert "--seed" in out.stdout and "--dtype" in out.stdout


def test_init_ships_a_tokenizer(tmp_path, capsys):
    from nanoseek.tokenizer import Tokenizer
    assert main(["init", "--preset", "tiny", "--out", str(tmp_path / "m")]) == 0
    tok = Tokenizer.load(tmp_path / "m")
    assert tok.vocab_size == 265 and tok.decode(tok.encode("héllo 😀")) == "héllo 😀"
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "m"))
    assert hf.eos_token_id == 1 and hf.bos_token_id == 0


def test_init_rejects_a_tokenizer_larger_than_the_vocab(tmp_path, capsys):
    from nanoseek.tokenizer import Tokenizer
    import random
    rng = random.Random(0)
    texts = [" ".join("".join(rng.choice("abcdefghijklmnop") for _ in range(6)) for _ in range(200))
             for _ in range(50)]
    tok = Tokenizer.train(texts, 700)
    assert tok.vocab_size > 512
    tok.save(tmp_path / "tok")
    assert main(["init", "--preset", "tiny", "--out", str(tmp_path / "m"), "--tokenizer", str(tmp_path / "tok")]) == 2
    assert "vocab_size is 512" in capsys.readouterr().err


def test_cli_tasks(tmp_path, capsys):
    assert main(["tasks", "sample", "--task", "countdown", "--n", "2", "--json"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and "<answer>" in json.loads(lines[0])["solution"]
    assert main(["tasks", "sample"]) == 2
    assert main(["tasks", "corpus", "--out", str(tmp_path / "raw"), "--megabytes", "0.2"]) == 0
    assert sum(f.stat().st_size for f in (tmp_path / "raw").iterdir()) >= 200_000


def test_v3s_published_training_cost_from_its_own_flop_count():
    from nanoseek.cost import V3_BUDGET, dollars
    d = dollars(estimate(preset("deepseek-v3")), V3_BUDGET)
    assert abs(d["gpu_hours_per_trillion_tokens"] / 180e3 - 1) < 0.03  # V3: 180K H800 GPU-hours per 1T tokens
    assert abs(d["pretrain_gpu_hours"] / 2.664e6 - 1) < 0.03  # its pretraining: 2,664K GPU-hours
    assert abs(d["total_usd"] / 5.576e6 - 1) < 0.03  # and $5.576M in all at $2/h
    # serving: a node's dollars per hour over the tokens it writes in an hour
    assert d["serve_usd_per_million_output_tokens"] == pytest.approx(8 * 2.0 / (50e3 * 3600) * 1e6)


def test_cli_cost_states_its_assumptions_and_checks_them(capsys):
    assert main(["cost", "--preset", "deepseek-v3", "--mfu", "0.2", "--gpu-hour-price", "1"]) == 0
    out = capsys.readouterr().out
    assert "at 989 TFLOP/s peak x 20% MFU" in out and "at $1/h" in out and "per 8-GPU node" in out
    assert main(["cost", "--preset", "small", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["pretrain_usd"] > 0
    for flag, value in [("--mfu", "1.5"), ("--peak-tflops", "0"), ("--node-gpus", "-1")]:
        assert main(["cost", "--preset", "small", flag, value]) == 2
        assert flag in capsys.readouterr().err
