"""The engine's forward passes over the paged latent cache, beside the model they are proven equal to.

The model (`model.py`) has the MoE path training needs: token slots sorted by expert, one matmul per
expert (in bf16 on a CPU, each expert's rows padded to a multiple of 64). Inference over a few tokens
wants others, chosen here by how many (token, expert) pairs a step has and whether torch.compile is
tracing:

    dense     about as many pairs as experts: every expert on every token in two batched matmuls
    few       fewer pairs than that: visit each pair, read only the chosen experts' weights
    sorted    more: the model's own path
    gathered  in a compiled graph: each pair's weights indexed and fused into one loop

`trunk` and `mtp_hidden` are the engine's eager prefill, decode and draft (the model's layers with
this dispatch). `decode_step`, `decode_logits`, `draft_logits` and `greedy_speculative_step` are
pure functions of the cache pools and slot tensors, which the engine compiles: a graph that wrote
into the pools would copy them whole, so each returns the new latents for the engine to store.
tests/test_decode.py checks every one against the model's forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..model import MLA, MoE, Experts, Transformer, compute_dtype

# ---- MoE dispatch for inference ----------------------------------------------------------------


def dense_pays(experts: Experts, pairs: int) -> bool:
    """About as many (token, expert) pairs as experts (within 4x either way): two batched matmuls over
    every expert beat per-expert dispatch (docs/engine.md)."""
    E = experts.gate_up_proj.shape[0]
    return E <= 4 * pairs <= 16 * E


def experts_dense(experts: Experts, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """x (N, D) -> (N, D): every expert on every token, each output scaled by its routing weight (0 for
    experts not chosen), so the sum is the same as routing the token to its K experts."""
    xs = x.to(compute_dtype(x))
    mix = torch.zeros(x.shape[0], experts.gate_up_proj.shape[0], dtype=xs.dtype, device=x.device)
    mix = mix.scatter(1, indices, weights.to(xs.dtype))  # (N, E)
    gate, up = torch.matmul(xs, experts.gate_up_proj.mT).chunk(2, dim=-1)  # (E, N, I) each
    y = torch.bmm(F.silu(gate) * up, experts.down_proj.mT)  # (E, N, D)
    return (y * mix.T[:, :, None]).sum(0).to(x.dtype)


def experts_gathered(experts: Experts, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor
                     ) -> torch.Tensor:
    """x (N, D) -> (N, D): each token through the weights of its own K experts, indexed per pair. For
    compiled graphs: inductor reads the chosen weights through the index inside one fused loop, so only
    the routed experts' bytes move (eagerly the indexing copies the weights first: the slowest path).
    Products and sums rather than matmuls over the indexed weights, which inductor fuses better."""
    xs = x.to(compute_dtype(x))
    gate, up = (xs[:, None, None, :] * experts.gate_up_proj[indices]).sum(-1).chunk(2, -1)  # (N, K, I)
    y = ((F.silu(gate) * up)[..., None, :] * experts.down_proj[indices]).sum(-1)  # (N, K, D)
    return (y * weights[..., None].to(y.dtype)).sum(1).to(x.dtype)


def experts_few(experts: Experts, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """x (N, D) -> (N, D) over fewer pairs than experts: no sorting, only the chosen weights."""
    xs = x.to(compute_dtype(x))
    y = torch.zeros_like(xs)
    for n, (row, g) in enumerate(zip(indices.tolist(), weights.to(xs.dtype))):
        for k, e in enumerate(row):
            gate, up = (xs[n] @ experts.gate_up_proj[e].T).chunk(2, dim=-1)
            y[n] += g[k] * ((F.silu(gate) * up) @ experts.down_proj[e].T)
    return y.to(x.dtype)


def moe(layer: MoE, x: torch.Tensor) -> torch.Tensor:
    """The MoE layer's output (B, T, D) for inference (no router statistics), by the cheapest path."""
    B, T, D = x.shape
    flat = x.reshape(B * T, D)
    weights, indices, _ = layer.gate(flat)
    pairs, E = indices.numel(), layer.cfg.n_routed_experts
    if torch.compiler.is_compiling():
        y = experts_gathered(layer.experts, flat, weights, indices)
    elif dense_pays(layer.experts, pairs):
        y = experts_dense(layer.experts, flat, weights, indices)
    elif pairs < E:
        y = experts_few(layer.experts, flat, weights, indices)
    else:
        counts = torch.bincount(indices.flatten(), minlength=E)
        y = layer.experts(flat, weights, indices, counts.tolist())
    y = y.view(B, T, D)
    return y if layer.shared_experts is None else y + layer.shared_experts(x)


