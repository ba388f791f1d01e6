"""Expert parallelism (DeepSeek-V3 §3.2): each rank holds 1/N of every MoE layer's routed experts.

    torchrun --nproc_per_node=2 -m nanoseek pretrain --expert-parallel 2 ...

Everything else stays data parallel: each rank runs attention, the gate and the shared experts on its
own micro-batch. In each MoE layer, a token goes once to every rank that owns one of its chosen
experts. An all-to-all carries the token's hidden state and its gate weights for that rank's
experts. That rank runs those experts and sums their weighted outputs, and a second all-to-all
brings the sums back, where they add up. Gradients flow back through the same two exchanges,
reversed.

Node-limited routing: with `n_group` a multiple of the ranks, each group of experts lives on one
rank, so choosing experts within `topk_group` groups (model.route) sends a token to at most
`topk_group` ranks. That is V3's "at most M nodes" rule, with a rank standing in for a node.

An expert shard's gradient already sums the tokens of every rank, so it is divided by the ranks
instead of all-reduced, and the gradient norm adds the shards' norms over the ranks. Checkpoints
gather the experts first, so they are the same HF model dir that one process writes.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from torch import nn

from ..model import Experts, MoE, Transformer, combine, expert_ffn
from .dist import World


def _exchange(x: torch.Tensor, send: list[int], recv: list[int]) -> torch.Tensor:
    """All-to-all over rows: send[r] rows of x (in rank order) go to rank r; recv[r] rows come from it."""
    out = x.new_empty((sum(recv), *x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), output_split_sizes=recv, input_split_sizes=send)
    return out


class AllToAll(torch.autograd.Function):
    """`_exchange` with a gradient: the rows' gradients travel back the way they came."""

    @staticmethod
    def forward(ctx, x, send: list[int], recv: list[int]):
        ctx.send, ctx.recv = send, recv
        return _exchange(x, send, recv)

    @staticmethod
    def backward(ctx, grad):
        return _exchange(grad, ctx.recv, ctx.send), None, None


