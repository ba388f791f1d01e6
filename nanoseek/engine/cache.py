"""The paged latent KV cache: per token per layer only the latent c_KV (C) and the roped key (R).

Fixed-size blocks come from one preallocated pool; a sequence holds a table of blocks that grows
as it does, and gives them back when it finishes or is cancelled. A forward pass over a batch of
sequences goes:

    cache.bind(seq_ids, new_tokens)      # reserve room, plan where the new tokens go
    model(ids, start_pos=cache.start_positions(), cache=cache, mask=cache.mask())
    cache.commit()                       # the new tokens now count as cached

`update(layer, c_kv, k_pe)` (called by every MLA layer) writes the new latents into their slots
and returns each sequence's whole context gathered and right-padded to the longest, (B, S, C)
and (B, S, R); `mask()` hides the padding. Nothing is ever expanded per head.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import ModelConfig


@dataclass
class _Plan:
    """Where one forward's new tokens go (write slots) and what each sequence reads (read slots)."""
    seq_ids: list
    new_tokens: list[int]
    starts: list[int]
    write: torch.Tensor  # (B*T,) slot of each new token, padding -> the scratch block
    read: torch.Tensor  # (B, S) slots of each sequence's context, right-padded with scratch
    advance: bool  # commit() moves the sequences' lengths
    span: slice | None  # a lone sequence in consecutive blocks reads a view, no gather


class CacheFull(RuntimeError):
    """Not enough free blocks for what was asked; the message says how many were missing."""


