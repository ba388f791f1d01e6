"""Continuous batching over the paged latent cache: requests join and leave between decode steps.

    engine = Engine(model, tokenizer, max_running=16)
    rid = engine.add("What is 2 + 2?", SamplingParams(temperature=0, max_tokens=32))
    while engine.has_work():
        for out in engine.step():        # one prefill of newly admitted requests + one decode step
            print(out.delta, end="")

Each step admits waiting requests while there is room (max_running, and cache blocks for the
prompt plus max_tokens, reserved up front so decoding never runs out), prefills them in one batched forward (naive MLA path), then decodes
every running request by one token in one batched forward over the cached latents (absorbed
MLA path). A request finishes on end-of-sentence, a stop token id, a stop string or max_tokens;
finishing or cancelling returns its cache blocks at once.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch

from ..model import Transformer
from ..tokenizer import Tokenizer
from .cache import PagedLatentCache
from .sampling import SamplingParams, sample
from .stream import TextStream


@dataclass
class Request:
    id: int
    prompt: list[int]
    params: SamplingParams
    output: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish_reason: str | None = None
    generator: torch.Generator | None = None
    counts: torch.Tensor | None = None
    stream: TextStream | None = None


@dataclass
class Output:
    id: int
    token: int | None  # None when the request finished without a new token (a stop string, cancel)
    delta: str  # text safe to show now
    logprob: float | None
    finish_reason: str | None  # stop | length | cancelled, once finished


class Engine:
    def __init__(self, model: Transformer, tokenizer: Tokenizer, max_running: int = 16, block_size: int = 16,
                 num_blocks: int | None = None):
        self.model, self.tok = model.eval(), tokenizer
        cfg = model.cfg
        self.max_len = cfg.max_position_embeddings
        blocks = num_blocks or max_running * -(-self.max_len // block_size)
        dtype = next(model.parameters()).dtype
        self.cache = PagedLatentCache(cfg, blocks, block_size, dtype=dtype, device=next(model.parameters()).device)
        self.max_running = max_running
        self.waiting: list[Request] = []
        self.running: dict[int, Request] = {}
        self.ids = itertools.count()

    def add(self, prompt: str | list[int], params: SamplingParams | None = None) -> int:
        params = (params or SamplingParams()).validate()
        ids = self.tok.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise ValueError("prompt must not be empty")
        if len(ids) >= self.max_len:
            raise ValueError(f"prompt has {len(ids)} tokens; the model's context is {self.max_len}")
        vocab = self.model.cfg.vocab_size
        need = -(-min(len(ids) + params.max_tokens, self.max_len) // self.cache.block_size)
        if need > self.cache.num_blocks:
            raise ValueError(f"max_tokens: prompt ({len(ids)}) + max_tokens ({params.max_tokens}) need {need} cache "
                             f"blocks but the cache has {self.cache.num_blocks}; lower max_tokens")
        req = Request(next(self.ids), ids, params, generator=params.generator(),
                      counts=torch.zeros(vocab, dtype=torch.long), stream=TextStream(self.tok, params.stop))
        self.waiting.append(req)
        return req.id

    def cancel(self, rid: int) -> bool:
        """Stop a request now and give its cache blocks back; False if it is unknown or done."""
        for req in self.waiting:
            if req.id == rid:
                self.waiting.remove(req)
                return True
        if rid in self.running:
            self.cache.free(rid)
            self.running.pop(rid).finish_reason = "cancelled"
            return True
        return False

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    @torch.no_grad()
    def _forward(self, reqs: list[Request], new: list[list[int]], absorb: bool) -> torch.Tensor:
        """Last-position logits (B, V) of each request after feeding it `new[i]`."""
        T = max(len(n) for n in new)
        x = torch.zeros(len(reqs), T, dtype=torch.long)
        for b, n in enumerate(new):
            x[b, : len(n)] = torch.tensor(n)
        self.cache.bind([r.id for r in reqs], [len(n) for n in new])
        logits = self.model(x.to(self.cache.c_kv.device), start_pos=self.cache.start_positions(),
                            cache=self.cache, mask=self.cache.mask().to(self.cache.c_kv.device), absorb=absorb)
        self.cache.commit()
        return torch.stack([logits[b, len(n) - 1] for b, n in enumerate(new)])

    def _budget(self, req: Request) -> int:
        """Blocks a request can ever need: its prompt plus max_tokens, within the context."""
        tokens = min(len(req.prompt) + req.params.max_tokens, self.max_len)
        return -(-tokens // self.cache.block_size)

    def _admit(self) -> list[Request]:
        """Admit waiting requests in order while their whole budget fits beside the running ones'.

        Reserving the budget up front means a running request never finds the cache full (no
        preemption needed); a request waits until finished ones give their blocks back.
        """
        admitted = []
        reserved = sum(self._budget(r) for r in self.running.values())
        while self.waiting and len(self.running) + len(admitted) < self.max_running:
            req = self.waiting[0]
            if reserved + self._budget(req) > self.cache.num_blocks:
                break
            reserved += self._budget(req)
            self.cache.add(req.id)
            admitted.append(self.waiting.pop(0))
        return admitted

    def _advance(self, req: Request, logits: torch.Tensor) -> Output:
        token, logprob = sample(logits, req.params, req.generator, req.counts)
        req.output.append(token)
        req.logprobs.append(logprob)
        req.counts[token] += 1
        p = req.params
        if token == self.tok.eos_id or token in p.stop_token_ids:
            req.finish_reason = "stop"
            delta = req.stream.finish()
        else:
            delta = req.stream.push(token)
            if req.stream.stopped:
                req.finish_reason = "stop"
            elif len(req.output) >= p.max_tokens or len(req.prompt) + len(req.output) >= self.max_len:
                req.finish_reason = "length"
                delta += req.stream.finish()
        return Output(req.id, token, delta, logprob if p.logprobs else None, req.finish_reason)

    def step(self) -> list[Output]:
        outputs = []
        decoding = list(self.running.values())
        admitted = self._admit()
        if admitted:
            for req in admitted:
                self.running[req.id] = req
            logits = self._forward(admitted, [r.prompt for r in admitted], absorb=False)
            outputs += [self._advance(r, lg) for r, lg in zip(admitted, logits)]
        if decoding:
            logits = self._forward(decoding, [[r.output[-1]] for r in decoding], absorb=True)
            outputs += [self._advance(r, lg) for r, lg in zip(decoding, logits)]
        for out in outputs:
            if out.finish_reason:
                self.cache.free(out.id)
                del self.running[out.id]
        return outputs

    def generate(self, prompts: list[str | list[int]], params: SamplingParams | list[SamplingParams] | None = None
                 ) -> list[Request]:
        """Run prompts to completion; returns their requests (output ids, text, finish reasons)."""
        plist = params if isinstance(params, list) else [params] * len(prompts)
        ids = [self.add(p, sp) for p, sp in zip(prompts, plist)]
        done: dict[int, Request] = {}
        requests = {r.id: r for r in self.waiting}
        while self.has_work():
            for out in self.step():
                if out.finish_reason:
                    done[out.id] = requests[out.id]
        return [done[i] for i in ids]
