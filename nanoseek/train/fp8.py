"""FP8 training of the linear layers, with DeepSeek-V3's fine-grained scaling (V3 §3.3, Figures 6-7).

Each linear layer's three GEMMs take E4M3 inputs and accumulate in fp32:

    forward  Y  = X  @ W^T   X scaled per 1 x 128 tile (a token's 128 channels), W per 128 x 128 block
    dgrad    dX = dY @ W     dY per 1 x 128 tile (a token's 128 output channels), W per 128 x 128 block
    wgrad    dW = dY^T @ X   dY and X per 128 x 1 tile (one channel over 128 tokens)

A scale always groups along the dimension the GEMM sums over, so a GEMM can apply it to each
128-long partial sum (V3's promotion to fp32 every 128 elements; with fp32 accumulation throughout,
as here, nothing is lost between promotions). A group's scale is its largest magnitude over 448,
E4M3's largest value, so one outlier coarsens only its own 128 (or 128 x 128) values: that is the
point of fine-grained scaling, and `scaling="tensor"` (one scale per tensor, per GEMM operand) is
there to show what it buys.

What V3 keeps in higher precision stays there: the embedding, the output head, the MoE gate, the
norms and the attention core never pass through here (model.py routes only its linear layers and
experts through `linear` / `matmul_nt`); master weights, gradients and optimizer states stay fp32.

On the CPU (and a GPU without FP8 GEMMs) the quantisation is simulated exactly: cast to
`torch.float8_e4m3fn` and back with the scales, then an fp32 matmul. On a Hopper GPU, `kernel="auto"`
runs the GEMMs as real scaled FP8 GEMMs (`torch._scaled_mm`'s blockwise recipes) where torch takes
the shapes, and `benchmarks/gpu_check.py` compares the two. Run as `--precision fp8` of
`nanoseek pretrain` and `nanoseek sft`; docs/fp8.md has the design and the measurements.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max
TILE = 128
TINY = 1e-12  # the scale of an all-zero group: its values quantise to 0 either way
SCALINGS = ("fine", "tensor")


@dataclass(frozen=True)
class Recipe:
    scaling: str = "fine"  # "fine": V3's tiles and blocks; "tensor": one scale per operand
    kernel: str = "simulate"  # "simulate", or "auto": real FP8 GEMMs where the device and torch have them

    def __post_init__(self):
        if self.scaling not in SCALINGS:
            raise ValueError(f"fp8 scaling must be one of {', '.join(SCALINGS)} (got {self.scaling!r})")
        if self.kernel not in ("simulate", "auto"):
            raise ValueError(f"fp8 kernel must be simulate or auto (got {self.kernel!r})")


# ---- quantisation ---------------------------------------------------------------------------------

def quantize(x: torch.Tensor, rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x (R, C) -> E4M3 values (R, C) and fp32 scales (ceil(R/rows), ceil(C/cols)), one per rows x cols
    group (the last group of a dimension may be short); x ~= values * scale of its group."""
    R, C = x.shape
    rows, cols = min(rows, R), min(cols, C)
    gr, gc = -(-R // rows), -(-C // cols)
    x = x.float()
    padded = F.pad(x, (0, gc * cols - C, 0, gr * rows - R))  # zeros change no group's max
    groups = padded.view(gr, rows, gc, cols)  # (gr, rows, gc, cols)
    scale = (groups.abs().amax(dim=(1, 3)) / E4M3_MAX).clamp(min=TINY)  # (gr, gc)
    q = (groups / scale[:, None, :, None]).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)
    return q.view(gr * rows, gc * cols)[:R, :C], scale