def feed_forward(block, x: torch.Tensor) -> torch.Tensor:
    return moe(block.mlp, x) if isinstance(block.mlp, MoE) else block.mlp(x)


# ---- eager: the model's layers over the cache --------------------------------------------------


def _block(block, h, cos, sin, cache, mask, absorb: bool) -> torch.Tensor:
    h = h + block.self_attn(block.input_layernorm(h), cos, sin, cache, block.layer_idx, mask, absorb)
    return h + feed_forward(block, block.post_attention_layernorm(h))


@torch.no_grad()
def trunk(model: Transformer, input_ids, start_pos, cache, mask, absorb: bool) -> torch.Tensor:
    """`model.trunk(input_ids, start_pos, cache, mask, absorb)`'s hidden states (B, T, D), for inference."""
    h = model.embed_tokens(input_ids)
    cos, sin = model.rope_from(start_pos, input_ids.shape[1], h.dtype)
    for block in model.layers:
        h = _block(block, h, cos, sin, cache, mask, absorb)
    return model.norm(h)


@torch.no_grad()
def mtp_hidden(model: Transformer, hidden, input_ids, start_pos, cache, mask, absorb: bool) -> torch.Tensor:
    """The first MTP module's output (B, T, D) over T positions per sequence: hidden (B, T, D) the main
    model's final-normed hidden states there, input_ids (B, T) the token after each."""
    mtp = model.mtp[0]
    h = mtp.eh_proj(torch.cat((mtp.enorm(model.embed_tokens(input_ids)), mtp.hnorm(hidden)), -1))
    cos, sin = model.rope_from(start_pos, input_ids.shape[1], h.dtype)
    return _block(mtp.block, h, cos, sin, cache, mask, absorb)


# ---- pure functions of the cache pools, for torch.compile ---------------------------------------


def decode_step(model: Transformer, input_ids, start_pos, c_cache, k_cache, write, read, mask, absorbed):
    """T new tokens per sequence over a paged latent cache (the engine's decode and speculative verify).
    Same result as `trunk(model, ..., absorb=True)`.

    input_ids (B, T) at positions start_pos (B,) on; c_cache (layers, slots, C) and k_cache (layers,
    slots, R) the cache pools, read-only here; write (B*T,) each new token's slot; read (B, S) each
    sequence's context slots, the new tokens' included; mask (B, 1, T, S) or None (causal);
    absorbed: each layer's `absorbed_weights()`. Returns the final-normed hidden (B, T, D) and the new
    latents (layers, B*T, C) and roped keys (layers, B*T, R) for the caller to store at `write`.
    """
    h = model.embed_tokens(input_ids)
    cos, sin = model.rope_from(start_pos, input_ids.shape[1], h.dtype)
    h, c_kv, k_pe = _over_cache(model.layers, h, cos, sin, c_cache, k_cache, write, read, mask, absorbed)
    return model.norm(h), c_kv, k_pe


def decode_logits(model: Transformer, input_ids, start_pos, c_cache, k_cache, write, read, mask, absorbed):
    """`decode_step` and the head, one graph when compiled: logits (B, T, V), the hidden (B, T, D) and
    the new latents."""
    h, c_kv, k_pe = decode_step(model, input_ids, start_pos, c_cache, k_cache, write, read, mask, absorbed)
    return model.lm_head(h), h, c_kv, k_pe


