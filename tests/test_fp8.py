"""FP8 training (train/fp8.py): scales, the E4M3 cast, the three GEMMs against a slow reference and
against fp32 within the quantisation error, and `--precision fp8` end to end."""

import json

import pytest
import torch

from conftest import assert_fp32_masters_transformers_reads, token_shards
from nanoseek import Transformer, preset
from nanoseek.cli import main
from nanoseek.train import fp8
from nanoseek.train.fp8 import E4M3, E4M3_MAX, Recipe

U = 2.0 ** -4  # E4M3's relative rounding error: 3 mantissa bits, round to nearest
SUB = 2.0 ** -10  # half the spacing of E4M3's subnormals (2^-9), in units of a group's scale


def test_tile_and_block_scales_are_each_groups_max_over_448():
    x = torch.zeros(3, 200)
    x[0, 5], x[0, 130] = -7.0, 3.0  # row 0: tile 0 (columns 0-127) and the short tile 1 (128-199)
    x[2, 199] = 896.0
    _, s = fp8.quantize(x, 1, 128)
    assert s.shape == (3, 2)
    tiny = fp8.TINY
    assert torch.equal(s, torch.tensor([[7.0, 3.0], [tiny * 448, tiny * 448], [tiny * 448, 896.0]]) / 448)
    w = torch.zeros(300, 130)
    w[0, 0], w[129, 1], w[299, 129] = 1.0, -44.8, 4.48
    _, s = fp8.quantize(w, 128, 128)
    assert s.shape == (3, 2)
    tiny = fp8.TINY * 448
    assert torch.equal(s, torch.tensor([[1.0, tiny], [44.8, tiny], [tiny, 4.48]]) / 448)


def test_values_round_trip_through_e4m3_as_torch_casts_them():
    torch.manual_seed(0)
    x = torch.randn(4, 256) * 3
    x[:, ::128] = E4M3_MAX  # every tile's max is 448: scale 1, so the values are cast as they are
    q, s = fp8.quantize(x, 1, 128)
    assert torch.equal(s, torch.ones(4, 2)) and q.dtype is E4M3
    assert torch.equal(q.view(torch.uint8), x.to(E4M3).view(torch.uint8))
    assert torch.equal(fp8.dequantize(q, s, 1, 128), x.to(E4M3).float())
    y = torch.randn(4, 256)
    q, s = fp8.quantize(y, 1, 128)
    back = fp8.dequantize(q, s, 1, 128)
    assert torch.equal(q.view(torch.uint8), fp8.quantize(back, 1, 128)[0].view(torch.uint8))  # a fixed point
    assert q.float().abs().max() <= E4M3_MAX


def test_an_outlier_changes_only_its_own_tile_or_block():
    torch.manual_seed(1)
    x = torch.randn(256, 384)
    _, tiles = fp8.quantize(x, 1, 128)
    _, blocks = fp8.quantize(x, 128, 128)
    x[200, 300] = 1e4
    _, tiles2 = fp8.quantize(x, 1, 128)
    _, blocks2 = fp8.quantize(x, 128, 128)
    assert (tiles2 != tiles).nonzero().tolist() == [[200, 2]]
    assert (blocks2 != blocks).nonzero().tolist() == [[1, 2]]
    _, whole = fp8.quantize(x, *x.shape)  # one scale per tensor: the outlier coarsens every value
    assert torch.equal(whole, torch.tensor([[1e4]]) / 448)


def slow_fake_quantize(x, rows, cols):
    """Group by group, with Python loops: the scale, the E4M3 cast and back."""
    x = x.float()
    out = torch.empty_like(x)
    for i in range(0, x.shape[0], rows):
        for j in range(0, x.shape[1], cols):
            g = x[i:i + rows, j:j + cols]
            scale = max(g.abs().max().item() / 448.0, fp8.TINY)
            scale = torch.tensor(scale, dtype=torch.float32)
            out[i:i + rows, j:j + cols] = (g / scale).clamp(-448, 448).to(E4M3).float() * scale
    return out


def reference_linear(x, w, scaling):
    """y = x w^T, dx, dw for an upstream gradient g, each GEMM's operands fake-quantised by the loops."""
    def groups(shape, kind):
        return shape if scaling == "tensor" else {"tile": (1, 128), "block": (128, 128)}[kind]

    def mm(a, b, ka, kb):
        return slow_fake_quantize(a, *groups(a.shape, ka)) @ slow_fake_quantize(b, *groups(b.shape, kb)).T

    return lambda g: (mm(x, w, "tile", "block"), mm(g, w.T, "tile", "block"), mm(g.T, x.T, "tile", "tile"))


@pytest.mark.parametrize("scaling", ["fine", "tensor"])
def test_fp8_linear_equals_the_slow_reference_bit_for_bit(scaling):
    torch.manual_seed(2)
    x = torch.randn(300, 200, requires_grad=True)  # short last tiles and blocks in every dimension
    w = (torch.randn(260, 200) * 0.05).requires_grad_()
    g = torch.randn(300, 260)
    y = fp8.FP8Linear.apply(x, w, Recipe(scaling))
    y.backward(g)
    ry, rdx, rdw = reference_linear(x.detach(), w.detach(), scaling)(g)
    assert torch.equal(y, ry) and torch.equal(x.grad, rdx) and torch.equal(w.grad, rdw)


