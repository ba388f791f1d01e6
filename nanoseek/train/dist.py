"""torchrun data parallel with the same code as one process: gloo on CPU, NCCL on GPU.

    torchrun --nproc_per_node=2 -m nanoseek pretrain ...

Every rank holds the whole model; after backward, gradients are averaged across ranks in one
flat all-reduce, so every rank takes the identical optimizer step. Rank 0 alone writes files.
With --expert-parallel the routed experts are sharded over the ranks instead (ep.py).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class World:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0


def init() -> World:
    """Join the torchrun process group if there is one; else a world of one."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(f"cuda:{local}") if torch.cuda.is_available() else torch.device("cpu")
    if size > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        # metrics and counts are reduced as CPU tensors, which NCCL cannot do: gloo takes those
        dist.init_process_group(backend="cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo")
    return World(int(os.environ.get("RANK", "0")), size, local, device)


def average_gradients(params: list[torch.nn.Parameter], world: World, average: bool = True) -> None:
    """grad <- mean (or, with average=False, sum) over ranks, as one flat all-reduce."""
    if world.world_size == 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    if average:
        flat /= world.world_size
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def all_reduce(t: torch.Tensor, world: World, average: bool = False) -> torch.Tensor:
    if world.world_size > 1:
        dist.all_reduce(t)
        if average:
            t /= world.world_size
    return t


def gather_objects(obj, world: World) -> list:
    """Every rank's `obj`, in rank order, on every rank."""
    if world.world_size == 1:
        return [obj]
    out = [None] * world.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(world: World) -> None:
    if world.world_size > 1:
        dist.barrier()


def shutdown(world: World) -> None:
    if world.world_size > 1 and dist.is_initialized():
        dist.destroy_process_group()
