"""Training: schedule, balancing, non-finite steps, checkpoints, exact resume after SIGKILL, data parallel."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import token_shards

from nanoseek import Transformer, load_model, preset
from nanoseek.cli import main
from nanoseek.tokenizer import Tokenizer
from nanoseek.train import common
from nanoseek.train.common import LossConfig, OptimConfig, Trainer, build_optimizer, lr_at, update_balance_bias
from nanoseek.train.dist import World


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return token_shards(tmp_path_factory.mktemp("train"))


def pretrain_argv(data, out, *extra):
    """`nanoseek pretrain` of tiny for a few seconds on `token_shards(data)`."""
    return ["pretrain", "--preset", "tiny", "--data", str(data / "tokens"), "--tokenizer", str(data / "tok"),
            "--out", str(out), "--batch-size", "4", "--seq-len", "32", "--precision", "fp32", "--warmup", "3",
            "--quiet", *extra]


def losses(run):
    return [json.loads(line)["loss"] for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]


def test_lr_schedules():
    c = OptimConfig(lr=1.0, min_lr_ratio=0.1, warmup=10, schedule="wsd", decay_frac=0.2)
    assert lr_at(0, 100, c) == pytest.approx(0.1) and lr_at(9, 100, c) == pytest.approx(1.0)
    assert lr_at(50, 100, c) == 1.0 and lr_at(79, 100, c) == 1.0
    assert lr_at(90, 100, c) == pytest.approx(0.55) and lr_at(100, 100, c) == pytest.approx(0.1)
    c = OptimConfig(lr=1.0, min_lr_ratio=0.0, warmup=0, schedule="cosine")
    assert lr_at(0, 100, c) == pytest.approx(1.0) and lr_at(50, 100, c) == pytest.approx(0.5)
    assert lr_at(100, 100, c) == pytest.approx(0.0, abs=1e-12)


def test_balance_bias_moves_toward_balance():
    model = Transformer(preset("tiny"))
    counts = torch.tensor([[10.0, 2, 4, 4, 4, 4, 4, 0], [0] * 8])  # the MoE layer's (mean 4); the MTP module's
    update_balance_bias(model, counts, gamma=0.01)
    bias = model.layers[1].mlp.gate.e_score_correction_bias
    assert bias.tolist() == pytest.approx([-0.01, 0.01, 0, 0, 0, 0, 0, 0.01])
    assert model.mtp[0].block.mlp.gate.e_score_correction_bias.tolist() == [0] * 8  # it did not run


def test_the_mtp_modules_gate_is_balanced_too():
    torch.manual_seed(0)
    model = Transformer(preset("tiny"))
    trainer = _trainer(model, steps=4)
    x = torch.randint(0, 64, (4, 32))
    trainer.step([(x, torch.roll(x, -1, 1))])
    for gate in model.moe_gates():  # the main layer's, then the MTP module's
        assert gate.e_score_correction_bias.abs().sum() > 0
    assert model.moe_gates()[-1] is model.mtp[0].block.mlp.gate


def test_no_balance_mtp_leaves_the_mtp_gate_and_balances_the_rest():
    model = Transformer(preset("tiny"))
    counts = torch.tensor([[10.0, 2, 4, 4, 4, 4, 4, 0], [0, 8, 4, 4, 4, 4, 4, 4]])  # main layer's, MTP's
    update_balance_bias(model, counts, gamma=0.01, mtp=False)
    assert model.layers[1].mlp.gate.e_score_correction_bias.tolist() == pytest.approx([-0.01, 0.01, 0, 0, 0, 0, 0,
                                                                                        0.01])
    assert model.mtp[0].block.mlp.gate.e_score_correction_bias.tolist() == [0] * 8


def test_loss_schedules_follow_v3():
    lc = LossConfig(mtp_weight=0.3, bias_gamma=1e-3, gamma_off_share=0.25, mtp_later=(0.1, 0.5))
    got = [lc.at(step, 8) for step in range(8)]
    assert got == [(0.3, 1e-3)] * 4 + [(0.1, 1e-3)] * 2 + [(0.1, 0.0)] * 2
    assert [LossConfig().at(step, 8) for step in (0, 7)] == [(0.3, 1e-3)] * 2  # constant by default


def test_the_bias_stops_moving_in_the_gamma_off_tail():
    torch.manual_seed(0)
    model = Transformer(preset("tiny"))
    oc = OptimConfig(warmup=1)
    trainer = Trainer(model, build_optimizer(model, oc), oc, LossConfig(gamma_off_share=0.5, mtp_later=(0.0, 0.5)),
                      4, World(), "fp32")
    x = torch.randint(0, 64, (4, 32))
    steps = [trainer.step([(x, torch.roll(x, -1, 1))]) for _ in range(2)]
    bias = [g.e_score_correction_bias.clone() for g in model.moe_gates()]
    steps += [trainer.step([(x, torch.roll(x, -1, 1))]) for _ in range(2)]
    assert all(torch.equal(a, g.e_score_correction_bias) for a, g in zip(bias, model.moe_gates()))
    assert [m["bias_gamma"] for m in steps] == [1e-3, 1e-3, 0.0, 0.0]
    assert [m["mtp_weight"] for m in steps] == [0.3, 0.3, 0.0, 0.0]
    assert steps[-1]["mtp_loss"] == 0.0 and steps[0]["mtp_loss"] > 0


def _trainer(model, steps=10, **kw):
    oc = OptimConfig(warmup=1)
    return Trainer(model, build_optimizer(model, oc), oc, LossConfig(), steps, World(), "fp32", **kw)


def test_non_finite_steps_are_skipped_then_stop():
    torch.manual_seed(0)
    model = Transformer(preset("tiny"))
    trainer = _trainer(model, max_bad_steps=3)
    x = torch.randint(0, 512, (2, 16))
    with torch.no_grad():
        model.lm_head.weight[0, 0] = float("nan")
    before = model.embed_tokens.weight.clone()
    m = trainer.step([(x, x)])
    assert m["skipped"] and trainer.skipped == 1
    assert torch.equal(model.embed_tokens.weight, before)  # no update from a NaN step
    trainer.step([(x, x)])
    with pytest.raises(FloatingPointError, match="3 steps in a row had a non-finite loss"):
        trainer.step([(x, x)])


def test_training_lowers_the_loss_and_records_expert_loads():
    torch.manual_seed(0)
    model = Transformer(preset("tiny"))
    trainer = _trainer(model, steps=30)
    x = torch.randint(0, 64, (4, 32))
    first = trainer.step([(x, torch.roll(x, -1, 1))])
    for _ in range(28):
        last = trainer.step([(x, torch.roll(x, -1, 1))])
    assert last["loss"] < first["loss"] - 1.0
    main, mtp = last["expert_counts"]  # tiny's one MoE layer, then its MTP module's
    assert sum(main) == 4 * 32 * 2 and sum(mtp) == 4 * 31 * 2


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_optimizers_step(optimizer):
    torch.manual_seed(0)
    model = Transformer(preset("tiny"))
    oc = OptimConfig(optimizer=optimizer, warmup=1, lr=1e-2)
    trainer = Trainer(model, build_optimizer(model, oc), oc, LossConfig(), 10, World(), "fp32")
    x = torch.randint(0, 64, (4, 32))
    losses_ = [trainer.step([(x, torch.roll(x, -1, 1))])["loss"] for _ in range(8)]
    assert losses_[-1] < losses_[0]


def test_pretrain_writes_checkpoints_metrics_and_a_final_model(data, tmp_path):
    run = tmp_path / "run"
    assert main(pretrain_argv(data, run, "--steps", "6", "--save-every", "2", "--keep", "2")) == 0
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000004", "step-00000006"]
    for ck in (run / "checkpoints").iterdir():
        assert (ck / "COMMITTED").exists() and (ck / "training_state" / "state.pt").exists()
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 7))
    for key in ("loss", "mtp_loss", "balance_loss", "grad_norm", "lr", "tokens_per_s", "mfu",
                "expert_load_max_over_mean"):
        assert key in rows[-1], key
    final = load_model(run)
    ck = load_model(run / "checkpoints" / "step-00000006")
    assert all(torch.equal(a, b) for a, b in zip(final.state_dict().values(), ck.state_dict().values()))
    assert Tokenizer.load(run).vocab_size == 265
    settings = json.loads((run / "train_args.json").read_text())  # every setting of the command, flat
    assert settings["steps"] == 6 and settings["preset"] == "tiny" and settings["save_every"] == 2
    precision = json.loads((run / "precision.json").read_text())  # what it computed in, and why
    assert precision == {"precision": "fp32", "reason": "--precision fp32", "tokens_per_s": None}


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp8"])
def test_resume_after_sigkill_is_bit_exact(data, tmp_path, precision):
    args = ["--steps", "60", "--save-every", "4", "--precision", precision]  # many steps: the kill lands mid-run
    assert main(pretrain_argv(data, tmp_path / "ref", *args)) == 0
    cmd = [sys.executable, "-m", "nanoseek", *pretrain_argv(data, tmp_path / "run", *args)]
    proc = subprocess.Popen(cmd)
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 6:
            break
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert len(losses(tmp_path / "run")) < 60, "the run finished before it could be killed"
    assert main(pretrain_argv(data, tmp_path / "run", *args, "--resume")) == 0
    assert losses(tmp_path / "run") == losses(tmp_path / "ref")  # bit for bit


def test_compiled_pretraining_matches_eager_and_resumes_exactly(data, tmp_path):
    """--compile compiles each block's attention and norms: its steps are eager's to float rounding, and a run
    resumed from a checkpoint repeats the uninterrupted one bit for bit."""
    args = ["--steps", "6", "--save-every", "3"]
    assert main(pretrain_argv(data, tmp_path / "eager", *args)) == 0
    run = tmp_path / "run"
    assert main(pretrain_argv(data, run, *args, "--compile")) == 0
    whole = losses(run)
    assert whole == pytest.approx(losses(tmp_path / "eager"), rel=1e-5)
    shutil.rmtree(run / "checkpoints" / "step-00000006")  # as if killed after step 3's checkpoint
    assert main(pretrain_argv(data, run, *args, "--compile", "--resume")) == 0
    assert losses(run) == whole
    assert main(pretrain_argv(data, tmp_path / "fp8", *args, "--compile", "--precision", "fp8")) == 2


def test_a_compile_that_fails_is_a_clear_error(data, tmp_path, monkeypatch, capsys):
    def no_compiler(model):  # what a host without g++ raises from inductor, at the first compiled call
        def attend(*args):
            raise RuntimeError("Compiler: g++ not found")
        for block in model.layers:
            block.compiled_attend = attend

    monkeypatch.setattr(common, "compile_dense", no_compiler)
    assert main(pretrain_argv(data, tmp_path / "run", "--steps", "2", "--compile")) == 2
    err = capsys.readouterr().err
    assert "g++ not found" in err and "Run without --compile" in err


def test_crash_mid_save_keeps_the_previous_checkpoint(data, tmp_path, monkeypatch):
    run = tmp_path / "run"
    assert main(pretrain_argv(data, run, "--steps", "2", "--save-every", "2")) == 0
    real = common.write_model

    def half_write(model, path, **kw):
        real(model, path, **kw)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(common, "write_model", half_write)
    assert main(pretrain_argv(data, run, "--steps", "4", "--save-every", "2", "--resume")) == 2
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-00000002"]
    load_model(run / "checkpoints" / "step-00000002")


def test_bad_input_is_a_clear_error(data, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(pretrain_argv(data, run, "--steps", "2", "--save-every", "2")) == 0
    assert main(pretrain_argv(data, run, "--steps", "4")) == 2
    assert "already has checkpoints" in capsys.readouterr().err
    argv = pretrain_argv(data, run, "--steps", "4", "--resume")
    argv[argv.index("tiny")] = "small"
    assert main(argv) == 2
    assert "config disagrees with the flags" in capsys.readouterr().err
    trained = tmp_path / "tok600"
    import random
    rng = random.Random(0)
    Tokenizer.train([" ".join("".join(rng.choice("abcdefghijklmnop") for _ in range(6)) for _ in range(200))
                     for _ in range(50)], 700).save(trained)
    argv = pretrain_argv(data, tmp_path / "r2", "--steps", "2")
    argv[argv.index(str(data / "tok"))] = str(trained)
    assert main(argv) == 2
    assert "vocab_size is 512" in capsys.readouterr().err
    argv = pretrain_argv(data, tmp_path / "r3", "--steps", "2")
    argv[argv.index(str(data / "tokens"))] = str(tmp_path / "missing")
    assert main(argv) == 2
    assert "index.json: not found" in capsys.readouterr().err
    for flag, value, says in [("--mtp-weight-schedule", "0.1", "must be WEIGHT@SHARE"),
                              ("--mtp-weight-schedule", "0.1@2", "must be WEIGHT@SHARE"),
                              ("--balance-gamma-schedule", "1.5", "share of the steps in [0, 1]")]:
        assert main(pretrain_argv(data, tmp_path / "r4", "--steps", "2", flag, value)) == 2
        assert says in capsys.readouterr().err


def test_torchrun_two_processes_match_one(data, tmp_path):
    torchrun = Path(sys.executable).with_name("torchrun")
    common_args = ["--steps", "20", "--save-every", "100", "--seed", "3"]
    one = pretrain_argv(data, tmp_path / "one", *common_args)
    one[one.index("--batch-size") + 1] = "4"
    two = pretrain_argv(data, tmp_path / "two", *common_args)
    two[two.index("--batch-size") + 1] = "2"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "nanoseek", *one], check=True, env=env)
    subprocess.run([str(torchrun), "--standalone", "--nproc_per_node=2", "-m", "nanoseek", *two],
                   check=True, env=env)
    a, b = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(a) == len(b) == 20
    assert max(abs(x - y) for x, y in zip(a, b)) <= 1e-5


@pytest.mark.parametrize("topk_group", [1, 2])  # tiny: 2 groups of 4 experts; 1 is node-limited to one rank
def test_expert_parallel_two_processes_match_one(data, tmp_path, topk_group):
    torchrun = Path(sys.executable).with_name("torchrun")
    assert main(["init", "--preset", "tiny", "--out", str(tmp_path / "cfg")]) == 0
    cfg = json.loads((tmp_path / "cfg" / "config.json").read_text())
    (tmp_path / "cfg" / "config.json").write_text(json.dumps({**cfg, "topk_group": topk_group}))
    common_args = ["--steps", "20", "--save-every", "100", "--seed", "3"]

    def argv(out, batch, *extra):
        a = pretrain_argv(data, tmp_path / out, *common_args, *extra)
        a[a.index("--preset"):a.index("--preset") + 2] = ["--config", str(tmp_path / "cfg" / "config.json")]
        a[a.index("--batch-size") + 1] = batch
        return a

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "nanoseek", *argv("one", "4")], check=True, env=env)
    subprocess.run([str(torchrun), "--standalone", "--nproc_per_node=2", "-m", "nanoseek",
                    *argv("ep", "2", "--expert-parallel", "2")], check=True, env=env)
    a, b = losses(tmp_path / "one"), losses(tmp_path / "ep")
    assert len(a) == len(b) == 20
    assert max(abs(x - y) for x, y in zip(a, b)) <= 1e-5
    one, two = load_model(tmp_path / "one"), load_model(tmp_path / "ep")  # the same HF dir: all experts
    for (name, x), y in zip(one.state_dict().items(), two.state_dict().values()):
        assert (x - y).abs().max() <= 1e-5, name
    rows = [json.loads(x) for x in (tmp_path / "ep" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["expert_counts"] == [json.loads(x) for x in
                                         (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()][-1]["expert_counts"]
    assert max(r["ep_most_ranks_per_token"] for r in rows) <= topk_group  # node-limited: at most topk_group ranks
    assert 0 < rows[-1]["ep_remote_ranks_per_token"] <= topk_group


def test_expert_parallel_resumes_exactly(data, tmp_path):
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def run(out, *extra):
        argv = pretrain_argv(data, tmp_path / out, "--steps", "8", "--save-every", "4", "--batch-size", "2",
                             "--expert-parallel", "2", *extra)
        subprocess.run([str(torchrun), "--standalone", "--nproc_per_node=2", "-m", "nanoseek", *argv], check=True,
                       env=env)

    run("ref")
    shutil.copytree(tmp_path / "ref" / "checkpoints" / "step-00000004", tmp_path / "run" / "checkpoints" / "step-00000004")
    (tmp_path / "run" / "metrics.jsonl").write_text(
        "".join(x + "\n" for x in (tmp_path / "ref" / "metrics.jsonl").read_text().splitlines()[:4]))
    run("run", "--resume")  # each rank's optimizer moments for its own experts come back
    assert losses(tmp_path / "run") == losses(tmp_path / "ref")
    with pytest.raises(subprocess.CalledProcessError):  # a checkpoint is a plain model dir, but EP needs torchrun
        subprocess.run([sys.executable, "-m", "nanoseek", *pretrain_argv(data, tmp_path / "x", "--steps", "2",
                                                                         "--expert-parallel", "2")],
                       check=True, env=env, capture_output=True)


def test_plot_writes_pngs(data, tmp_path):
    run = tmp_path / "run"
    assert main(pretrain_argv(data, run, "--steps", "3", "--save-every", "3")) == 0
    assert main(["plot", str(run)]) == 0
    for name in ("loss.png", "lr.png", "expert_load.png"):
        assert (run / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["plot", str(tmp_path / "nope")]) == 2


def test_ctrl_c_saves_then_exits(data, tmp_path):
    cmd = [sys.executable, "-m", "nanoseek", *pretrain_argv(data, tmp_path / "run", "--steps", "500",
                                                             "--save-every", "1000")]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0 and "saving a checkpoint first" in err
    (ckpt,) = (tmp_path / "run" / "checkpoints").iterdir()
    assert (ckpt / "COMMITTED").exists()
    assert int(ckpt.name.split("-")[1]) == len(losses(tmp_path / "run")) < 500


def test_a_run_in_progress_loads_its_newest_checkpoint(data, tmp_path):
    run = tmp_path / "run"
    assert main(pretrain_argv(data, run, "--steps", "4", "--save-every", "2")) == 0
    for name in ("config.json", "model.safetensors"):
        (run / name).unlink()  # as if the final export had not happened yet
    model = load_model(run)
    ck = load_model(run / "checkpoints" / "step-00000004")
    assert torch.equal(model.embed_tokens.weight, ck.embed_tokens.weight)


def test_resume_drops_a_half_written_metrics_line(data, tmp_path):
    run = tmp_path / "run"
    assert main(pretrain_argv(data, run, "--steps", "4", "--save-every", "2")) == 0
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 5, "lo')  # killed mid-write
    assert main(["plot", str(run)]) == 0
    assert main(pretrain_argv(data, run, "--steps", "6", "--save-every", "2", "--resume")) == 0
    assert [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()] == list(range(1, 7))


def test_fused_adamw_bumps_versions_and_resumes_an_unfused_state():
    """torch's fused AdamW does not bump the weights' version counters; ours does, as the unfused one does,
    so autograd's saved-tensor checks see the step. A state saved by the unfused AdamW resumes fused and
    steps as the unfused one would."""
    from nanoseek.train.common import AdamW

    torch.manual_seed(0)
    model = Transformer(preset("tiny"))
    twin = Transformer(preset("tiny"))
    twin.load_state_dict(model.state_dict())
    old = torch.optim.AdamW(twin.parameters(), lr=1e-2)
    ours = AdamW(model.parameters(), lr=1e-2)
    for p, q in zip(model.parameters(), twin.parameters()):
        p.grad = torch.randn_like(p)
        q.grad = p.grad.clone()
    old.step()
    ours.load_state_dict(old.state_dict())  # the state after one unfused step, into the fused optimizer
    for p, q in zip(model.parameters(), twin.parameters()):
        p.data.copy_(q.data)
    assert ours.param_groups[0]["fused"] is True
    before = [p._version for p in model.parameters()]
    ours.step(), old.step()
    assert all(p._version > v for p, v in zip(model.parameters(), before))
    assert all(torch.allclose(p, q, atol=1e-6) for p, q in zip(model.parameters(), twin.parameters()))
