"""Continuous batching over the paged latent cache: requests join and leave between decode steps.

    engine = Engine(model, tokenizer, max_running=16)
    rid = engine.add("What is 2 + 2?", SamplingParams(temperature=0, max_tokens=32))
    while engine.has_work():
        for out in engine.step():        # one prefill of newly admitted requests + one decode step
            print(out.delta, end="")

Each step admits waiting requests while there is room (max_running, and cache blocks for the
prompt plus max_tokens, reserved up front so decoding never runs out; `prefill_hold` lets
arrivals gather for a few decode steps so they share one prefill), prefills them in one
batched forward (naive MLA path), then decodes every running request by one token in one batched
forward over the cached latents (absorbed MLA path). A request finishes on end-of-sentence, a
stop token id, a stop string or max_tokens; finishing or cancelling returns its cache blocks at
once. Outputs also go to a request's callback, or `stream()` yields one request's outputs.

Speculative (`Engine(..., speculative=True)`, models with an MTP module): after each forward the
MTP module drafts the token after next from the main model's last hidden state; the next decode
feeds [last token, draft] in one forward, keeps the draft when the main model agrees (greedy: the
same argmax; sampling: speculative sampling, so the output distribution is unchanged) and gets
the token after it for free, or rolls the rejected draft out of the cache. The MTP module's own
layer is cached in the same blocks (cache layer num_hidden_layers) and is fed the positions the
main model has just settled. `engine.acceptance_rate` counts drafts kept.

The forward passes are engine/decode.py's: eagerly `decode.trunk` and `decode.mtp_hidden` (the
model's layers with MoE paths for few tokens). Compiled (`Engine(..., compile=True)`, then
`warm_up()`): decode steps run `decode.decode_logits` (the decode step and the head), a pure
function of the cache pools and slot tensors, through torch.compile; the engine stores the new
latents it returns. Speculative steps of an all-greedy batch run verify and the next draft as one
graph (`decode.greedy_speculative_step`); otherwise they verify through the decode graph (two
tokens a sequence) and draft through a second one (`decode.draft_logits`, the MTP module and its
head), with sampling and speculative-sampling acceptance on the host. Prefill stays eager.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from ..model import Transformer
from ..tokenizer import Tokenizer
from . import decode
from .cache import PagedLatentCache
from .sampling import SamplingParams, distribution, distributions, draw, draws, residual, verify
from .stream import TextStream


@dataclass
class Request:
    id: int
    prompt: list[int]
    params: SamplingParams
    output: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    prompt_logprobs: list[tuple[float, list[tuple[int, float]]] | None] | None = None  # [None, (lp, top)...]
    finish_reason: str | None = None
    generator: torch.Generator | None = None
    counts: torch.Tensor | None = None  # tokens generated so far, per vocab id (with penalties only)
    stream: TextStream | None = None
    callback: Callable[["Output"], None] | None = None
    draft: int | None = None  # speculative: the MTP module's guess for the token after output[-1]
    draft_q: torch.Tensor | None = None  # the distribution the draft was drawn from (None: greedy, one-hot)
    held: int = 0  # decode steps this request has waited while others decoded (see Engine.prefill_hold)


@dataclass
class Output:
    id: int
    token: int | None  # None when the request finished without a new token (a stop string, cancel)
    delta: str  # text safe to show now
    logprob: float | None
    finish_reason: str | None  # stop | length | cancelled, once finished
    top_logprobs: list[tuple[int, float]] | None = None  # (token, logprob), likeliest first


class Engine:
    def __init__(self, model: Transformer, tokenizer: Tokenizer, max_running: int = 16, block_size: int = 16,
                 num_blocks: int | None = None, speculative: bool = False, prefill_hold: int = 0,
                 compile: bool = False):
        self.model, self.tok = model.eval(), tokenizer
        if prefill_hold < 0:
            raise ValueError(f"prefill_hold must be >= 0 decode steps (got {prefill_hold})")
        self.prefill_hold = prefill_hold
        cfg = model.cfg
        if speculative and not len(model.mtp):
            raise ValueError("speculative: this model has no MTP module (num_nextn_predict_layers is 0) to draft "
                             "with; decode without it, or train with --mtp-weight > 0")
        self.speculative = speculative
        self.max_len = cfg.max_position_embeddings
        blocks = num_blocks or max_running * -(-self.max_len // block_size)
        param = next(model.parameters())
        self.device = param.device
        self.cache = PagedLatentCache(cfg, blocks, block_size, dtype=param.dtype, device=param.device,
                                      mtp=speculative)
        self.max_running = max_running
        self.waiting: list[Request] = []
        self.running: dict[int, Request] = {}
        self.ids = itertools.count()
        self.drafted = self.accepted = 0
        # compiled, decode steps run decode.decode_logits as one graph (and speculative drafts
        # decode.draft_logits); eagerly decode.trunk over the cache is faster (it reads a lone
        # sequence's context as a view; docs/engine.md)
        self.compiled = self.compiled_draft = self.compiled_greedy = None
        if compile:
            options = {"cpp_wrapper": True} if self.device.type == "cpu" else None
            _configure_compiler()

            def compiled(step):  # each step its own code object, so its own graph cache and recompile limit
                return torch.compile(functools.partial(step, model), dynamic=True, options=options)

            self.compiled = compiled(decode.decode_logits)
            if speculative:
                self.compiled_draft = compiled(decode.draft_logits)
                self.compiled_greedy = compiled(decode.greedy_speculative_step)

    @property
    def acceptance_rate(self) -> float | None:
        """Share of MTP drafts the main model kept (None before any draft was checked)."""
        return self.accepted / self.drafted if self.drafted else None

    def add(self, prompt: str | list[int], params: SamplingParams | None = None,
            callback: Callable[[Output], None] | None = None) -> int:
        """Queue a request; returns its id. `callback(output)` is called for each of its outputs."""
        params = (params or SamplingParams()).validate()
        ids = self.tok.encode_prompt(prompt) if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise ValueError("prompt must not be empty")
        vocab = self.model.cfg.vocab_size
        if not all(isinstance(t, int) and 0 <= t < vocab for t in ids):
            raise ValueError(f"prompt: token ids must be integers in [0, {vocab})")
        if len(ids) >= self.max_len:
            raise ValueError(f"prompt has {len(ids)} tokens; the model's context is {self.max_len}, which must "
                             f"also hold at least one new token")
        need = -(-min(len(ids) + params.max_tokens, self.max_len) // self.cache.block_size)
        if need > self.cache.num_blocks:
            raise ValueError(f"max_tokens: prompt ({len(ids)}) + max_tokens ({params.max_tokens}) need {need} cache "
                             f"blocks but the cache has {self.cache.num_blocks}; lower max_tokens")
        penalties = params.presence_penalty or params.frequency_penalty
        req = Request(next(self.ids), ids, params, generator=params.generator(),
                      counts=torch.zeros(vocab, dtype=torch.long) if penalties else None,
                      stream=TextStream(self.tok, params.stop), callback=callback)
        self.waiting.append(req)
        return req.id

    def warm_up(self) -> None:
        """Run the decode shapes a workload meets once (one sequence; several of equal and of different
        lengths; speculative: greedy and sampled), so a compiled engine compiles now rather than
        stalling its first requests; raises RuntimeError, saying what to do, when compiling fails."""
        if self.has_work():
            raise RuntimeError("warm_up: the engine already has requests")
        # 5 tokens: speculative, after the first verify (1 or 2 tokens) a request always drafts again
        kinds = [SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)]
        if self.speculative:  # sampled batches verify and draft through graphs of their own
            kinds.append(SamplingParams(temperature=1, seed=0, max_tokens=5, ignore_eos=True))
        try:
            for params in kinds:
                for prompts in ([[1, 2]], [[1, 2], [3, 4]], [[1, 2], [3, 4, 5]]):
                    self.generate(prompts, params)
        except Exception as e:  # torch.compile raises its backends' own exception types
            if self.compiled is None:
                raise
            raise RuntimeError(f"compiling the decode step failed ({type(e).__name__}: {str(e)[:300]}); torch.compile "
                               f"needs a working C++ compiler (g++) on CPU. Run without compile") from e
        self.drafted = self.accepted = 0  # the warm-up's drafts are no workload's

    def cancel(self, rid: int) -> bool:
        """Stop a request now and give its cache blocks back; False if it is unknown or done."""
        for req in self.waiting:
            if req.id == rid:
                self.waiting.remove(req)
                req.finish_reason = "cancelled"
                return True
        if rid in self.running:
            self.cache.free(rid)
            self.running.pop(rid).finish_reason = "cancelled"
            return True
        return False

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- forwards ------------------------------------------------------------------------------
    def _batch(self, rows: list[list[int]], width: int = 0) -> torch.Tensor:
        """Token rows right-padded with 0 to the longest (or `width`), on the model's device."""
        width = max(width, *(len(r) for r in rows))
        return torch.tensor([r + [0] * (width - len(r)) for r in rows], device=self.device)

    def _mask(self) -> torch.Tensor | None:
        mask = self.cache.mask()
        return None if mask is None else mask.to(self.device)

    def _trunk(self, reqs: list[Request], new: list[list[int]], absorb: bool) -> torch.Tensor:
        """Feed `new[i]` to request i's cached context; the final hidden states (B, T, D)."""
        self.cache.bind([r.id for r in reqs], [len(n) for n in new])
        h = decode.trunk(self.model, self._batch(new), self.cache.start_positions(), self.cache, self._mask(), absorb)
        self.cache.commit()
        return h

    def _draft(self, reqs: list[Request], hidden: torch.Tensor, tokens: list[list[int]], starts: list[int],
               absorb: bool, width: list[int] | None = None) -> None:
        """Run the MTP module over positions starts[i]... of request i (main hidden state there, row i
        of hidden (B, >= T, D), and the token after it) and draft each request's next-but-one token
        from the last of them.

        width: run width[i] >= len(tokens[i]) positions, the extra ones padding over the slots the
        verify step just wrote, so a compiled draft has one shape whether or not the drafts were kept."""
        mtp = self.model.mtp[0]
        width = width or [len(t) for t in tokens]
        T = max(width)
        h = hidden[:, :T]  # positions past a row's tokens are padding: written to scratch, masked
        self.cache.bind([r.id for r in reqs], width, starts=starts)
        if self.compiled_draft is not None and absorb:
            last = torch.tensor([len(t) - 1 for t in tokens], device=self.device)
            logits, c_kv, k_pe = self.compiled_draft(h, self._batch(tokens, T), *self._bound(),
                                                     [mtp.block.self_attn.absorbed_weights()], last)
            self.cache.store(c_kv, k_pe, first=mtp.block.layer_idx)
        else:
            out = decode.mtp_hidden(self.model, h, self._batch(tokens, T), self.cache.start_positions(), self.cache,
                                    self._mask(), absorb)
            last = torch.stack([out[b, len(t) - 1] for b, t in enumerate(tokens)])
            logits = self.model.lm_head(mtp.shared_head.norm(last))
        self.cache.commit()
        params = [r.params for r in reqs]
        if all(_plain_greedy(p) for p in params):  # the argmax; a one-hot q (None) is all verify needs
            for req, token in zip(reqs, logits.argmax(-1).tolist()):
                req.draft_q, req.draft = None, token
            return
        qs, _ = distributions(logits, params, [r.counts for r in reqs])
        for req, q, token in zip(reqs, qs, draws(qs, params, [r.generator for r in reqs])):
            req.draft_q, req.draft = q, token

    # ---- tokens ----------------------------------------------------------------------------------
    def _emit(self, req: Request, token: int, logprobs: torch.Tensor) -> Output:
        """Append a token chosen from a row of log-probabilities (V,) and say what changed."""
        logprob = float(logprobs[token])
        req.output.append(token)
        req.logprobs.append(logprob)
        if req.counts is not None:  # only penalties need them
            req.counts[token] += 1
        p = req.params
        if (token == self.tok.eos_id and not p.ignore_eos) or token in p.stop_token_ids:
            req.finish_reason = "stop"
            delta = req.stream.finish()
        else:
            delta = req.stream.push(token)
            if req.stream.stopped:
                req.finish_reason = "stop"
            elif len(req.output) >= p.max_tokens or len(req.prompt) + len(req.output) >= self.max_len:
                req.finish_reason = "length"
                delta += req.stream.finish()
        top = _top(logprobs, p.top_logprobs) if p.top_logprobs else None
        return Output(req.id, token, delta, logprob if p.logprobs or p.top_logprobs else None, req.finish_reason,
                      top)

    def _advance(self, req: Request, logits: torch.Tensor) -> Output:
        """`_advance_all` for one request and its row of logits (V,)."""
        return self._advance_all([req], logits[None])[0]

    def _advance_all(self, reqs: list[Request], logits: torch.Tensor) -> list[Output]:
        """One token for each request from its row of logits (B, V), the whole batch in one pass."""
        params = [r.params for r in reqs]
        if all(_plain_greedy(p) for p in params):
            # plain greedy needs no generator: stay on the model's device, where a (B, V) copy to the
            # CPU would cost more than the step at a large vocabulary; the argmax of the logits, as
            # `distributions` takes it
            tokens, logprobs = logits.argmax(-1).tolist(), logits.float().log_softmax(-1)
        else:
            probs, logprobs = distributions(logits, params, [r.counts for r in reqs])
            tokens = draws(probs, params, [r.generator for r in reqs])
        return [self._emit(r, token, row) for r, token, row in zip(reqs, tokens, logprobs)]

    def _can_draft(self, req: Request) -> bool:
        """Room for the draft and the token after it, within max_tokens and the context."""
        room = min(req.params.max_tokens - len(req.output), self.max_len - len(req.prompt) - len(req.output))
        return req.draft is not None and room >= 2

    # ---- scheduling ------------------------------------------------------------------------------
    def _budget(self, req: Request) -> int:
        """Blocks a request can ever need: its prompt plus max_tokens, within the context."""
        tokens = min(len(req.prompt) + req.params.max_tokens, self.max_len)
        return -(-tokens // self.cache.block_size)

    def _admit(self) -> list[Request]:
        """Admit waiting requests in order while their whole budget fits beside the running ones'.

        Reserving the budget up front means a running request never finds the cache full (no
        preemption needed); a request waits until finished ones give their blocks back.

        With `prefill_hold` > 0, requests that arrive while others decode are held for up to that
        many decode steps unless enough have gathered to fill every free slot: a prefill stalls the
        whole decode batch, so one prefill of many prompts costs far less than many of one each.
        """
        free = self.max_running - len(self.running)
        if self.running and self.waiting and len(self.waiting) < free and self.waiting[0].held < self.prefill_hold:
            for req in self.waiting:
                req.held += 1
            return []
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

    def _prefill(self, reqs: list[Request]) -> list[Output]:
        h = self._trunk(reqs, [r.prompt for r in reqs], absorb=False)
        for b, r in enumerate(reqs):
            if r.params.prompt_logprobs is not None:  # each prompt token given the ones before it
                rows = self.model.lm_head(h[b, : len(r.prompt) - 1]).float().log_softmax(-1)
                k = r.params.prompt_logprobs
                r.prompt_logprobs = [None] + [(float(row[t]), _top(row, k)) for t, row in zip(r.prompt[1:], rows)]
        last = torch.stack([h[b, len(r.prompt) - 1] for b, r in enumerate(reqs)])
        outputs = self._advance_all(reqs, self.model.lm_head(last))
        if self.speculative:
            live = [(b, r) for b, r in enumerate(reqs) if not r.finish_reason]
            if live:
                self._draft([r for _, r in live], h[[b for b, _ in live]],
                            [r.prompt[1:] + r.output[-1:] for _, r in live], [0] * len(live), absorb=False)
        return outputs

    def _bound(self) -> tuple:
        """A compiled graph's inputs for the bound forward: start positions, the cache pools, the write and
        read slots, the mask."""
        write, read = self.cache.slots()
        return (self.cache.start_positions().to(self.device), self.cache.c_kv, self.cache.k_pe, write, read,
                self._mask())

    def _absorbed(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each main layer's W_UK and W_UV, views of its weights."""
        return [layer.self_attn.absorbed_weights() for layer in self.model.layers]

    def _compiled_trunk(self, reqs: list[Request], new: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits (B, T, V) and hidden states (B, T, D) for `new[i]` fed to request i, through the compiled
        decode step and head: the graph only reads the cache; the new latents it returns are stored after."""
        self.cache.bind([r.id for r in reqs], [len(n) for n in new])
        logits, h, c_kv, k_pe = self.compiled(self._batch(new), *self._bound(), self._absorbed())
        self.cache.store(c_kv, k_pe)
        self.cache.commit()
        return logits, h

    def _decode(self, reqs: list[Request]) -> list[Output]:
        new = [r.output[-1:] for r in reqs]
        if self.compiled is not None:
            return self._advance_all(reqs, self._compiled_trunk(reqs, new)[0][:, 0])
        return self._advance_all(reqs, self.model.lm_head(self._trunk(reqs, new, absorb=True)[:, 0]))

    def _decode_speculative(self, reqs: list[Request]) -> list[Output]:
        """One forward of [last token, draft] per request; keep the draft if the main model agrees."""
        starts = [self.cache.lengths[r.id] for r in reqs]
        new = [r.output[-1:] + ([r.draft] if self._can_draft(r) else []) for r in reqs]
        greedy = all(_plain_greedy(r.params) for r in reqs)
        if greedy and self.compiled_greedy is not None and any(len(n) == 2 for n in new):
            return self._greedy_speculative(reqs, new, starts)
        if self.compiled is not None:
            logits, h = self._compiled_trunk(reqs, new)
        else:
            logits = self.model.lm_head(h := self._trunk(reqs, new, absorb=True))  # (B, T, V), T <= 2
        outputs, follow = [], []  # follow: (request, batch row, tokens settled this step)
        if greedy:  # the main model's argmax at both positions, for the whole batch at once (see _advance_all)
            targets, target_lp = logits.argmax(-1).tolist(), logits.float().log_softmax(-1)
        for b, (req, fed) in enumerate(zip(reqs, new)):
            before = len(req.output)
            if greedy:
                outputs += self._settle_greedy(req, fed, targets[b], target_lp[b], starts[b])
            elif len(fed) == 1:
                outputs.append(self._advance(req, logits[b, 0]))
            else:
                p, logprobs = distribution(logits[b, 0], req.params, req.counts)
                kept = verify(req.draft, req.draft_q, p, req.params, req.generator)
                self.drafted += 1
                if kept is None:
                    token = draw(residual(p, req.draft_q, req.draft), req.params, req.generator)
                    outputs.append(self._emit(req, token, logprobs))
                    self.cache.truncate(req.id, starts[b] + 1)
                else:
                    self.accepted += 1
                    outputs.append(self._emit(req, kept, logprobs))
                    if not req.finish_reason:
                        outputs.append(self._advance(req, logits[b, 1]))
            req.draft = req.draft_q = None
            if not req.finish_reason:
                follow.append((req, b, req.output[before:]))
        if follow:
            # compiled, the draft runs over every position verify fed (see _draft's width)
            width = [len(new[b]) if self.compiled_draft is not None else len(t) for _, b, t in follow]
            self._draft([r for r, _, _ in follow], h[[b for _, b, _ in follow]], [t for _, _, t in follow],
                        [starts[b] for _, b, _ in follow], absorb=True, width=width)
        return outputs

    def _greedy_speculative(self, reqs: list[Request], new: list[list[int]], starts: list[int]) -> list[Output]:
        """`_decode_speculative` for an all-greedy batch, compiled: verify and the next draft in one graph
        (`decode.greedy_speculative_step`), then the host only emits what it settled."""
        self.cache.bind([r.id for r in reqs], [len(n) for n in new])
        drafts = torch.tensor([n[1] if len(n) == 2 else -1 for n in new], device=self.device)
        absorbed = self._absorbed() + [self.model.mtp[0].block.self_attn.absorbed_weights()]
        logprobs, targets, draft, c_kv, k_pe = self.compiled_greedy(self._batch(new), drafts, *self._bound(),
                                                                     absorbed)
        self.cache.store(c_kv, k_pe)
        self.cache.commit()
        outputs = []
        for b, (req, fed, target, guess) in enumerate(zip(reqs, new, targets.tolist(), draft.tolist())):
            outputs += self._settle_greedy(req, fed, target, logprobs[b], starts[b])
            req.draft, req.draft_q = (None if req.finish_reason else guess), None
        return outputs

    def _settle_greedy(self, req: Request, fed: list[int], target: list[int], logprobs: torch.Tensor,
                       start: int) -> list[Output]:
        """Settle a greedy request's verify of `fed` ([last token] or [last token, draft]) at cache
        position `start`, from the main model's argmax at each position and its log-probabilities
        (T, V): the first target is emitted either way; a draft equal to it is kept and the second
        target follows, otherwise the draft's slot is rolled back."""
        outputs = [self._emit(req, target[0], logprobs[0])]
        if len(fed) == 2:
            self.drafted += 1
            if target[0] == fed[1]:
                self.accepted += 1
                if not req.finish_reason:
                    outputs.append(self._emit(req, target[1], logprobs[1]))
            else:
                self.cache.truncate(req.id, start + 1)
        return outputs

    @torch.no_grad()
    def step(self) -> list[Output]:
        """Admit and prefill what fits, then one decode step for every request already running."""
        decoding = list(self.running.values())
        admitted = self._admit()
        outputs = []
        if admitted:
            self.running.update((r.id, r) for r in admitted)
            outputs += self._prefill(admitted)
        if decoding:
            outputs += self._decode_speculative(decoding) if self.speculative else self._decode(decoding)
        stepped = {r.id: r for r in admitted + decoding}
        for out in outputs:
            if out.finish_reason:
                self.cache.free(out.id)
                del self.running[out.id]
            if stepped[out.id].callback is not None:
                stepped[out.id].callback(out)
        return outputs

    def stream(self, prompt: str | list[int], params: SamplingParams | None = None) -> Iterator[Output]:
        """Add a request and step the engine until it finishes, yielding its outputs as they come
        (other requests keep being served, their outputs going to their callbacks)."""
        mine: list[Output] = []
        rid = self.add(prompt, params, callback=mine.append)
        finished = False
        try:
            while not finished and (rid in self.running or any(r.id == rid for r in self.waiting)):
                self.step()
                yield from mine
                finished = bool(mine) and mine[-1].finish_reason is not None
                mine.clear()
        finally:
            if not finished:
                self.cancel(rid)  # the caller stopped listening

    def generate(self, prompts: list[str | list[int]], params: SamplingParams | list[SamplingParams] | None = None,
                 progress: str | None = None) -> list[Request]:
        """Run prompts to completion; returns their requests (output ids, text, finish reasons). With `progress`,
        a progress bar of that name counts finished requests."""
        from tqdm import tqdm

        plist = params if isinstance(params, list) else [params] * len(prompts)
        ids = [self.add(p, sp) for p, sp in zip(prompts, plist)]
        done: dict[int, Request] = {}
        requests = {r.id: r for r in self.waiting}
        with tqdm(total=len(ids), desc=progress, unit="seq", disable=progress is None) as bar:
            while self.has_work():
                for out in self.step():
                    if out.finish_reason:
                        done[out.id] = requests[out.id]
                        bar.update()
        return [done[i] for i in ids]


def _configure_compiler() -> None:
    """Process-wide torch.compile settings the engine's graphs need (set by a compiling Engine)."""
    dynamo = torch._dynamo.config
    # each model, batch shape (one sequence or several; one or two new tokens) and mask case is a graph
    # of its own, guarded on the same code: past dynamo's default 8 it would silently run eagerly (a
    # process that compiles for several models, e.g. a speedrun or the tests)
    dynamo.recompile_limit = max(dynamo.recompile_limit, 64)
    # the symbolic shape guards every call checks (batch, context and pool sizes), in C++ rather than
    # Python: cheaper per call, which matters most at batch 1 (docs/engine.md)
    dynamo.enable_cpp_symbolic_shape_guards = True
    # no "duck" sizing (one symbol for sizes that happen to be equal when traced): warm_up's 4-token
    # context met `small`'s 4 heads and the graph was compiled twice, the first one specialised on it
    import torch.fx.experimental._config as fx_config
    fx_config.use_duck_shape = False


def _plain_greedy(params: SamplingParams) -> bool:
    """Greedy without penalties: the argmax of the model's logits, no generator or counts needed."""
    return params.greedy and not params.presence_penalty and not params.frequency_penalty


def _top(logprobs: torch.Tensor, k: int) -> list[tuple[int, float]]:
    if k == 0:
        return []
    values, tokens = logprobs.topk(k)
    return list(zip(tokens.tolist(), values.tolist()))