class ShardedExperts(nn.Module):
    """This rank's E/N routed experts of one MoE layer (global ids rank*E/N ...), fed by all-to-all.

    Takes and returns what `Experts` does, so MoE runs either one unchanged."""

    def __init__(self, experts: Experts, rank: int, ranks: int):
        super().__init__()
        E = experts.gate_up_proj.shape[0]
        self.n, self.rank, self.ranks = E // ranks, rank, ranks
        lo = rank * self.n
        self.gate_up_proj = nn.Parameter(experts.gate_up_proj.detach()[lo:lo + self.n].clone())
        self.down_proj = nn.Parameter(experts.down_proj.detach()[lo:lo + self.n].clone())
        for p in (self.gate_up_proj, self.down_proj):
            p.expert_shard = True  # Trainer: not all-reduced; see the module docstring
        # the traffic: tokens routed, copies sent to other ranks, outputs they send back, most ranks one token visited
        self.tokens = self.sent = self.returned = self.widest = 0

    def forward(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, counts: list[int]):
        N, D = x.shape
        K = indices.shape[1]
        R, n = self.ranks, self.n
        owner = indices // n  # (N, K) the rank of each chosen expert
        goes = torch.zeros(N, R, dtype=torch.bool, device=x.device).scatter_(1, owner, True)  # (N, R)
        token, dest = goes.T.nonzero(as_tuple=True)[::-1]  # one (token, rank) copy each, by rank then token
        # a copy carries the token's hidden state and, per slot k, the local id of its expert there (or -1)
        ids = torch.where(owner[token] == dest[:, None], indices[token] % n, -1)  # (copies, K)
        send = self._counts(dest, R)  # copies to each rank
        recv = self._exchange_counts(send)
        rx = AllToAll.apply(x[token], send, recv)  # (P, D) copies from every rank
        rids = _exchange(ids, send, recv)  # (P, K)
        # one output comes back per chosen slot, in (copy, slot) order, and the weighted sum over a
        # token's K slots is taken at home, in the same order as one process takes it (Experts)
        out_send = self._counts(owner.reshape(-1), R)
        out_recv = self._exchange_counts(out_send)
        y = AllToAll.apply(self.local(rx, rids), out_recv, out_send)  # (N * K, D) by rank, then token and k
        slot = torch.arange(N * K, device=x.device).view(N, K)
        order = torch.cat([slot[owner == r] for r in range(R)])
        slots = x.new_zeros(N * K, D, dtype=y.dtype).index_copy(0, order, y).view(N, K, D)
        self.tokens += N
        self.sent += sum(send) - send[self.rank]
        self.returned += sum(out_send) - out_send[self.rank]
        self.widest = max(self.widest, int(goes.sum(1).max()) if N else 0)
        return combine(weights, slots).to(x.dtype)

    @staticmethod
    def _counts(ranks: torch.Tensor, R: int) -> list[int]:
        return torch.bincount(ranks, minlength=R).tolist()

    def _exchange_counts(self, send: list[int]) -> list[int]:
        """How many rows each rank will send here, given how many this rank sends each."""
        ones = [1] * self.ranks
        return _exchange(torch.tensor(send, device=self.down_proj.device), ones, ones).tolist()

    def local(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """FFN_e(x_p) for every copy p and slot whose local expert id e >= 0, in (copy, slot) order."""
        chosen = ids >= 0  # (P, K)
        position = chosen.view(-1).cumsum(0).view(chosen.shape) - 1  # (P, K) where each output goes
        # zeros that depend on x: with no rows here, the backward still runs this rank's side of both
        # all-to-alls, which the other ranks wait for
        out = x.new_zeros(int(chosen.sum()), x.shape[1]) + 0 * x.sum()
        for e in range(self.n):
            p, k = (ids == e).nonzero(as_tuple=True)
            if p.numel():
                y = expert_ffn(x[p], self.gate_up_proj[e], self.down_proj[e])
                out = out.index_copy(0, position[p, k], y.to(out.dtype))
        return out


def moe_layers(model: Transformer) -> list[MoE]:
    return [m for m in model.modules() if isinstance(m, MoE)]


def shard(model: Transformer, world: World) -> None:
    """Keep only this rank's experts in every MoE layer (the MTP modules' too)."""
    E = model.cfg.n_routed_experts
    if E % world.world_size:
        raise ValueError(f"--expert-parallel {world.world_size}: n_routed_experts={E} must be a multiple of it")
    for moe in moe_layers(model):
        moe.experts = ShardedExperts(moe.experts, world.rank, world.world_size)


def unshard(model: Transformer, world: World) -> None:
    """Every MoE layer holds all its experts again, gathered from the ranks."""
    for moe in moe_layers(model):
        shards = moe.experts
        if not isinstance(shards, ShardedExperts):
            continue
        full = Experts(model.cfg).to(shards.gate_up_proj.device)
        for name in ("gate_up_proj", "down_proj"):
            part = getattr(shards, name).detach()
            parts = [torch.empty_like(part) for _ in range(world.world_size)]
            dist.all_gather(parts, part.contiguous())
            getattr(full, name).data.copy_(torch.cat(parts))
        moe.experts = full


@contextlib.contextmanager
def gathered(model: Transformer, world: World):
    """Within it, the model holds all its experts (to save it); then its shards again, the same tensors."""
    keep = [(moe, moe.experts) for moe in moe_layers(model)]
    unshard(model, world)
    try:
        yield
    finally:
        for moe, shards in keep:
            moe.experts = shards


def is_sharded(p: torch.nn.Parameter) -> bool:
    return getattr(p, "expert_shard", False)


def traffic(model: Transformer, world: World) -> dict[str, float]:
    """The traffic since the last call, over all ranks, per token and MoE layer: copies of its hidden state
    sent to other ranks (dispatch) and expert outputs sent back (combine, one per chosen expert there),
    and the most ranks any token visited in one layer. Resets the counts."""
    layers = [m.experts for m in moe_layers(model) if isinstance(m.experts, ShardedExperts)]
    device = layers[0].down_proj.device
    t = torch.tensor([sum(x.tokens for x in layers), sum(x.sent for x in layers), sum(x.returned for x in layers)],
                     dtype=torch.float64, device=device)
    widest = torch.tensor([max((x.widest for x in layers), default=0)], dtype=torch.float64, device=device)
    if world.world_size > 1:
        dist.all_reduce(t)
        dist.all_reduce(widest, op=dist.ReduceOp.MAX)
    for x in layers:
        x.tokens = x.sent = x.returned = x.widest = 0
    tokens = t[0].clamp(min=1)
    return {"ep_remote_ranks_per_token": (t[1] / tokens).item(), "ep_returned_per_token": (t[2] / tokens).item(),
            "ep_most_ranks_per_token": int(widest.item())}
