"""Sampling: greedy, temperature, top-k, top-p, penalties, seeds, parameter errors."""

import pytest
import torch

from nanoseek.engine.sampling import (SamplingParams, apply_penalties, distribution, distributions, draw, residual,
                                      sample, verify)
from nanoseek.engine.sampling import draws as draw_rows

LOGITS = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0])


def draws(params, n=2000, seed=0, logits=LOGITS):
    g = torch.Generator().manual_seed(seed)
    return [sample(logits, params, g)[0] for _ in range(n)]


def test_greedy_is_argmax_with_its_logprob():
    token, lp = sample(LOGITS, SamplingParams(temperature=0))
    assert token == 0 and lp == pytest.approx(float(LOGITS.log_softmax(-1)[0]))


def test_top_k_restricts_the_support():
    assert set(draws(SamplingParams(top_k=2))) == {0, 1}


def test_top_p_keeps_the_smallest_nucleus():
    probs = LOGITS.softmax(-1)  # 0.52, 0.19, 0.12, 0.07, 0.03 (rounded)
    assert set(draws(SamplingParams(top_p=0.5))) == {0}
    assert set(draws(SamplingParams(top_p=0.6))) == {0, 1}
    assert probs[0] < 0.6 < probs[0] + probs[1]
    assert set(draws(SamplingParams(top_p=5e-324), n=50)) == {0}  # 0 in float32: still the likeliest token
    assert set(draws(SamplingParams(temperature=2.7e-235), n=50)) == {0}  # logits / t would overflow: greedy


def test_temperature_sharpens_and_flattens():
    cold = draws(SamplingParams(temperature=0.2)).count(0)
    hot = draws(SamplingParams(temperature=5.0)).count(0)
    assert cold > 1900 and hot < 700


def test_frequencies_follow_the_distribution():
    counts = torch.bincount(torch.tensor(draws(SamplingParams(), n=20000)), minlength=5) / 20000
    assert torch.allclose(counts, LOGITS.softmax(-1), atol=0.015)


def test_same_seed_same_tokens():
    p = SamplingParams(seed=42)
    g1, g2 = p.generator(), p.generator()
    assert [sample(LOGITS, p, g1)[0] for _ in range(30)] == [sample(LOGITS, p, g2)[0] for _ in range(30)]
    assert draws(p, 30, seed=1) != draws(p, 30, seed=2)


def test_a_batch_samples_each_row_exactly_as_alone():
    """The engine samples a whole batch in one pass: every row's distribution and seeded tokens must be
    what that row gives on its own, whatever its neighbours ask for."""
    torch.manual_seed(0)
    logits = torch.randn(6, 300) * 3
    params = [SamplingParams(seed=1), SamplingParams(temperature=0), SamplingParams(temperature=0.7, top_k=5, seed=2),
              SamplingParams(top_p=0.8, seed=3), SamplingParams(temperature=1.3, top_k=40, top_p=0.9, seed=4),
              SamplingParams(frequency_penalty=1.5, presence_penalty=0.5, seed=5)]
    counts = [None, None, None, None, None, torch.randint(0, 3, (300,))]
    probs, logprobs = distributions(logits, params, counts)
    for b, p in enumerate(params):
        alone = distribution(logits[b], p, counts[b])
        assert torch.equal(probs[b], alone[0]) and torch.equal(logprobs[b], alone[1])
    assert (probs[2] > 0).sum() == 5 and (probs[1] > 0).sum() == 1
    batch_gens, alone_gens = [p.generator() for p in params], [p.generator() for p in params]
    for _ in range(50):
        tokens = draw_rows(probs, params, batch_gens)
        assert tokens == [draw(probs[b], p, g) for b, (p, g) in enumerate(zip(params, alone_gens))]
        assert all(probs[b, t] > 0 for b, t in enumerate(tokens))


def test_draws_never_pick_a_token_without_probability():
    probs = torch.tensor([[0.0, 0.25, 0.0, 0.75, 0.0, 0.0]])
    params, g = [SamplingParams()], torch.Generator().manual_seed(0)
    seen = torch.bincount(torch.tensor([draw_rows(probs, params, [g])[0] for _ in range(4000)]), minlength=6) / 4000
    assert seen[[0, 2, 4, 5]].sum() == 0 and abs(float(seen[3]) - 0.75) < 0.03


def test_speculative_sampling_keeps_the_target_distribution():
    """Draft from q, keep with min(1, p/q), else draw from norm(max(p - q, 0)): the tokens follow p."""
    params = SamplingParams()
    p, _ = distribution(LOGITS, params)
    q, _ = distribution(torch.tensor([-1.0, 0.0, 2.0, 1.0, 0.5]), params)  # a poor draft model
    g = torch.Generator().manual_seed(0)
    tokens, kept = [], 0
    for _ in range(20000):
        d = draw(q, params, g)
        t = verify(d, q, p, params, g)
        kept += t is not None
        tokens.append(t if t is not None else draw(residual(p, q), params, g))
    freq = torch.bincount(torch.tensor(tokens), minlength=5) / 20000
    assert torch.allclose(freq, p, atol=0.015)
    assert kept / 20000 == pytest.approx(float(torch.minimum(p, q).sum()), abs=0.015)  # acceptance = sum min(p, q)


def test_greedy_speculation_keeps_exactly_the_argmax():
    greedy = SamplingParams(temperature=0)
    p, _ = distribution(LOGITS, greedy)
    q, _ = distribution(torch.tensor([0.0, 3.0, 0.0, 0.0, 0.0]), greedy)
    assert verify(0, p, p, greedy) == 0 and verify(1, q, p, greedy) is None
    assert draw(residual(p, q), greedy) == 0


def test_penalties():
    counts = torch.tensor([3, 0, 1, 0, 0])
    out = apply_penalties(LOGITS, counts, presence=0.5, frequency=0.25)
    assert out.tolist() == pytest.approx([2.0 - 0.5 - 0.75, 1.0, 0.5 - 0.5 - 0.25, 0.0, -1.0])
    token, _ = sample(LOGITS, SamplingParams(temperature=0, frequency_penalty=2.0), counts=counts)
    assert token == 1


@pytest.mark.parametrize("changes, name", [
    ({"temperature": -0.1}, "temperature"), ({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p"),
    ({"top_k": -1}, "top_k"), ({"max_tokens": 0}, "max_tokens"), ({"presence_penalty": 3}, "presence_penalty"),
    ({"frequency_penalty": -2.5}, "frequency_penalty"), ({"stop": [""]}, "stop"),
])
def test_bad_parameters_name_themselves(changes, name):
    with pytest.raises(ValueError, match=f"^{name} "):
        SamplingParams(**changes).validate()
    assert SamplingParams().validate().temperature == 1.0
