"""engine/decode.py, the engine's forward passes, against the model's own: MoE inference paths, the eager
trunk and MTP draft over the paged cache, and the pure decode functions the engine compiles."""

import pytest
import torch

from nanoseek import preset
from nanoseek.engine import decode
from nanoseek.engine.cache import PagedLatentCache
from nanoseek.model import MoE

from test_engine_cache import step


@pytest.mark.parametrize("tokens,path", [(1, "few"), (3, "few"), (15, "dense"), (100, "sorted")])
def test_moe_inference_paths_equal_the_training_path(tokens, path):
    """Eager inference (decode.moe) picks per-pair dispatch, all-experts-dense or sorted by how many (token,
    expert) pairs there are; every path, and the compiled graph's gathered one, gives the model's output."""
    cfg = preset("tiny", n_routed_experts=32, n_group=4, topk_group=2)  # 2 experts per token
    torch.manual_seed(3)
    moe = MoE(cfg)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.2)
    x = torch.randn(1, tokens, cfg.hidden_size)
    want, _ = moe(x)  # grad enabled: always the sorted path
    with torch.no_grad():
        pairs = tokens * cfg.num_experts_per_tok
        assert decode.dense_pays(moe.experts, pairs) == (path == "dense")
        assert (4 * pairs < cfg.n_routed_experts) == (path == "few")
        assert torch.allclose(decode.moe(moe, x), want, atol=1e-5)
        assert torch.allclose(moe(x)[0], want, atol=1e-5)
        flat = x[0]  # the compiled decode graph's path (per-pair gathered weights) gives the same
        weights, indices, _ = moe.gate(flat)
        assert torch.allclose(decode.experts_gathered(moe.experts, flat, weights, indices),
                              decode.experts_dense(moe.experts, flat, weights, indices), atol=1e-5)


@pytest.mark.parametrize("new", [[1, 1], [2, 1], [2, 2]])
def test_decode_step_equals_the_cached_trunk(tiny_model, new):
    """The pure decode step (what the engine compiles) gives the cached trunk's hidden states and leaves
    the same latents in the cache once they are stored, for a ragged batch, one or two new tokens a
    sequence (speculative verify feeds two)."""
    torch.manual_seed(1)
    caches = [PagedLatentCache(tiny_model.cfg, num_blocks=12, block_size=4, mtp=False) for _ in range(2)]
    prompts = {"a": torch.randint(0, 512, (7,)).tolist(), "b": torch.randint(0, 512, (2,)).tolist()}
    for cache in caches:
        for s in prompts:
            cache.add(s)
        step(tiny_model, cache, ["a", "b"], prompts, absorb=False)
    ids = torch.tensor([[5, 6], [9, 0]])[:, : max(new)]  # row b's first new[b] tokens count
    with torch.no_grad():
        trunk_cache, pure_cache = caches
        trunk_cache.bind(["a", "b"], new)
        want, _ = tiny_model.trunk(ids, start_pos=trunk_cache.start_positions(), cache=trunk_cache,
                                   mask=trunk_cache.mask(), absorb=True)
        trunk_cache.commit()
        pure_cache.bind(["a", "b"], new)
        write, read = pure_cache.slots()
        absorbed = [layer.self_attn.absorbed_weights() for layer in tiny_model.layers]
        got, c_kv, k_pe = decode.decode_step(tiny_model, ids, pure_cache.start_positions(), pure_cache.c_kv,
                                             pure_cache.k_pe, write, read, pure_cache.mask(), absorbed)
        pure_cache.store(c_kv, k_pe)
        pure_cache.commit()
    for b, n in enumerate(new):  # padding positions are nobody's
        assert torch.allclose(got[b, :n], want[b, :n], atol=1e-5)
    assert torch.allclose(pure_cache.c_kv, trunk_cache.c_kv, atol=1e-6)
    assert torch.allclose(pure_cache.k_pe, trunk_cache.k_pe, atol=1e-6)
    assert pure_cache.lengths == trunk_cache.lengths == {"a": 7 + new[0], "b": 2 + new[1]}


