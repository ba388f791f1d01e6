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