class PagedLatentCache:
    def __init__(self, cfg: ModelConfig, num_blocks: int, block_size: int = 16, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu", mtp: bool = True):
        """mtp: also cache the MTP layers (cache layers num_hidden_layers...), for speculative decoding."""
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks and block_size must be >= 1 (got {num_blocks}, {block_size})")
        self.layers = cfg.num_hidden_layers + (cfg.num_nextn_predict_layers if mtp else 0)
        self.block_size, self.num_blocks = block_size, num_blocks
        slots = (num_blocks + 1) * block_size  # + one scratch block where padding writes land
        self.c_kv = torch.zeros(self.layers, slots, cfg.kv_lora_rank, dtype=dtype, device=device)
        self.k_pe = torch.zeros(self.layers, slots, cfg.qk_rope_head_dim, dtype=dtype, device=device)
        self.scratch = num_blocks * block_size
        self.free_blocks = list(range(num_blocks - 1, -1, -1))  # a stack: pop() hands out ascending blocks
        self.tables: dict[object, list[int]] = {}
        self.lengths: dict[object, int] = {}
        self._batch = None

    # ---- sequences -------------------------------------------------------------------------
    def add(self, seq_id) -> None:
        if seq_id in self.tables:
            raise ValueError(f"sequence {seq_id!r} is already in the cache")
        self.tables[seq_id], self.lengths[seq_id] = [], 0

    def free(self, seq_id) -> None:
        """Give every block of a finished or cancelled sequence back to the pool, at once."""
        self.free_blocks += reversed(self.tables.pop(seq_id))
        del self.lengths[seq_id]

    def blocks_needed(self, seq_id, new_tokens: int, start: int | None = None) -> int:
        have = len(self.tables[seq_id]) * self.block_size
        start = self.lengths[seq_id] if start is None else start
        return max(0, -(-(start + new_tokens - have) // self.block_size))

    def truncate(self, seq_id, length: int) -> None:
        """Forget a sequence's tokens from `length` on (rejected speculative drafts); its blocks stay."""
        if not 0 <= length <= self.lengths[seq_id]:
            raise ValueError(f"cannot truncate sequence {seq_id!r} of {self.lengths[seq_id]} tokens to {length}")
        self.lengths[seq_id] = length

    def can_fit(self, seq_ids, new_tokens) -> bool:
        return sum(self.blocks_needed(s, n) for s, n in zip(seq_ids, new_tokens)) <= len(self.free_blocks)

    # ---- one forward ---------------------------------------------------------------------------
    def bind(self, seq_ids: list, new_tokens: list[int], starts: list[int] | None = None) -> None:
        """Reserve blocks for `new_tokens[i]` more tokens of each sequence and plan the next forward.

        `starts` places the new tokens at other positions than each sequence's end (layers that
        lag behind, such as the MTP module's during speculative decoding); then commit() leaves
        the lengths alone.
        """
        advance = starts is None
        starts = [self.lengths[s] for s in seq_ids] if starts is None else list(starts)
        needs = [self.blocks_needed(s, n, p) for s, n, p in zip(seq_ids, new_tokens, starts)]
        if sum(needs) > len(self.free_blocks):
            raise CacheFull(f"the KV cache needs {sum(needs)} more blocks of {self.block_size} tokens but has "
                            f"{len(self.free_blocks)} free; finish or cancel sequences, or build a larger cache")
        for s, need in zip(seq_ids, needs):
            for _ in range(need):
                self.tables[s].append(self.free_blocks.pop())
        ends = [p + n for p, n in zip(starts, new_tokens)]
        read = self._slots(seq_ids, ends)  # (B, S)
        S, T = read.shape[1], max(new_tokens)
        at = torch.tensor(starts)[:, None] + torch.arange(T)  # (B, T) where each new token lands
        fed = torch.arange(T) < torch.tensor(new_tokens)[:, None]
        write = torch.where(fed, read.gather(1, at.clamp(max=S - 1)), self.scratch)  # (B, T)
        first = int(read[0, 0])
        contiguous = len(seq_ids) == 1 and bool((read[0] == torch.arange(first, first + S)).all())
        device = self.c_kv.device  # the slot indices live beside the pools they index (one copy per step)
        self._batch = _Plan(list(seq_ids), list(new_tokens), starts, write.flatten().to(device), read.to(device),
                            advance, slice(first, first + S) if contiguous else None)

    def _slots(self, seq_ids: list, ends: list[int]) -> torch.Tensor:
        """(B, max(ends)): the first ends[b] cache slots of each sequence, from its block table, then the
        scratch slot. A few tensor ops for the whole batch, not a loop over sequences: this runs
        every decode step."""
        S, size = max(ends), self.block_size
        n = -(-S // size)
        tables = [self.tables[s][:n] for s in seq_ids]
        blocks = torch.tensor([t + [0] * (n - len(t)) for t in tables])  # (B, n)
        slots = (blocks[:, :, None] * size + torch.arange(size)).flatten(1)[:, :S]
        return torch.where(torch.arange(S) < torch.tensor(ends)[:, None], slots, self.scratch)

    def start_positions(self) -> torch.Tensor:
        """(B,) the position of each sequence's first new token."""
        return torch.tensor(self._batch.starts)

    def mask(self) -> torch.Tensor | None:
        """(B, 1, T, S): new token t of sequence b sees that sequence's cached tokens and its own up to t.

        None when the plain causal rule says the same: every sequence at the same position with the
        same number of new tokens (a lone sequence, or a decode step of equal lengths).
        """
        plan = self._batch
        if len(set(plan.starts)) == 1 and len(set(plan.new_tokens)) == 1:
            return None
        new, T, S = plan.new_tokens, max(plan.new_tokens), plan.read.shape[1]
        start = self.start_positions()[:, None, None]  # (B, 1, 1)
        q = torch.arange(T)[None, :, None] + start  # (B, T, 1) absolute query positions
        k = torch.arange(S)[None, None, :]
        valid = torch.tensor(new)[:, None, None] > torch.arange(T)[None, :, None]
        m = (k <= q) & valid
        m |= ~valid & (k == 0)  # padding queries see one key, so no row is empty
        return m[:, None]

    def update(self, layer_idx: int, c_kv: torch.Tensor, k_pe: torch.Tensor):
        write, read = self._batch.write, self._batch.read
        self.c_kv[layer_idx].index_copy_(0, write, c_kv.reshape(-1, c_kv.shape[-1]).to(self.c_kv.dtype))
        self.k_pe[layer_idx].index_copy_(0, write, k_pe.reshape(-1, k_pe.shape[-1]).to(self.k_pe.dtype))
        if self._batch.span is not None:
            span = self._batch.span
            return self.c_kv[layer_idx, span][None].to(c_kv.dtype), self.k_pe[layer_idx, span][None].to(k_pe.dtype)
        B, S = read.shape
        c = self.c_kv[layer_idx].index_select(0, read.flatten()).view(B, S, -1)
        k = self.k_pe[layer_idx].index_select(0, read.flatten()).view(B, S, -1)
        return c.to(c_kv.dtype), k.to(k_pe.dtype)

    def slots(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The bound forward's write slots (B*T,) and read slots (B, S), for callers that gather themselves
        (the engine's decode graph) and then `store` what they computed."""
        return self._batch.write, self._batch.read

    def store(self, c_kv: torch.Tensor, k_pe: torch.Tensor, first: int = 0) -> None:
        """Write the bound forward's new latents (n, B*T, C) and roped keys (n, B*T, R) into layers
        first..first+n-1."""
        layers, write = slice(first, first + c_kv.shape[0]), self._batch.write
        self.c_kv[layers, write] = c_kv.to(self.c_kv.dtype)
        self.k_pe[layers, write] = k_pe.to(self.k_pe.dtype)

    def commit(self) -> None:
        plan = self._batch
        if plan.advance:
            for s, n, p in zip(plan.seq_ids, plan.new_tokens, plan.starts):
                self.lengths[s] = p + n
        self._batch = None

    # ---- accounting ------------------------------------------------------------------------------
    def bytes_per_token(self) -> int:
        """(kv_lora_rank + qk_rope_head_dim) x layers x element size: nothing per head."""
        return self.layers * (self.c_kv.shape[-1] + self.k_pe.shape[-1]) * self.c_kv.element_size()

    @property
    def free_tokens(self) -> int:
        return len(self.free_blocks) * self.block_size
