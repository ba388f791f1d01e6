import math

import pytest
import torch
import torch.nn.functional as F

from nanoseek import LatentCache, Transformer, preset
from nanoseek.model import FEW_ROWS, MoE, linear, route


def test_logits_shape(tiny_model):
    x = torch.randint(0, 512, (3, 7))
    assert tiny_model(x).shape == (3, 7, 512)


@pytest.mark.parametrize("q_lora_rank, nope, v", [(None, 16, 16), (24, 16, 16), (24, 24, 12)])
def test_absorbed_equals_naive(q_lora_rank, nope, v):
    torch.manual_seed(1)
    model = Transformer(preset("tiny", q_lora_rank=q_lora_rank, qk_nope_head_dim=nope, v_head_dim=v)).eval()
    x = torch.randint(0, 512, (2, 13))
    with torch.no_grad():
        naive, absorbed = model(x), model(x, absorb=True)
    assert torch.allclose(naive, absorbed, atol=1e-5), (naive - absorbed).abs().max()


@pytest.mark.parametrize("absorb", [False, True])
def test_incremental_decode_equals_full_forward(tiny_model, absorb):
    x = torch.randint(0, 512, (2, 12))
    with torch.no_grad():
        full = tiny_model(x)
        cache = LatentCache(tiny_model.cfg, batch_size=2, max_len=16)
        steps = [tiny_model(x[:, :5], 0, cache, absorb=absorb)]  # prefill 5, then 3 + 1 + 1 + ...
        steps.append(tiny_model(x[:, 5:8], 5, cache, absorb=absorb))
        steps += [tiny_model(x[:, t:t + 1], t, cache, absorb=absorb) for t in range(8, 12)]
    assert torch.allclose(torch.cat(steps, 1), full, atol=1e-5)
    # only the latent and the rope key are cached: (C + R) per token per layer
    cfg = tiny_model.cfg
    assert cache.bytes_per_token() == (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 4 * (
        cfg.num_hidden_layers + cfg.num_nextn_predict_layers)


def test_cache_overflow_is_a_clear_error(tiny_model):
    cache = LatentCache(tiny_model.cfg, batch_size=1, max_len=4)
    with pytest.raises(ValueError, match="LatentCache full"):
        tiny_model(torch.zeros(1, 5, dtype=torch.long), 0, cache)


def test_bias_changes_choice_never_weights():
    cfg = preset("tiny", n_group=1, topk_group=1)
    torch.manual_seed(0)
    scores = torch.rand(64, cfg.n_routed_experts)
    w0, i0 = route(scores, torch.zeros(cfg.n_routed_experts), cfg)
    bias = torch.zeros(cfg.n_routed_experts)
    bias[3] = 10.0  # expert 3 is now always chosen
    w1, i1 = route(scores, bias, cfg)
    assert (i1 == 3).any(-1).all() and not torch.equal(i0, i1)
    # weights are the unbiased scores of the chosen experts, renormalised, times the scaling factor
    chosen = scores.gather(1, i1)
    assert torch.allclose(w1, chosen / chosen.sum(-1, keepdim=True) * cfg.routed_scaling_factor)
    assert torch.allclose(w1.sum(-1), torch.full((64,), cfg.routed_scaling_factor))


def test_group_limited_routing_picks_only_from_kept_groups():
    cfg = preset("tiny", n_routed_experts=16, n_group=4, topk_group=2, num_experts_per_tok=3)
    torch.manual_seed(0)
    scores = torch.rand(200, 16)
    _, idx = route(scores, None, cfg)
    groups = scores.view(200, 4, 4)
    kept = groups.topk(2, dim=-1).values.sum(-1).topk(2, dim=-1).indices  # V3: top-2 sum per group
    for t in range(200):
        assert set((idx[t] // 4).tolist()) <= set(kept[t].tolist())
    # V2 group-limited greedy scores a group by its max
    v2 = preset("tiny", n_routed_experts=16, n_group=4, topk_group=2, num_experts_per_tok=3,
                scoring_func="softmax", topk_method="group_limited_greedy", norm_topk_prob=False)
    probs = scores.softmax(-1)
    w, idx = route(probs, None, v2)
    kept = probs.view(200, 4, 4).amax(-1).topk(2, dim=-1).indices
    for t in range(200):
        assert set((idx[t] // 4).tolist()) <= set(kept[t].tolist())
    assert torch.allclose(w, probs.gather(1, idx) * v2.routed_scaling_factor)  # V2: no renormalisation


@pytest.mark.parametrize("scoring", ["sigmoid", "softmax"])
def test_moe_equals_slow_per_token_reference(scoring):
    extra = {} if scoring == "sigmoid" else dict(scoring_func="softmax", topk_method="group_limited_greedy",
                                                  norm_topk_prob=False)
    cfg = preset("tiny", n_shared_experts=2, **extra)
    torch.manual_seed(2)
    moe = MoE(cfg)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.2)
    if moe.gate.e_score_correction_bias is not None:
        moe.gate.e_score_correction_bias.normal_(0, 0.1)
    x = torch.randn(3, 5, cfg.hidden_size)
    y, stats = moe(x)
    weights, indices, _ = moe.gate(x.view(-1, cfg.hidden_size))
    I = cfg.moe_intermediate_size
    ref = torch.zeros(15, cfg.hidden_size)
    for t, xt in enumerate(x.view(-1, cfg.hidden_size)):
        for k in range(cfg.num_experts_per_tok):
            e = indices[t, k]
            g, u = moe.experts.gate_up_proj[e, :I], moe.experts.gate_up_proj[e, I:]
            ref[t] += weights[t, k] * (moe.experts.down_proj[e] @ (F.silu(g @ xt) * (u @ xt)))
        ref[t] += moe.shared_experts(xt)
    assert torch.allclose(y.view(-1, cfg.hidden_size), ref, atol=1e-5)
    with torch.no_grad():  # inference gathers from x and adds back per token instead of via slot order
        y_inference, _ = moe(x)
    assert torch.allclose(y_inference.view(-1, cfg.hidden_size), ref, atol=1e-5)
    assert stats.counts.sum() == 15 * cfg.num_experts_per_tok
    assert torch.equal(stats.counts, torch.bincount(indices.flatten(), minlength=cfg.n_routed_experts))


def test_grouped_experts_equal_one_gemm_per_expert():
    """The bf16 path (every expert's rows padded with zeros to a multiple of GROUP_ROWS) computes what the
    unpadded per-expert GEMMs do, forward and backward; run in fp32 here so that equal means equal to
    rounding. One expert gets no token."""
    from nanoseek.model import Experts, GROUP_ROWS, combine

    cfg = preset("tiny")
    torch.manual_seed(3)
    experts = Experts(cfg)
    for p in experts.parameters():
        torch.nn.init.normal_(p, std=0.2)
    N, K, E = 150, cfg.num_experts_per_tok, cfg.n_routed_experts
    # every token takes expert 0 (more than two groups of rows) and one of the others but expert 3
    indices = torch.stack([torch.tensor([0, [1, 2, 4, 5, 6, 7][i % 6]]) for i in range(N)])
    weights = torch.rand(N, K)
    counts = torch.bincount(indices.flatten(), minlength=E).tolist()
    assert counts[0] > 2 * GROUP_ROWS and counts[0] % GROUP_ROWS and counts[3] == 0
    x = torch.randn(N, cfg.hidden_size, requires_grad=True)
    slots = x.unsqueeze(1).expand(N, K, -1).reshape(N * K, -1)
    grouped = experts.grouped(slots, indices.flatten().argsort(stable=True), counts).view(N, K, -1)
    looped = experts(x, weights, indices, counts)  # fp32: one GEMM per expert
    ours = combine(weights, grouped)
    assert torch.allclose(ours, looped, atol=1e-5)
    g = torch.randn_like(looped)
    grads = [torch.autograd.grad(out, [x, *experts.parameters()], g) for out in (ours, looped)]
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-4), (a - b).abs().max()


def test_bf16_experts_take_padded_rows(tiny_model, monkeypatch):
    """In bf16 every routed expert's GEMMs run on a multiple of GROUP_ROWS rows (so oneDNN's per-shape
    kernels recur); in fp32 on the expert's own rows."""
    from nanoseek import model as M

    rows = []

    def recording(x, w13, w2):
        rows.append(x.shape[0])
        return ffn(x, w13, w2)

    ffn = M.expert_ffn
    monkeypatch.setattr(M, "expert_ffn", recording)
    counts = []
    moe_forward = M.MoE.forward

    def recording_moe(self, x):
        out = moe_forward(self, x)
        counts.extend(c for c in out[1].counts.tolist() if c)
        return out

    monkeypatch.setattr(M.MoE, "forward", recording_moe)
    x = torch.randint(0, 512, (4, 64), generator=torch.Generator().manual_seed(0))  # ~64 rows per expert
    for autocast in (False, True):
        rows.clear(), counts.clear()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            tiny_model.loss(x, torch.roll(x, -1, 1))
        padded = [-(-c // M.GROUP_ROWS) * M.GROUP_ROWS for c in counts] if autocast else counts
        assert sorted(rows) == sorted(padded), (rows, counts)
        assert len(set(padded)) > 1  # padding to the busiest expert's rows would fail here


@pytest.mark.parametrize("shape,dynamic,grad,in_graph", [
    ((1, 48), False, False, True), ((2, 48), False, False, True), ((FEW_ROWS, 48), False, False, True),
    ((1, 2, 48), False, False, True),  # (B, T, D) as the model passes it
    ((FEW_ROWS + 1, 48), False, False, False), ((2, 48), True, False, False), ((1, 48), False, True, False)])
def test_compiled_linear_takes_the_in_graph_loop_only_for_few_known_rows(shape, dynamic, grad, in_graph):
    """`linear` in a compiled graph: as products and sums (a fused loop, no matmul call in the
    generated code) when the rows are few and known when tracing and nothing needs gradients;
    F.linear's matmul otherwise (more rows, a batch dimension traced as symbolic, or autograd). The
    same numbers either way; eagerly always F.linear."""
    from torch._inductor.utils import run_and_get_code
    torch.manual_seed(0)
    x, w = torch.randn(*shape), torch.randn(96, 48, requires_grad=grad)
    fn = torch.compile(lambda x, w: linear(x, w) * 2, dynamic=dynamic)
    with torch.set_grad_enabled(grad):
        out, code = run_and_get_code(fn, x, w)
    code = "\n".join(code)
    assert "cpp_fused" in code  # the generated code came back (the * 2 at least is a fused kernel)
    assert torch.allclose(out, 2 * F.linear(x, w), atol=1e-5)
    assert ("mm(" not in code) == in_graph
    assert torch.equal(linear(x, w), F.linear(x, w))  # eager: always F.linear


def test_balance_loss_matches_formula():
    cfg = preset("tiny")
    moe = MoE(cfg)
    scores = torch.tensor([[[0.9, 0.1, 0.5, 0.5, 0.2, 0.2, 0.3, 0.3],
                            [0.1, 0.9, 0.5, 0.5, 0.2, 0.2, 0.3, 0.3]]])  # (B=1, T=2, E=8)
    idx = torch.tensor([[[0, 2], [1, 2]]])
    # f = E/(K T) * counts = 8/4 * [1, 1, 2, 0, ...]; P = mean over t of normalised scores
    f = torch.tensor([2.0, 2.0, 4.0, 0, 0, 0, 0, 0])
    p = (scores[0] / scores[0].sum(-1, keepdim=True)).mean(0)
    assert torch.allclose(moe.balance_loss(scores, idx), (f * p).sum())
    # perfectly balanced uniform routing gives exactly 1
    uniform = torch.full((1, 4, 8), 0.5)
    idx = torch.tensor([[[0, 1], [2, 3], [4, 5], [6, 7]]])
    assert torch.allclose(moe.balance_loss(uniform, idx), torch.tensor(1.0))


def test_mtp_loss_matches_hand_computation(tiny_model):
    torch.manual_seed(3)
    x = torch.randint(0, 512, (2, 9))
    y = torch.roll(x, -1, 1)
    y[:, -1] = -100
    y[0, 2] = -100  # masked positions are ignored by both losses
    out = tiny_model.loss(x, y, mtp_weight=0.5, balance_weight=0.01)
    # depth 1: position i combines h_i with Emb(x_{i+1}) and predicts y_{i+1}
    m = tiny_model
    h, _ = m.trunk(x)
    cos, sin = m.rope(torch.arange(8), h.dtype)
    hh = m.mtp[0].eh_proj(torch.cat((m.mtp[0].enorm(m.embed_tokens(x[:, 1:])), m.mtp[0].hnorm(h[:, :8])), -1))
    hh, _ = m.mtp[0].block(hh, cos, sin)
    logits = m.lm_head(m.mtp[0].shared_head.norm(hh))
    mtp = F.cross_entropy(logits.reshape(-1, 512), y[:, 1:].reshape(-1), ignore_index=-100)
    lm = F.cross_entropy(m.lm_head(h).reshape(-1, 512), y.reshape(-1), ignore_index=-100)
    assert torch.allclose(out.mtp_loss, mtp) and torch.allclose(out.lm_loss, lm)
    assert torch.allclose(out.loss, lm + 0.5 * mtp + 0.01 * out.balance_loss)
    assert out.expert_counts.shape == (2, 8)  # the MoE layer, then the MTP module's
    assert out.expert_counts.sum(-1).tolist() == [2 * 9 * 2, 2 * 8 * 2]


def test_uniform_head_gives_log_vocab_losses(tiny_model):
    with torch.no_grad():
        tiny_model.lm_head.weight.zero_()
    x = torch.randint(0, 512, (2, 6))
    out = tiny_model.loss(x, torch.roll(x, -1, 1))
    assert math.isclose(out.lm_loss.item(), math.log(512), rel_tol=1e-6)
    assert math.isclose(out.mtp_loss.item(), math.log(512), rel_tol=1e-6)


def test_mtp_sees_no_future_beyond_its_token(tiny_model):
    """The depth-1 prediction at position i may use tokens up to i+1, never i+2 or later."""
    x = torch.randint(0, 512, (1, 8))
    m = tiny_model

    def mtp_logits(ids):
        h, _ = m.trunk(ids)
        cos, sin = m.rope(torch.arange(7), h.dtype)
        hh, _ = m.mtp[0](h[:, :7], m.embed_tokens(ids[:, 1:]), cos, sin)
        return m.lm_head(m.mtp[0].shared_head.norm(hh))

    with torch.no_grad():
        a = mtp_logits(x)
        x2 = x.clone()
        x2[0, 5] = (x[0, 5] + 1) % 512
        b = mtp_logits(x2)
    assert torch.allclose(a[:, :4], b[:, :4], atol=1e-6)  # positions 0..3 see tokens <= 4 only
    assert not torch.allclose(a[:, 4], b[:, 4])  # position 4 sees token 5 through the embedding


def test_gradients_flow_but_not_into_the_bias(tiny_model):
    tiny_model.train()
    x = torch.randint(0, 512, (2, 8))
    tiny_model.loss(x, torch.roll(x, -1, 1)).loss.backward()
    assert all(p.grad is not None for n, p in tiny_model.named_parameters()), \
        [n for n, p in tiny_model.named_parameters() if p.grad is None]
    assert "e_score_correction_bias" not in dict(tiny_model.named_parameters()).keys().__str__()


def test_bf16_autocast_runs(tiny_model):
    x = torch.randint(0, 512, (2, 8))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = tiny_model.loss(x, torch.roll(x, -1, 1))
    assert torch.isfinite(out.loss)


@pytest.mark.parametrize("chunk", [3, 1024])
def test_linear_cross_entropy_equals_reference(chunk):
    from nanoseek.model import linear_cross_entropy
    torch.manual_seed(4)
    h = torch.randn(2, 7, 16, requires_grad=True)
    w = torch.randn(50, 16, requires_grad=True)
    t = torch.randint(0, 50, (2, 7))
    t[0, 3] = t[1, 6] = -100
    loss = linear_cross_entropy(h, w, t, chunk=chunk)
    (loss * 2).backward()  # a non-unit upstream gradient
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    ref = F.cross_entropy((h @ w.T).flatten(0, 1), t.flatten(), ignore_index=-100)
    (ref * 2).backward()
    assert torch.allclose(loss, ref, atol=1e-6)
    assert torch.allclose(gh, h.grad, atol=1e-6) and torch.allclose(gw, w.grad, atol=1e-6)


@pytest.mark.parametrize("absorb", [False, True])
def test_padded_batch_equals_one_by_one(tiny_model, absorb):
    """Prompts of different lengths in one batch (left-padded, per-sequence positions, a padding-aware
    causal mask) give each prompt's own logits: what the engine's batched prefill relies on."""
    torch.manual_seed(5)
    prompts = [torch.randint(0, 512, (n,)) for n in (7, 3, 5)]
    T = max(len(p) for p in prompts)
    ids = torch.zeros(3, T, dtype=torch.long)
    pad = torch.tensor([T - len(p) for p in prompts])
    for b, p in enumerate(prompts):
        ids[b, pad[b]:] = p
    keys = torch.arange(T)[None, :] >= pad[:, None]  # (B, S): real tokens
    mask = (torch.ones(T, T, dtype=torch.bool).tril()[None] & keys[:, None, :])[:, None]  # (B, 1, T, S)
    mask |= torch.eye(T, dtype=torch.bool)[None, None]  # pad queries see themselves: no empty rows
    with torch.no_grad():
        batched = tiny_model(ids, start_pos=-pad, mask=mask, absorb=absorb)
        for b, p in enumerate(prompts):
            alone = tiny_model(p[None])
            assert torch.allclose(batched[b, pad[b]:], alone[0], atol=1e-5), b


def test_a_bf16_model_runs_and_stays_close_to_fp32(tiny_model):
    """Weights in bf16 (not autocast): every path, the latent-cache decode too, runs in bf16."""
    import copy
    x = torch.randint(0, tiny_model.cfg.vocab_size, (2, 12))
    half = copy.deepcopy(tiny_model).to(torch.bfloat16)
    with torch.no_grad():
        want = tiny_model(x).log_softmax(-1)
        got = half(x).float().log_softmax(-1)
        cache = LatentCache(half.cfg, 2, 12, dtype=torch.bfloat16)
        half(x[:, :11], cache=cache)
        step = half(x[:, 11:], start_pos=11, cache=cache, absorb=True).float().log_softmax(-1)
    assert got.dtype == torch.float32 and (got - want).abs().max() < 0.15
    assert (step[:, 0] - want[:, 11]).abs().max() < 0.15


def test_attention_takes_the_fused_kernel_though_values_are_narrower(tiny_model):
    """MLA's values are narrower than its keys; padded to their width, SDPA runs its fused kernel in the
    forward and backward, with or without a cache mask, instead of the path that materialises every score."""
    from torch.profiler import profile

    cfg = tiny_model.cfg
    assert cfg.v_head_dim < cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
    x = torch.randint(0, 512, (2, 12))
    with profile() as prof:
        tiny_model.loss(x, torch.roll(x, -1, 1), 0.3, 1e-4).loss.backward()
        with torch.no_grad():
            cache = LatentCache(cfg, batch_size=2, max_len=16)
            tiny_model(x[:, :5], 0, cache)
            tiny_model(x[:, 5:9], 5, cache)  # queries against cached keys: an explicit mask
    names = {e.name for e in prof.events()}
    assert "aten::_scaled_dot_product_flash_attention_for_cpu" in names
    assert "aten::_scaled_dot_product_flash_attention_for_cpu_backward" in names
    assert "aten::_scaled_dot_product_attention_math" not in names
