"""The paged latent cache: batched prefill and decode over it equal full forwards, blocks come back."""

import pytest
import torch

from nanoseek.engine.cache import CacheFull, PagedLatentCache


def step(model, cache, seqs, new, absorb):
    """One forward of the batch `seqs`, each adding the tokens in `new[s]`; returns each one's last logits."""
    ids = list(seqs)
    T = max(len(new[s]) for s in ids)
    x = torch.zeros(len(ids), T, dtype=torch.long)
    for b, s in enumerate(ids):
        x[b, : len(new[s])] = torch.tensor(new[s])
    cache.bind(ids, [len(new[s]) for s in ids])
    with torch.no_grad():
        logits = model(x, start_pos=cache.start_positions(), cache=cache, mask=cache.mask(), absorb=absorb)
    cache.commit()
    return {s: logits[b, len(new[s]) - 1] for b, s in enumerate(ids)}


@pytest.mark.parametrize("absorb", [False, True])
def test_continuous_batching_over_the_paged_cache_equals_full_forward(tiny_model, absorb):
    torch.manual_seed(0)
    cache = PagedLatentCache(tiny_model.cfg, num_blocks=12, block_size=4)
    history = {"a": torch.randint(0, 512, (7,)).tolist(), "b": torch.randint(0, 512, (3,)).tolist()}
    for s in history:
        cache.add(s)
    out = step(tiny_model, cache, ["a", "b"], history, absorb)  # batched prefill of different lengths
    for t in range(6):
        if t == 2:  # "c" joins mid-run with its own prefill, "b" leaves
            cache.free("b")
            del history["b"]
            history["c"] = torch.randint(0, 512, (5,)).tolist()
            cache.add("c")
            out = {**out, **step(tiny_model, cache, ["c"], {"c": history["c"]}, absorb)}
        for s, logits in out.items():
            if s in history:
                with torch.no_grad():
                    full = tiny_model(torch.tensor([history[s]]))[0, -1]
                assert torch.allclose(logits, full, atol=1e-5), (t, s)
        new = {s: [int(out[s].argmax())] for s in history}
        for s in history:
            history[s] += new[s]
        out = step(tiny_model, cache, list(history), new, absorb)


def test_blocks_are_returned_and_exhaustion_is_an_error(tiny_model):
    cache = PagedLatentCache(tiny_model.cfg, num_blocks=4, block_size=4)
    cache.add("x")
    cache.bind(["x"], [10])  # 3 blocks
    cache.commit()
    assert len(cache.free_blocks) == 1 and cache.can_fit(["x"], [6]) and not cache.can_fit(["x"], [7])
    cache.add("y")
    with pytest.raises(CacheFull, match="needs 2 more blocks of 4 tokens but has 1 free"):
        cache.bind(["y"], [5])
    cache.truncate("x", 7)  # rolled back: blocks stay, the next tokens go to position 7
    assert cache.lengths["x"] == 7 and len(cache.free_blocks) == 1
    cache.bind(["x"], [2])
    assert cache.start_positions().tolist() == [7]
    cache.commit()
    with pytest.raises(ValueError, match="cannot truncate sequence 'x' of 9 tokens to 10"):
        cache.truncate("x", 10)
    cache.free("x")
    assert len(cache.free_blocks) == 4 and cache.free_tokens == 16
    cfg = tiny_model.cfg
    assert cache.bytes_per_token() == (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 4 * (
        cfg.num_hidden_layers + cfg.num_nextn_predict_layers)
    plain = PagedLatentCache(cfg, num_blocks=4, block_size=4, dtype=torch.bfloat16, mtp=False)  # no MTP layer
    assert plain.bytes_per_token() == (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 2 * cfg.num_hidden_layers


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
        got, c_kv, k_pe = tiny_model.decode_step(ids, pure_cache.start_positions(), pure_cache.c_kv,
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
        got, c_kv, k_pe = tiny_model.draft_logits(hidden, ids, pure.start_positions(), pure.c_kv, pure.k_pe, write,
                                                  read, pure.mask(), [mtp.block.self_attn.absorbed_weights()], last)
        pure.store(c_kv, k_pe, first=L)
        pure.commit()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(pure.c_kv, eager.c_kv, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(pure.k_pe, eager.k_pe, atol=1e-6, rtol=1e-5)
    assert pure.lengths == eager.lengths == contexts  # a lagging layer's forward moves no lengths