def error_bound(a, b, a_groups, b_groups):
    """|fake(a) fake(b)^T - a b^T| elementwise, bounded: each value is off by at most U of itself or
    half a subnormal step of its group's scale, and the two errors compound."""
    def err(t, rows, cols):
        _, s = fp8.quantize(t, rows, cols)
        full = s.repeat_interleave(rows, 0)[:t.shape[0]].repeat_interleave(cols, 1)[:, :t.shape[1]]
        return torch.maximum(U * t.abs(), SUB * full)
    ea, eb = err(a, *a_groups), err(b, *b_groups)
    return ea @ (b.abs() + eb).T + a.abs() @ eb.T


@pytest.mark.parametrize("scaling", ["fine", "tensor"])
def test_the_three_gemms_are_within_the_quantisation_error_of_fp32(scaling):
    torch.manual_seed(3)
    x, w, g = torch.randn(256, 384), torch.randn(512, 384) * 0.05, torch.randn(256, 512) * 1e-3
    x[7, 11] = 60.0  # an outlier, as activations have
    r = Recipe(scaling)

    def grp(t, kind):
        return fp8.groups(scaling, t.shape, kind)

    for a, b, ka, kb in [(x, w, "tile", "block"), (g, w.T, "tile", "block"), (g.T, x.T, "tile", "tile")]:
        exact = a.double() @ b.double().T
        got = fp8.matmul_nt(a, b, ka, kb, r).double()
        bound = error_bound(a.double(), b.double(), grp(a, ka), grp(b, kb))
        slack = 1e-5 * (a.abs().double() @ b.abs().double().T)  # fp32 summation
        assert ((got - exact).abs() <= bound + slack).all()
        assert (got - exact).abs().max() > 0  # it did quantise


def test_fine_scaling_beats_tensor_scaling_with_an_outlier():
    torch.manual_seed(4)
    x, w = torch.randn(256, 256), torch.randn(256, 256) * 0.05
    x[0, 0] = 1e5  # past E4M3's range over 1: under one scale, the other values fall to subnormals
    exact = x @ w.T
    err = {s: (fp8.matmul_nt(x, w, "tile", "block", Recipe(s)) - exact)[1:].norm() / exact[1:].norm()
           for s in fp8.SCALINGS}
    assert err["fine"] < 0.05 and err["tensor"] > 2 * err["fine"]  # measured on the rows without the outlier


def test_the_model_trains_in_fp8_only_where_v3_does():
    torch.manual_seed(5)
    model = Transformer(preset("tiny"))
    ids = torch.randint(512, (2, 24))
    before = dict(fp8.GEMMS)
    with fp8.autocast(Recipe()):
        out = model.loss(ids, ids.roll(-1, 1))
        out.loss.backward()
        with torch.no_grad():  # inference keeps the model's dtype
            model(ids)
    ran = {k: fp8.GEMMS[k] - before[k] for k in before}
    c = model.cfg
    dense = c.first_k_dense_replace * 3 + (c.num_hidden_layers - c.first_k_dense_replace) * 3 * c.n_shared_experts
    attn = 4 * c.num_hidden_layers  # q, kv_a, kv_b, o (no q_lora in tiny)
    mtp = 1 + 4 + 3  # eh_proj, the MTP block's attention and shared expert
    assert ran["kernel"] == 0 and ran["simulated"] % 3 == 0  # forward, dgrad, wgrad each
    assert ran["simulated"] // 3 >= dense + attn + mtp  # ... plus the routed experts that got tokens
    assert fp8.active() is None  # off outside the context
    assert model.embed_tokens.weight.grad is not None


def test_small_pretrains_in_fp8_and_saves_a_normal_model_dir_transformers_loads(tmp_path):
    pytest.importorskip("transformers")
    data = token_shards(tmp_path)
    run = tmp_path / "run"
    assert main(["pretrain", "--preset", "small", "--data", str(data / "tokens"), "--tokenizer", str(data / "tok"),
                 "--out", str(run), "--batch-size", "2", "--seq-len", "32", "--steps", "4", "--precision", "fp8",
                 "--fp8-scaling", "fine", "--quiet"]) == 0
    assert json.loads((run / "precision.json").read_text())["precision"] == "fp8"
    assert json.loads((run / "train_args.json").read_text())["fp8_scaling"] == "fine"
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all(r["loss"] == r["loss"] for r in rows)
    assert_fp32_masters_transformers_reads(run)


def test_shapes_torchs_blockwise_kernel_got_wrong_stay_simulated():
    # on an H200 (torch 2.11) the kernel took K = 256 and returned wrong values (docs/fp8.md)
    for (M, K, N) in [(128, 256, 128), (100, 512, 128), (128, 512, 100)]:
        assert fp8._scaled_mm(torch.randn(M, K), "tile", torch.randn(N, K), "block") is None
    assert not fp8.has_fp8_gemm(torch.device("cpu"))
