"""Per-sequence sampling: penalties, temperature, top-k, top-p, a seeded generator of its own.

Pure functions over a batch of rows of logits, each row with its own parameters and generator;
every row's numbers are what it would get alone, so the same seed gives the same tokens
whatever else is being decoded.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class SamplingParams:
    temperature: float = 1.0  # 0 means greedy
    top_k: int = 0  # 0: no top-k cut
    top_p: float = 1.0
    seed: int | None = None
    max_tokens: int = 256
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: bool = False  # report each chosen token's log-probability
    top_logprobs: int = 0  # and the k likeliest alternatives at each step (<= 20)
    prompt_logprobs: int | None = None  # None: off; k: each prompt token's log-probability and top k
    ignore_eos: bool = False  # keep going past end-of-sentence (benchmarks: a fixed number of tokens)

    @property
    def greedy(self) -> bool:
        """Temperatures below 1e-5 are greedy too: dividing logits by them overflows to inf."""
        return self.temperature < 1e-5

    def validate(self) -> "SamplingParams":
        """Raise ValueError naming the first parameter out of range."""
        checks = [
            ("temperature", self.temperature >= 0, "must be >= 0 (0 is greedy)"),
            ("top_k", isinstance(self.top_k, int) and self.top_k >= 0, "must be an integer >= 0 (0 turns it off)"),
            ("top_p", 0 < self.top_p <= 1, "must be in (0, 1]"),
            ("max_tokens", isinstance(self.max_tokens, int) and self.max_tokens >= 1, "must be an integer >= 1"),
            ("presence_penalty", -2 <= self.presence_penalty <= 2, "must be in [-2, 2]"),
            ("frequency_penalty", -2 <= self.frequency_penalty <= 2, "must be in [-2, 2]"),
            ("stop", all(isinstance(s, str) and s for s in self.stop), "must be non-empty strings"),
            ("top_logprobs", isinstance(self.top_logprobs, int) and 0 <= self.top_logprobs <= 20,
             "must be an integer in [0, 20]"),
            ("prompt_logprobs", self.prompt_logprobs is None or (isinstance(self.prompt_logprobs, int)
                                                                 and 0 <= self.prompt_logprobs <= 20),
             "must be None or an integer in [0, 20]"),
        ]
        for name, ok, rule in checks:
            if not ok:
                raise ValueError(f"{name} {rule} (got {getattr(self, name)!r})")
        return self

    def generator(self, device: str | torch.device = "cpu") -> torch.Generator | None:
        if self.seed is None:
            return None
        return torch.Generator(device=device).manual_seed(self.seed)


def apply_penalties(logits: torch.Tensor, counts: torch.Tensor, presence: float, frequency: float) -> torch.Tensor:
    """OpenAI's penalties: logit -= presence * [count > 0] + frequency * count, per token (V,)."""
    if presence == 0 and frequency == 0:
        return logits
    return logits - presence * (counts > 0).to(logits.dtype) - frequency * counts.to(logits.dtype)