def draft_logits(model: Transformer, hidden, input_ids, start_pos, c_cache, k_cache, write, read, mask, absorbed,
                 last):
    """`mtp_hidden` over the cache pools, like `decode_step` (the engine's compiled speculative draft).
    Returns the MTP head's logits (B, V) at position `last` (B,) of each row (the next-but-one token's
    draft) and the MTP layer's new latents (1, B*T, C) and roped keys (1, B*T, R), for cache layer
    num_hidden_layers."""
    mtp = model.mtp[0]
    h = mtp.eh_proj(torch.cat((mtp.enorm(model.embed_tokens(input_ids)), mtp.hnorm(hidden)), -1))
    cos, sin = model.rope_from(start_pos, input_ids.shape[1], h.dtype)
    h, c_kv, k_pe = _over_cache([mtp.block], h, cos, sin, c_cache, k_cache, write, read, mask, absorbed)
    h = h.gather(1, last[:, None, None].expand(-1, 1, h.shape[-1]))[:, 0]
    return model.lm_head(mtp.shared_head.norm(h)), c_kv, k_pe


def greedy_speculative_step(model: Transformer, input_ids, drafts, start_pos, c_cache, k_cache, write, read, mask,
                            absorbed):
    """A whole greedy speculative step, verify and draft, as one pure function (one graph, one sync).

    input_ids (B, 2): each sequence's last token and its draft (any token where drafts is -1); drafts
    (B,): the draft, or -1 for a sequence that drafted none (its second position is padding, written
    to scratch). The main model's argmax at both positions are the targets; a draft is kept when it
    is the first. The MTP module then runs over both positions with the targets as the tokens that
    follow (a kept draft is its first target; after a rejection only the first position counts) and
    drafts from the last settled one. Returns the main model's log-probabilities (B, 2, V), targets
    (B, 2), next drafts (B,), and the new latents (layers + 1, B*2, C) and roped keys for every cache
    layer, MTP included. absorbed: the main layers' absorbed weights, then the MTP block's.
    """
    logits, h, c_kv, k_pe = decode_logits(model, input_ids, start_pos, c_cache, k_cache, write, read, mask,
                                          absorbed[:-1])
    targets = logits.argmax(-1)  # (B, 2)
    kept = targets[:, 0] == drafts
    draft, c_mtp, k_mtp = draft_logits(model, h, targets, start_pos, c_cache, k_cache, write, read, mask,
                                       absorbed[-1:], kept.long())
    return (logits.float().log_softmax(-1), targets, draft.argmax(-1), torch.cat((c_kv, c_mtp)),
            torch.cat((k_pe, k_mtp)))


def _over_cache(blocks, h, cos, sin, c_cache, k_cache, write, read, mask, absorbed):
    """Run `blocks` (absorbed attention) over h (B, T, D) whose tokens continue the contexts that `read`
    (B, S) gathers from the cache pools; the new tokens' latents overlay their `write` (B*T,) slots in
    the gathered context rather than being written into the pools. Returns h and the new latents
    (len(blocks), B*T, C) and roped keys (len(blocks), B*T, R)."""
    B, T = h.shape[:2]
    S = read.shape[1]
    slots = write.view(B, T)
    # a loop over T (at most 2) keeps T a constant for the compiler
    fresh = [(read == slots[:, t, None])[..., None] for t in range(T)]  # (B, S, 1): where token t lands
    new_c, new_k = [], []
    for layer, weights in zip(blocks, absorbed):
        attn: MLA = layer.self_attn
        x = layer.input_layernorm(h)
        c_kv, k_pe = attn.latents(x, cos, sin)  # (B, T, C), (B, T, R)
        new_c.append(c_kv.flatten(0, 1))
        new_k.append(k_pe.flatten(0, 1))
        context_c = c_cache[layer.layer_idx].index_select(0, read.flatten()).view(B, S, -1).to(c_kv.dtype)
        context_k = k_cache[layer.layer_idx].index_select(0, read.flatten()).view(B, S, -1).to(k_pe.dtype)
        for t, where in enumerate(fresh):
            context_c = torch.where(where, c_kv[:, t, None], context_c)
            context_k = torch.where(where, k_pe[:, t, None], context_k)
        h = h + attn.absorbed(x, cos, sin, context_c, context_k, mask, weights)
        h = h + feed_forward(layer, layer.post_attention_layernorm(h))
    return h, torch.stack(new_c), torch.stack(new_k)