def test_draft_logits_equal_the_cached_mtp_module(tiny_model):
    """The pure MTP draft step (the engine's compiled draft) gives the eager MTP module's head logits at
    each row's chosen position and leaves the same latents in the MTP cache layer, for a ragged batch."""
    torch.manual_seed(2)
    cfg, D = tiny_model.cfg, tiny_model.cfg.hidden_size
    mtp, L = tiny_model.mtp[0], cfg.num_hidden_layers
    caches = [PagedLatentCache(cfg, num_blocks=12, block_size=4) for _ in range(2)]
    contexts = {"a": 6, "b": 3}
    context = torch.randn(L + 1, 2, 6, cfg.kv_lora_rank), torch.randn(L + 1, 2, 6, cfg.qk_rope_head_dim)
    for cache in caches:  # the same context already cached in both
        for s in contexts:
            cache.add(s)
        cache.bind(list(contexts), list(contexts.values()))
        for layer in range(L + 1):
            cache.update(layer, context[0][layer], context[1][layer])
        cache.commit()
    hidden, ids, new, last = torch.randn(2, 2, D), torch.tensor([[7, 8], [9, 0]]), [2, 1], torch.tensor([1, 0])
    with torch.no_grad():
        eager, pure = caches
        eager.bind(["a", "b"], new, starts=list(contexts.values()))
        positions = eager.start_positions()[:, None] + torch.arange(2)
        cos, sin = tiny_model.rope(positions, hidden.dtype)
        out, _ = mtp(hidden, tiny_model.embed_tokens(ids), cos, sin, eager, eager.mask(), absorb=True)
        eager.commit()
        want = tiny_model.lm_head(mtp.shared_head.norm(out[torch.arange(2), last]))
        pure.bind(["a", "b"], new, starts=list(contexts.values()))
        write, read = pure.slots()
        got, c_kv, k_pe = decode.draft_logits(tiny_model, hidden, ids, pure.start_positions(), pure.c_kv, pure.k_pe,
                                              write, read, pure.mask(), [mtp.block.self_attn.absorbed_weights()], last)
        pure.store(c_kv, k_pe, first=L)
        pure.commit()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(pure.c_kv, eager.c_kv, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(pure.k_pe, eager.k_pe, atol=1e-6, rtol=1e-5)
    assert pure.lengths == eager.lengths == contexts  # a lagging layer's forward moves no lengths


@pytest.mark.parametrize("absorb", [False, True])
def test_eager_trunk_and_mtp_equal_the_models_over_the_paged_cache(tiny_model, absorb):
    """decode.trunk and decode.mtp_hidden (the engine's eager prefill, decode and draft) give the model's
    trunk and MTP module's outputs over the same cache, for a ragged batch of prefills then one-token steps."""
    torch.manual_seed(4)
    caches = [PagedLatentCache(tiny_model.cfg, num_blocks=16, block_size=4) for _ in range(2)]
    L = tiny_model.cfg.num_hidden_layers
    mtp = tiny_model.mtp[0]
    feeds = [{"a": torch.randint(0, 512, (6,)).tolist(), "b": torch.randint(0, 512, (2,)).tolist()},
             {"a": [3], "b": [7]}, {"a": [11], "b": [2]}]
    for cache in caches:
        for s in feeds[0]:
            cache.add(s)
    for new in feeds:
        seqs, T = list(new), max(len(t) for t in new.values())
        ids = torch.tensor([new[s] + [0] * (T - len(new[s])) for s in seqs])
        lengths = [len(new[s]) for s in seqs]
        with torch.no_grad():
            outs = []
            for which, cache in enumerate(caches):
                cache.bind(seqs, lengths)
                start, mask = cache.start_positions(), cache.mask()
                if which == 0:
                    h, _ = tiny_model.trunk(ids, start_pos=start, cache=cache, mask=mask, absorb=absorb)
                else:
                    h = decode.trunk(tiny_model, ids, start, cache, mask, absorb)
                cache.commit()
                cache.bind(seqs, lengths, starts=start.tolist())
                if which == 0:
                    cos, sin = tiny_model.rope_from(start, T, h.dtype)
                    m, _ = mtp(h, tiny_model.embed_tokens(ids), cos, sin, cache, mask, absorb)
                else:
                    m = decode.mtp_hidden(tiny_model, h, ids, start, cache, mask, absorb)
                cache.commit()
                outs.append((h, m))
        for b, n in enumerate(lengths):  # padding positions are nobody's
            for want, got in zip(outs[0], outs[1]):
                torch.testing.assert_close(got[b, :n], want[b, :n], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(caches[1].c_kv, caches[0].c_kv, atol=1e-6, rtol=1e-5)
    assert caches[0].lengths == caches[1].lengths and L + 1 == caches[0].c_kv.shape[0]
