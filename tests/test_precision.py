"""--precision auto: the decision from measured rates, the measurement's lack of side effects, and resume."""

import pytest
import torch

from nanoseek import Transformer, preset
from nanoseek.train import common, precision
from nanoseek.train.common import LossConfig, OptimConfig, Trainer, build_optimizer
from nanoseek.train.dist import World


def never():
    raise AssertionError("measured when it should not have")


@pytest.mark.parametrize("fp32, bf16, chosen", [(1000, 2500, "bf16"), (3295, 1308, "fp32"), (1000, 1050, "fp32"),
                                                (1000, 1100, "bf16")])
def test_auto_takes_bf16_only_when_measured_faster_by_the_margin(fp32, bf16, chosen):
    c = precision.decide({"fp32": fp32, "bf16": bf16}, "batch 8 x 256 tokens")
    assert c.name == chosen and c.dtype == (torch.bfloat16 if chosen == "bf16" else None)
    assert f"{fp32:,.0f}" in c.reason and f"{bf16:,.0f}" in c.reason and "batch 8 x 256" in c.reason


def test_choose_measures_only_for_auto_on_a_cpu_with_bf16(monkeypatch):
    cpu = torch.device("cpu")
    assert precision.choose("fp32", cpu, never).dtype is None
    assert precision.choose("bf16", cpu, never).dtype is torch.bfloat16
    assert precision.choose("auto", cpu, never, resumed="bf16").dtype is torch.bfloat16
    assert precision.choose("auto", cpu, never, resumed="fp32").dtype is None
    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: False)
    c = precision.choose("auto", cpu, never)
    assert c.dtype is None and "no avx512_bf16" in c.reason
    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: True)
    assert precision.choose("auto", cpu, lambda: {"fp32": 3295.0, "bf16": 1308.0}).name == "fp32"
    assert precision.choose("auto", cpu, lambda: {"fp32": 205.0, "bf16": 927.0}).name == "bf16"
    with pytest.raises(ValueError, match="fp16"):
        precision.choose("fp16", cpu, never)


def test_measuring_leaves_weights_gradients_and_rng_alone():
    torch.manual_seed(0)
    model = Transformer(preset("tiny"))
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    model.eval()
    rates = precision.measure(model, torch.device("cpu"), 2, 16, rounds=1)
    assert set(rates) == {"fp32", "bf16"} and all(r > 0 for r in rates.values())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(torch.equal(p.grad, torch.full_like(p, 0.5)) for p in model.parameters())
    assert torch.equal(torch.get_rng_state(), rng) and not model.training


def test_trainer_uses_the_measured_choice_and_a_resume_keeps_it(monkeypatch):
    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: True)
    rates = {"fp32": 1000.0, "bf16": 3000.0}
    monkeypatch.setattr(common, "measure", lambda *a, **k: dict(rates))
    model = Transformer(preset("tiny"))
    oc = OptimConfig(warmup=1)

    def trainer(**kw):
        return Trainer(model, build_optimizer(model, oc), oc, LossConfig(), 10, World(), "auto",
                       batch_shape=(4, 32), **kw)

    t = trainer()
    assert t.amp is torch.bfloat16 and t.state_dict()["precision"] == "bf16"
    rates.update(bf16=500.0)  # a later measurement would pick fp32 ...
    assert trainer().amp is None
    assert trainer(resumed_precision="bf16").amp is torch.bfloat16  # ... but a resumed run keeps bf16
    t = trainer()
    t.load_state_dict({"step": 3, "skipped": 0, "bad_in_a_row": 0, "precision": "bf16"})
    assert t.amp is torch.bfloat16 and t.step_num == 3


def test_bf16_steps_track_fp32_steps_to_bf16_tolerance():
    """bf16 training keeps fp32 master weights and optimizer state and computes in bf16: its first gradient
    points where fp32's does, and a few optimizer steps move the weights and the loss as fp32's do."""
    import copy

    torch.manual_seed(0)
    fp32 = Transformer(preset("tiny"))
    bf16 = copy.deepcopy(fp32)
    compiled = copy.deepcopy(fp32)  # bf16 with the blocks' dense parts compiled (--compile)
    start = {k: v.clone() for k, v in fp32.state_dict().items()}
    gen = torch.Generator().manual_seed(0)
    batches = [[(x, torch.roll(x, -1, 1))] for x in (torch.randint(0, 512, (4, 64), generator=gen) for _ in range(5))]
    x, y = batches[0][0]
    grads = {}
    for name, model, amp in (("fp32", fp32, False), ("bf16", bf16, True)):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            loss = model.loss(x, y).loss
        grads[name] = torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad], allow_unused=True)
    for a, b in zip(*grads.values()):
        if a is not None and a.abs().sum() > 0:
            assert torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.99

    oc = OptimConfig(warmup=1, lr=1e-3)
    runs = {}
    for name, model, computed in (("fp32", fp32, "fp32"), ("bf16", bf16, "bf16"), ("compiled", compiled, "bf16")):
        t = Trainer(model, build_optimizer(model, oc), oc, LossConfig(), 100, World(), computed,
                    compile=name == "compiled")
        assert all(p.dtype == torch.float32 for p in model.parameters())  # fp32 master weights
        runs[name] = [t.step(b)["loss"] for b in batches]
        assert all(v.dtype == torch.float32 for s in t.optim.opts[0].state.values() for v in s.values()
                   if torch.is_tensor(v) and v.dim())
    assert runs["bf16"] == pytest.approx(runs["fp32"], abs=2e-3)  # the losses move ~0.04 over these steps
    assert runs["compiled"] == pytest.approx(runs["fp32"], abs=2e-3)
    assert all(b.compiled_attend is not None for b in [*compiled.layers, compiled.mtp[0].block])
    moved = {n: {k: p.detach() - start[k] for k, p in m.named_parameters()}  # not the bias buffers: sign steps
             for n, m in (("fp32", fp32), ("bf16", bf16), ("compiled", compiled))}
    for k, d32 in moved["fp32"].items():
        if d32.norm() > 0:
            assert (moved["bf16"][k] - d32).norm() < 0.25 * d32.norm(), k
            assert (moved["compiled"][k] - d32).norm() < 0.25 * d32.norm(), k


def test_a_bf16_run_saves_fp32_masters_that_transformers_loads(tmp_path):
    import json

    pytest.importorskip("transformers")
    from conftest import assert_fp32_masters_transformers_reads, token_shards
    from nanoseek.cli import main

    data = token_shards(tmp_path)
    run = tmp_path / "run"
    assert main(["pretrain", "--preset", "tiny", "--data", str(data / "tokens"), "--tokenizer", str(data / "tok"),
                 "--out", str(run), "--batch-size", "2", "--seq-len", "32", "--steps", "4", "--precision", "bf16",
                 "--quiet"]) == 0
    assert json.loads((run / "precision.json").read_text())["precision"] == "bf16"
    assert_fp32_masters_transformers_reads(run)