def distributions(logits: torch.Tensor, params: list[SamplingParams], counts: list | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(probs, logprobs) (B, V) for rows of logits (B, V), row b as params[b] says: what it samples
    from, and the penalised model's log-probabilities (what is reported). A greedy row's distribution
    is one-hot on its argmax. Computed on the CPU, where the counts and the seeded generators are, in
    one pass over the batch; each row's numbers are the same whatever rows share its batch."""
    logits = logits.float().cpu()
    if counts is not None and any(c is not None for c in counts):
        logits = torch.stack([row if c is None else apply_penalties(row, c, p.presence_penalty, p.frequency_penalty)
                              for row, c, p in zip(logits, counts, params)])
    logprobs = logits.log_softmax(-1)
    sampled = [b for b, p in enumerate(params) if not p.greedy]
    if len(sampled) == len(params):
        return _sampling_probs(logits, params), logprobs
    probs = torch.zeros_like(logits)
    greedy = torch.tensor([b for b, p in enumerate(params) if p.greedy])
    probs[greedy, logits[greedy].argmax(-1)] = 1.0
    if sampled:
        probs[sampled] = _sampling_probs(logits[sampled], [params[b] for b in sampled])
    return probs, logprobs


def _sampling_probs(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Temperature, then top-k, then top-p, per row of logits (B, V); the rows' probabilities."""
    V = logits.shape[-1]
    scaled = logits / torch.tensor([p.temperature for p in params])[:, None]
    ks = torch.tensor([p.top_k if 0 < p.top_k < V else 0 for p in params])
    if ks.any():
        kth = scaled.topk(int(ks.max()), -1).values.gather(1, (ks.clamp(min=1) - 1)[:, None])  # (B, 1)
        scaled = scaled.masked_fill((ks > 0)[:, None] & (scaled < kth), float("-inf"))
    top_p = torch.tensor([p.top_p for p in params])
    if (top_p < 1).any():
        sorted_logits, order = scaled.sort(-1, descending=True)
        nucleus = sorted_logits.softmax(-1)
        drop = (nucleus.cumsum(-1) - nucleus >= top_p[:, None]) & (top_p < 1)[:, None]  # smallest prefix reaching p
        drop[:, 0] = False  # and always the likeliest token (a top_p below float32's smallest is 0 here)
        scaled = scaled.masked_fill(torch.zeros_like(drop).scatter(1, order, drop), float("-inf"))
    return scaled.softmax(-1)


def distribution(logits: torch.Tensor, params: SamplingParams, counts: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """`distributions` for one row of logits (V,)."""
    probs, logprobs = distributions(logits[None], [params], [counts])
    return probs[0], logprobs[0]


def draws(probs: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]) -> list[int]:
    """One token per row of probs (B, V). A sampled row takes one uniform number u from its own
    generator (the global one when None) and picks the first token whose cumulative probability
    exceeds u times the row's total (inverse-CDF sampling, in float64): one random number per token,
    where torch.multinomial draws one per vocabulary entry."""
    tokens = probs.argmax(-1).tolist()  # greedy rows: their one-hot's token
    sampled = [b for b, p in enumerate(params) if not p.greedy]
    if not sampled:
        return tokens
    cdf = probs[sampled].double().cumsum(-1)
    u = torch.stack([torch.rand((), dtype=torch.float64, generator=generators[b]) for b in sampled])
    picked = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True)[:, 0]
    for b, row, token in zip(sampled, cdf, picked.tolist()):
        # u * total can round up to total: then the last token with probability left, never one without
        tokens[b] = token if token < row.shape[0] else int(torch.searchsorted(row, row[-1]))
    return tokens


def draw(probs: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None) -> int:
    """`draws` for one row of probs (V,)."""
    return draws(probs[None], [params], [generator])[0]


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None,
           counts: torch.Tensor | None = None) -> tuple[int, float]:
    """(token, its log-probability under the penalised model distribution) from one row of logits (V,)."""
    probs, logprobs = distribution(logits, params, counts)
    token = draw(probs, params, generator)
    return token, float(logprobs[token])


def verify(draft: int, q: torch.Tensor | None, p: torch.Tensor, params: SamplingParams,
           generator: torch.Generator | None = None) -> int | None:
    """Speculative sampling (Leviathan et al. 2023): keep a draft token drawn from q with probability
    min(1, p/q); None means rejected, and the caller draws from `residual(p, q)` instead. q None: the
    draft was greedy (q one-hot on it).

    The tokens that come out are distributed exactly as p; with greedy p and q (one-hot) the draft is
    kept exactly when it is the target's argmax.
    """
    ratio = float(p[draft]) / (1.0 if q is None else max(float(q[draft]), 1e-30))
    if ratio >= 1:
        return draft
    if ratio == 0:
        return None
    u = float(torch.rand((), generator=generator))
    return draft if u < ratio else None


def residual(p: torch.Tensor, q: torch.Tensor | None, draft: int | None = None) -> torch.Tensor:
    """norm(max(p - q, 0)): what to draw from after a rejection. q None: one-hot on `draft`."""
    if q is None:
        q = torch.zeros_like(p)
        q[draft] = 1.0
    r = (p - q).clamp_(min=0)
    total = r.sum()
    return r / total if total > 0 else p
