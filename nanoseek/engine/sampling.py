"""Per-sequence sampling: penalties, temperature, top-k, top-p, a seeded generator of its own.

Pure functions over one sequence's logits, so every sequence in a batch samples exactly as it
would alone: the same seed gives the same tokens whatever else is being decoded.
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


def distribution(logits: torch.Tensor, params: SamplingParams, counts: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(probs, logprobs) of one row of logits (V,): what `params` sample from, and the penalised model's
    log-probabilities (what is reported). Greedy is the one-hot distribution on the argmax. Computed
    on the CPU, as the counts and the seeded generators are (one row of V floats per token)."""
    logits = logits.float().cpu()
    if counts is not None:
        logits = apply_penalties(logits, counts, params.presence_penalty, params.frequency_penalty)
    logprobs = logits.log_softmax(-1)
    if params.greedy:
        return torch.zeros_like(logits).scatter_(0, logits.argmax().view(1), 1.0), logprobs
    scaled = logits / params.temperature
    if params.top_k and params.top_k < scaled.numel():
        kth = scaled.topk(params.top_k).values[-1]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    if params.top_p < 1:
        sorted_logits, order = scaled.sort(descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs >= params.top_p  # keep the smallest prefix reaching top_p
        drop[0] = False  # and always the likeliest token (a top_p below float32's smallest is 0 here)
        scaled = scaled.scatter(0, order[drop], float("-inf"))
    return scaled.softmax(-1), logprobs


def draw(probs: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None) -> int:
    if params.greedy:
        return int(probs.argmax())
    return int(torch.multinomial(probs, 1, generator=generator))


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None,
           counts: torch.Tensor | None = None) -> tuple[int, float]:
    """(token, its log-probability under the penalised model distribution) from one row of logits (V,)."""
    probs, logprobs = distribution(logits, params, counts)
    token = draw(probs, params, generator)
    return token, float(logprobs[token])


def verify(draft: int, q: torch.Tensor, p: torch.Tensor, params: SamplingParams,
           generator: torch.Generator | None = None) -> int | None:
    """Speculative sampling (Leviathan et al. 2023): keep a draft token drawn from q with probability
    min(1, p/q); None means rejected, and the caller draws from `residual(p, q)` instead.

    The tokens that come out are distributed exactly as p; with greedy p and q (one-hot) the draft is
    kept exactly when it is the target's argmax.
    """
    ratio = float(p[draft]) / max(float(q[draft]), 1e-30)
    if ratio >= 1:
        return draft
    if ratio == 0:
        return None
    u = float(torch.rand((), generator=generator))
    return draft if u < ratio else None


def residual(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """norm(max(p - q, 0)): what to draw from after a rejection."""
    r = (p - q).clamp_(min=0)
    total = r.sum()
    return r / total if total > 0 else p