def dequantize(q: torch.Tensor, scale: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """The fp32 values that E4M3 `q` with its group `scale`s stands for (the inverse of `quantize`)."""
    R, C = q.shape
    rows, cols = min(rows, R), min(cols, C)
    full = scale.repeat_interleave(rows, 0)[:R].repeat_interleave(cols, 1)[:, :C]  # (R, C)
    return q.float() * full


def groups(scaling: str, shape: tuple[int, int], kind: str) -> tuple[int, int]:
    """The rows x cols of one scaling group of a GEMM operand of `shape` (its rows summed over the
    columns): kind "tile" (1 x 128) or "block" (128 x 128); under "tensor" scaling, the whole operand."""
    if scaling == "tensor":
        return shape
    return {"tile": (1, TILE), "block": (TILE, TILE)}[kind]


def fake_quantize(x: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """x as the FP8 GEMM sees it: quantised to E4M3 with its group scales and back, in fp32."""
    q, s = quantize(x, rows, cols)
    return dequantize(q, s, rows, cols)


# ---- the GEMMs ------------------------------------------------------------------------------------

def has_fp8_gemm(device: torch.device) -> bool:
    """Real blockwise-scaled FP8 GEMMs: torch's are for Hopper (sm_90)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) == (9, 0)


def _scaled_mm(a: torch.Tensor, a_kind: str, b: torch.Tensor, b_kind: str) -> torch.Tensor | None:
    """a (M, K) @ b (N, K)^T as one real FP8 GEMM, a grouped by `a_kind` and b by `b_kind` ("tile" or
    "block"), both along K; None where torch's kernel does not take these shapes (then the caller
    simulates). The result is bf16, as V3's GEMMs write it."""
    (M, K), N = a.shape, b.shape[0]
    if M % TILE or N % TILE or K % (4 * TILE):
        # torch (2.11) takes other shapes too but returned wrong values for K = 256 on an H200: its
        # scale layouts want every dimension whole tiles and K/128 a multiple of 4 (16-byte strides)
        return None
    try:
        qa, sa = quantize(a, *groups("fine", a.shape, a_kind))
        qb, sb = quantize(b, *groups("fine", b.shape, b_kind))
        # the layouts torch's blockwise recipes expect: a row-major, b column-major (K, N); a tile's
        # scales outer-dim-major, a block's scales inner-dim-major
        sa = sa.t().contiguous().t() if a_kind == "tile" else sa.contiguous()
        sb = sb.t().contiguous().t() if b_kind == "tile" else sb.contiguous()
        return torch._scaled_mm(qa.contiguous(), qb.contiguous().t(), sa, sb.t(), out_dtype=torch.bfloat16)
    except (RuntimeError, NotImplementedError, ValueError):
        return None


GEMMS = {"kernel": 0, "simulated": 0}  # how the FP8 GEMMs of this process ran, for reports


def matmul_nt(a: torch.Tensor, b: torch.Tensor, a_kind: str, b_kind: str, recipe: Recipe) -> torch.Tensor:
    """a (M, K) @ b (N, K)^T in fp32, each operand quantised per its groups along K."""
    if recipe.kernel == "auto" and recipe.scaling == "fine" and has_fp8_gemm(a.device):
        out = _scaled_mm(a, a_kind, b, b_kind)
        if out is not None:
            GEMMS["kernel"] += 1
            return out.float()
    GEMMS["simulated"] += 1
    fa = fake_quantize(a, *groups(recipe.scaling, a.shape, a_kind))
    fb = fake_quantize(b, *groups(recipe.scaling, b.shape, b_kind))
    with torch.autocast(a.device.type, enabled=False):  # the products of E4M3 values sum in fp32
        return fa @ fb.T


class FP8Linear(torch.autograd.Function):
    """y = x @ w^T with the three GEMMs in FP8 (the module docstring's table). x (N, in), w (out, in)."""

    @staticmethod
    def forward(ctx, x, w, recipe: Recipe):
        ctx.save_for_backward(x, w)
        ctx.recipe = recipe
        return matmul_nt(x, w, "tile", "block", recipe).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        x, w = ctx.saved_tensors
        r = ctx.recipe
        g = grad.float()
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dx = matmul_nt(g, w.T, "tile", "block", r).to(x.dtype)  # dY (N, out) @ W (out, in)
        if ctx.needs_input_grad[1]:
            # dY^T (out, N) @ X (N, in): both grouped over 128 tokens, the sum's dimension
            dw = matmul_nt(g.T, x.float().T, "tile", "tile", r).to(w.dtype)
        return dx, dw, None


_active: Recipe | None = None


@contextlib.contextmanager
def autocast(recipe: Recipe | None):
    """Within it, the model's linear layers and experts train in FP8 under `recipe` (None: off)."""
    global _active
    before, _active = _active, recipe
    try:
        yield
    finally:
        _active = before


def active() -> Recipe | None:
    """The recipe in force: only while training (gradients on); inference keeps the model's dtype."""
    return _active if torch.is_grad_enabled() else None


def linear(x: torch.Tensor, w: torch.Tensor, recipe: Recipe) -> torch.Tensor:
    """x (..., in) @ w (out, in)^T through FP8Linear."""
    y = FP8Linear.apply(x.reshape(-1, x.shape[-1]), w, recipe)  # (N, out)
    return y.view(*x.shape[:-1], w.shape[0])
