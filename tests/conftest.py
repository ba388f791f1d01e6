"""Shared fixtures: tiny models built from presets, never downloaded."""

import pytest
import torch

from nanoseek import Transformer, preset


@pytest.fixture
def tiny_model():
    torch.manual_seed(0)
    model = Transformer(preset("tiny")).eval()
    with torch.no_grad():  # a non-zero balancing bias, so tests see it take effect
        for layer in model.layers:
            gate = getattr(layer.mlp, "gate", None)
            if gate is not None:
                gate.e_score_correction_bias.normal_(0, 0.05)
    return model


def train_tiny(ids: list[int], steps: int, seed: int = 0) -> Transformer:
    """tiny trained for a few seconds (AdamW, 8 random windows of 64 tokens a step) on one token
    stream: enough to learn a repetitive text, its MTP module included."""
    torch.manual_seed(seed)
    model = Transformer(preset("tiny"))
    ids = torch.tensor(ids)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(steps):
        starts = torch.randint(0, len(ids) - 65, (8,))
        out = model.loss(torch.stack([ids[i:i + 64] for i in starts]), torch.stack([ids[i + 1:i + 65] for i in starts]))
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    return model.eval()


def token_shards(root):
    """A small generated corpus, curated and tokenized byte-level: ROOT/tokens, ROOT/tok."""
    from nanoseek.data.corpus import write_corpus
    from nanoseek.data.curate import curate
    from nanoseek.data.shards import tokenize_dir
    from nanoseek.tokenizer import Tokenizer

    write_corpus(root / "raw", 0.4, seed=0)
    curate([root / "raw"], root / "curated", workers=1)
    Tokenizer.byte_level().save(root / "tok")
    tokenize_dir(root / "curated", root / "tok", root / "tokens", workers=1)
    return root


def assert_fp32_masters_transformers_reads(run):
    """RUN's model holds fp32 weights (the masters, whatever the run computed in), and transformers
    loads the dir with the same logits as nanoseek."""
    import transformers

    from nanoseek import load_model

    ours = load_model(run).eval()
    assert all(p.dtype == torch.float32 for p in ours.parameters())
    hf = transformers.DeepseekV3ForCausalLM.from_pretrained(run, dtype=torch.float32).eval()
    x = torch.randint(0, 265, (1, 20))
    with torch.no_grad():
        assert (hf(x).logits - ours(x)).abs().max() <= 1e-4
