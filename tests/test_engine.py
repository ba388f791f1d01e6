"""The engine: continuous batching == one by one == a plain greedy loop == transformers; seeds; cancel."""

import pytest
import torch

from nanoseek import Transformer, preset
from nanoseek.checkpoint import resolve_device
from nanoseek.engine import decode
from nanoseek.engine.engine import Engine
from nanoseek.engine.sampling import SamplingParams
from nanoseek.tokenizer import Tokenizer

from conftest import train_tiny

TOK = Tokenizer.byte_level()


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = Transformer(preset("tiny", q_lora_rank=16)).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m


def plain_greedy(model, prompt, n):
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            tok = int(model(torch.tensor([ids]))[0, -1].argmax())
            ids.append(tok)
            if tok == TOK.eos_id:
                break
    return ids[len(prompt):]


PROMPTS = ["What is 12 + 30?", "hi", "A longer prompt about rivers and mountains.", "中文"]
GREEDY = [SamplingParams(temperature=0, max_tokens=n) for n in (9, 4, 12, 6)]


def test_continuous_batching_equals_one_by_one_and_plain_greedy(model):
    batched = Engine(model, TOK, max_running=2).generate(PROMPTS, GREEDY)  # later prompts join as others leave
    for prompt, params, req in zip(PROMPTS, GREEDY, batched):
        alone = Engine(model, TOK, max_running=1).generate([prompt], params)[0]
        assert req.output == alone.output == plain_greedy(model, TOK.encode(prompt), params.max_tokens)
        assert req.finish_reason in ("length", "stop")


def test_prefill_hold_gathers_arrivals_into_one_prefill(model):
    """Requests arriving while another decodes wait up to prefill_hold steps, or until they can fill
    every free slot, then share one prefill; the outputs are the same as without holding."""
    with pytest.raises(ValueError, match="prefill_hold"):
        Engine(model, TOK, prefill_hold=-1)
    long = SamplingParams(temperature=0, max_tokens=12)
    eng = Engine(model, TOK, max_running=4, prefill_hold=3)
    eng.add(PROMPTS[0], long)
    eng.step()  # admitted at once: nothing else was running
    assert len(eng.running) == 1
    eng.add(PROMPTS[1], GREEDY[1])
    eng.step(), eng.step(), eng.step()
    assert len(eng.running) == 1 and len(eng.waiting) == 1  # held three steps
    eng.step()
    assert len(eng.running) == 2 and not eng.waiting  # then admitted alone
    eng.add(PROMPTS[2], GREEDY[2]), eng.add(PROMPTS[3], GREEDY[3])
    eng.step()
    assert len(eng.running) == 4  # two arrivals fill the two free slots: no wait
    held = Engine(model, TOK, max_running=2, prefill_hold=2).generate(PROMPTS, GREEDY)
    plain = Engine(model, TOK, max_running=2).generate(PROMPTS, GREEDY)
    assert [r.output for r in held] == [r.output for r in plain]


def test_greedy_matches_transformers_generate(model, tmp_path):
    transformers = pytest.importorskip("transformers")
    from nanoseek import save_model
    save_model(model, tmp_path / "m")
    hf = transformers.DeepseekV3ForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32).eval()
    prompt = TOK.encode(PROMPTS[0])
    want = hf.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False, eos_token_id=None,
                       pad_token_id=0)[0, len(prompt):].tolist()
    got = Engine(model, TOK).generate([prompt], SamplingParams(temperature=0, max_tokens=10))[0].output
    assert got[:len(want)] == want[:len(got)] and len(got) >= 1


def test_seeded_sampling_ignores_batch_company(model):
    p = SamplingParams(temperature=1.0, seed=7, max_tokens=8)
    alone = Engine(model, TOK).generate([PROMPTS[1]], p)[0].output
    crowd = Engine(model, TOK, max_running=4).generate(
        PROMPTS, [SamplingParams(temperature=1.0, seed=s, max_tokens=8) for s in (1, 7, 3, 4)])
    assert crowd[1].output == alone


def test_cancel_returns_blocks_and_small_caches_wait(model):
    engine = Engine(model, TOK, max_running=4, block_size=4, num_blocks=16)
    rid = engine.add(PROMPTS[2], SamplingParams(temperature=0, max_tokens=10))
    engine.step()
    assert len(engine.cache.free_blocks) < 16
    assert engine.cancel(rid) and len(engine.cache.free_blocks) == 16 and not engine.has_work()
    with pytest.raises(ValueError, match="^max_tokens: .* need 24 cache blocks but the cache has 16"):
        engine.add(PROMPTS[2], SamplingParams(max_tokens=50))
    # 4 requests whose budgets (26 blocks) cannot all fit at once still all complete, identically
    reqs = engine.generate(PROMPTS, GREEDY)
    assert [r.output for r in reqs] == [r.output for r in Engine(model, TOK).generate(PROMPTS, GREEDY)]


def test_stop_strings_and_bad_input(model):
    engine = Engine(model, TOK)
    req = engine.generate([PROMPTS[0]], SamplingParams(temperature=0, max_tokens=12))[0]
    text = req.stream.text
    # a random model may emit bytes that are not UTF-8 (shown as U+FFFD): take the stop string
    # from a stretch of real characters
    spots = [i for i in range(1, len(text) - 1) if "\ufffd" not in text[i:i + 2]]
    if spots:
        stop = text[spots[0]:spots[0] + 2]
        cut = Engine(model, TOK).generate([PROMPTS[0]], SamplingParams(temperature=0, max_tokens=12, stop=[stop]))[0]
        assert cut.stream.text == text[: text.find(stop)] and cut.finish_reason == "stop"
    with pytest.raises(ValueError, match="^temperature "):
        engine.add("x", SamplingParams(temperature=-1))
    with pytest.raises(ValueError, match="prompt has 600 tokens; the model's context is 512"):
        engine.add([5] * 600)


def test_cli_generate_streams_the_engine_output(model, tmp_path, capsys):
    from nanoseek import save_model
    from nanoseek.cli import main
    save_model(model, tmp_path / "m", extra_files=TOK.files())
    assert main(["generate", "--model", str(tmp_path / "m"), "--prompt", PROMPTS[0], "--max-tokens", "9",
                 "--verbose"]) == 0
    out = capsys.readouterr()
    want = Engine(model, TOK).generate([PROMPTS[0]], GREEDY[0])[0].stream.text
    assert out.out == want + "\n" and "[finished:" in out.err
    assert main(["generate", "--model", str(tmp_path / "m"), "--prompt", PROMPTS[0], "--max-tokens", "9",
                 "--speculative", "--verbose"]) == 0
    out = capsys.readouterr()
    assert out.out == want + "\n" and "MTP drafts accepted" in out.err
    assert main(["generate", "--model", str(tmp_path / "m"), "--prompt", "x", "--top-p", "0"]) == 2
    assert "top_p must be in (0, 1]" in capsys.readouterr().err
    # --device / --dtype: the same tokens on an explicit cpu; bf16 weights and cache; bad devices named
    assert main(["generate", "--model", str(tmp_path / "m"), "--prompt", PROMPTS[0], "--max-tokens", "9",
                 "--device", "cpu"]) == 0
    assert capsys.readouterr().out == want + "\n"
    assert main(["generate", "--model", str(tmp_path / "m"), "--prompt", PROMPTS[0], "--max-tokens", "9",
                 "--dtype", "bf16"]) == 0
    assert len(capsys.readouterr().out) > 1
    no_gpu = "cuda:7" if torch.cuda.is_available() else "cuda"
    for device, says in (("nonsense", "is not a device"), (no_gpu, "CUDA GPU"), ("meta", "runs on cpu or cuda")):
        assert main(["generate", "--model", str(tmp_path / "m"), "--prompt", "x", "--device", device]) == 2
        err = capsys.readouterr().err
        assert "--device" in err and device in err and says in err
        with pytest.raises(ValueError, match=says):
            resolve_device(device)
    assert resolve_device() == torch.device("cuda" if torch.cuda.is_available() else "cpu")


def test_compiled_decode_equals_eager(model, tmp_path, capsys):
    """torch.compile'd decode step (one graph): the same greedy tokens as eager, with sequences joining
    and leaving; warm_up compiles and leaves the engine empty; the CLI flag does the same."""
    from nanoseek import save_model
    from nanoseek.cli import main
    compiled = Engine(model, TOK, max_running=2, compile=True)
    free = compiled.cache.free_tokens
    compiled.warm_up()
    assert not compiled.has_work() and compiled.cache.free_tokens == free
    eager = Engine(model, TOK, max_running=2)
    assert ([r.output for r in compiled.generate(PROMPTS, GREEDY)] ==
            [r.output for r in eager.generate(PROMPTS, GREEDY)])
    # more sequences than the dense MoE path takes eagerly (the sorted path there; the gathered one compiled)
    many, params = [f"{i} + {i * 7} =" for i in range(20)], SamplingParams(temperature=0, max_tokens=3)
    assert not decode.dense_pays(model.layers[1].mlp.experts, 20 * model.cfg.num_experts_per_tok)
    assert ([r.output for r in Engine(model, TOK, max_running=20, compile=True).generate(many, params)] ==
            [r.output for r in Engine(model, TOK, max_running=20).generate(many, params)])
    save_model(model, tmp_path / "m", extra_files=TOK.files())
    assert main(["generate", "--model", str(tmp_path / "m"), "--prompt", PROMPTS[0], "--max-tokens", "9",
                 "--compile"]) == 0
    out = capsys.readouterr()
    assert out.out == eager.generate([PROMPTS[0]], GREEDY[0])[0].stream.text + "\n"
    assert "compiled in" in out.err


# ---- MTP self-speculative decoding ---------------------------------------------------------------

@pytest.fixture(scope="module")
def trained():
    """tiny trained for a few seconds on repetitive text: its MTP module drafts well, not perfectly."""
    return train_tiny(TOK.encode("the cat sat on the mat. a dog ran to the park! " * 20), steps=60)


SPEC_PROMPTS = ["the cat", "a dog ran", "xyz", "the mat. a", "park"]
SPEC_PARAMS = [SamplingParams(temperature=0, max_tokens=n) for n in (40, 1, 2, 27, 33)]


@pytest.mark.parametrize("which", ["trained", "random"])
def test_speculative_greedy_equals_plain_greedy(which, trained, model):
    m = trained if which == "trained" else model
    plain = Engine(m, TOK, max_running=2).generate(SPEC_PROMPTS, SPEC_PARAMS)
    engine = Engine(m, TOK, max_running=2, speculative=True)  # requests join and leave mid-run
    spec = engine.generate(SPEC_PROMPTS, SPEC_PARAMS)
    assert [r.output for r in spec] == [r.output for r in plain]
    assert [r.finish_reason for r in spec] == [r.finish_reason for r in plain]
    assert [len(r.output) for r in spec[1:3]] == [1, 2]
    if which == "trained":
        assert 0.4 < engine.acceptance_rate < 1  # both paths taken: kept drafts and rolled-back ones
    assert len(engine.cache.free_blocks) == engine.cache.num_blocks and not engine.cache.tables


def test_compiled_speculative_greedy_equals_plain_greedy(trained, tmp_path, capsys):
    """compile=True with speculative=True: an all-greedy batch verifies and drafts in one compiled graph
    (decode.greedy_speculative_step); greedy output is still plain greedy's, with requests
    joining and leaving, the same drafts are kept as eagerly, and every block comes back. The CLI
    does the same."""
    from nanoseek import save_model
    from nanoseek.cli import main
    plain = Engine(trained, TOK, max_running=2).generate(SPEC_PROMPTS, SPEC_PARAMS)
    eager = Engine(trained, TOK, max_running=2, speculative=True)
    eager.generate(SPEC_PROMPTS, SPEC_PARAMS)
    engine = Engine(trained, TOK, max_running=2, speculative=True, compile=True)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    engine.warm_up()
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > graphs  # compiled, not an eager fallback
    assert engine.drafted == engine.accepted == 0 and not engine.has_work()
    spec = engine.generate(SPEC_PROMPTS, SPEC_PARAMS)
    assert [r.output for r in spec] == [r.output for r in plain]
    assert [r.finish_reason for r in spec] == [r.finish_reason for r in plain]
    assert (engine.drafted, engine.accepted) == (eager.drafted, eager.accepted)  # the same drafts, kept alike
    assert 0 < engine.accepted < engine.drafted
    assert len(engine.cache.free_blocks) == engine.cache.num_blocks and not engine.cache.tables
    save_model(trained, tmp_path / "m", extra_files=TOK.files())
    assert main(["generate", "--model", str(tmp_path / "m"), "--prompt", SPEC_PROMPTS[0], "--max-tokens", "20",
                 "--compile", "--speculative", "--verbose"]) == 0
    out = capsys.readouterr()
    want = Engine(trained, TOK).generate([SPEC_PROMPTS[0]], SamplingParams(temperature=0, max_tokens=20))[0]
    assert out.out == want.stream.text + "\n"
    assert "MTP drafts accepted" in out.err


def test_greedy_drafts_meet_sampled_company(trained):
    """An all-greedy batch drafts by argmax and keeps no draft distribution; when a sampled request
    joins, the greedy one's draft is verified through speculative sampling with a one-hot q, and its
    output is still plain greedy's."""
    greedy = SamplingParams(temperature=0, max_tokens=30)
    want = Engine(trained, TOK).generate(["the cat"], greedy)[0].output
    engine = Engine(trained, TOK, speculative=True)
    got = []
    rid = engine.add("the cat", greedy, callback=lambda o: got.append(o.token))
    for _ in range(3):
        engine.step()
    assert engine.running[rid].draft is not None and engine.running[rid].draft_q is None
    drafted = engine.drafted
    engine.add("a dog", SamplingParams(temperature=1.0, seed=5, max_tokens=30))
    while engine.has_work():
        engine.step()
    assert engine.drafted > drafted + 2  # drafts checked in the mixed batch
    assert got == want
    assert len(engine.cache.free_blocks) == engine.cache.num_blocks


@pytest.mark.parametrize("compile,temperature", [(False, 0), (True, 0), (True, 0.7)],
                         ids=["eager", "compiled-greedy", "compiled-sampled"])
def test_speculative_decode_fills_the_cache_like_plain_decode(trained, compile, temperature):
    """After speculation (kept drafts and rollbacks), the cached latents, the MTP layer's too, equal a
    full forward's. Compiled, a greedy batch verifies and drafts in one graph, a sampled one in two."""
    engine = Engine(trained, TOK, speculative=True, compile=compile)
    rid = engine.add("the cat", SamplingParams(temperature=temperature, seed=4, max_tokens=30))
    for _ in range(12):
        engine.step()
    req = engine.running[rid]
    assert engine.accepted and engine.drafted > engine.accepted
    ids = req.prompt + req.output[:-1]  # the last token is not fed yet
    assert engine.cache.lengths[rid] == len(ids)
    from nanoseek.model import LatentCache
    full = LatentCache(trained.cfg, 1, len(ids))
    with torch.no_grad():
        trained(torch.tensor([ids]), cache=full)
        # the MTP layer: position i sees the main hidden state at i and the token after it
        L = trained.cfg.num_hidden_layers
        h, _ = trained.trunk(torch.tensor([ids]))
        cos, sin = trained.rope(torch.arange(len(ids)), h.dtype)
        trained.mtp[0](h, trained.embed_tokens(torch.tensor([ids[1:] + req.output[-1:]])), cos, sin, full)
    slots = engine.cache._slots([rid], [len(ids)])[0]
    for layer in range(L + 1):
        torch.testing.assert_close(engine.cache.c_kv[layer, slots], full.c_kv[layer][0, : len(ids)],
                                   atol=1e-5, rtol=1e-4)


def test_speculative_sampling_is_seeded_and_ignores_batch_company(trained):
    p = SamplingParams(temperature=0.8, top_p=0.9, seed=3, max_tokens=20)
    alone = Engine(trained, TOK, speculative=True).generate(["the cat"], p)[0].output
    company = [SamplingParams(temperature=1, seed=1, max_tokens=20), p,
               SamplingParams(temperature=1.2, seed=9, max_tokens=15)]
    crowd = Engine(trained, TOK, max_running=3, speculative=True).generate(["a dog", "the cat", "xyz"], company)
    assert crowd[1].output == alone


def test_speculative_needs_an_mtp_module():
    m = Transformer(preset("tiny", num_nextn_predict_layers=0))
    with pytest.raises(ValueError, match="^speculative: this model has no MTP module"):
        Engine(m, TOK, speculative=True)


# ---- streaming API and request errors ---------------------------------------------------------------

def test_callbacks_and_stream_deliver_every_delta(model):
    engine = Engine(model, TOK, max_running=4)
    seen: dict[int, list] = {}
    other = engine.add(PROMPTS[0], GREEDY[0], callback=lambda out: seen.setdefault(out.id, []).append(out))
    outs = list(engine.stream(PROMPTS[2], GREEDY[2]))
    alone = Engine(model, TOK).generate([PROMPTS[2]], GREEDY[2])[0]
    assert "".join(o.delta for o in outs) == alone.stream.text
    assert [o.token for o in outs] == alone.output and outs[-1].finish_reason == "length"
    while engine.has_work():
        engine.step()
    got = seen[other]
    assert [o.token for o in got] == Engine(model, TOK).generate([PROMPTS[0]], GREEDY[0])[0].output
    assert got[-1].finish_reason and all(o.finish_reason is None for o in got[:-1])
    # a consumer that stops listening cancels its request and frees its blocks
    it = engine.stream(PROMPTS[1], SamplingParams(temperature=0, max_tokens=50))
    next(it)
    it.close()
    assert not engine.has_work() and len(engine.cache.free_blocks) == engine.cache.num_blocks


@pytest.mark.parametrize("prompt, match", [
    ("", "^prompt must not be empty"),
    ([1, 2, 99999], r"^prompt: token ids must be integers in \[0, 512\)"),
    ([5] * 512, "^prompt has 512 tokens; the model's context is 512"),
])
def test_bad_prompts_name_the_prompt(model, prompt, match):
    with pytest.raises(ValueError, match=match):
        Engine(model, TOK).add(prompt)


def test_cli_chat_keeps_history_resets_and_drops_reasoning(model, tmp_path, capsys, monkeypatch):
    import io

    from nanoseek import save_model
    from nanoseek.cli import main
    from nanoseek.engine.reasoning import split_reasoning
    save_model(model, tmp_path / "m", extra_files=TOK.files())
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\nand then?\n/reset\nhello\n/bogus\n/quit\n"))
    assert main(["chat", "--model", str(tmp_path / "m"), "--temperature", "0", "--max-tokens", "8"]) == 0
    out = capsys.readouterr().out

    def reply(messages):
        ids, _ = TOK.render_chat(messages, add_generation_prompt=True)
        text = Engine(model, TOK).generate([ids], SamplingParams(temperature=0, max_tokens=8))[0].stream.text
        return split_reasoning(text, implicit=False)

    r1, c1 = reply([{"role": "user", "content": "hello"}])
    r2, c2 = reply([{"role": "user", "content": "hello"}, {"role": "assistant", "content": c1.strip()},
                    {"role": "user", "content": "and then?"}])
    shown1 = r1 + ("\n" if r1 and c1 else "") + c1
    assert out.count("> " + shown1 + "\n") == 2  # the same reply after /reset: the history was cleared
    assert "> " + r2 + ("\n" if r2 and c2 else "") + c2 + "\n" in out
    assert "unknown command /bogus" in out and "\033[" not in out  # no colour codes off a terminal
    assert (tmp_path / "state" / "nanoseek" / "chat_history").exists()


def test_penalties_and_logprobs_through_the_engine(model):
    """A frequency penalty == a hand loop that subtracts it; logprobs and top_logprobs are the model's."""
    prompt, pen = TOK.encode(PROMPTS[0]), 1.5
    params = SamplingParams(temperature=0, max_tokens=10, frequency_penalty=pen, logprobs=True, top_logprobs=3,
                            prompt_logprobs=2)
    outs = list(Engine(model, TOK).stream(prompt, params))
    ids, counts, want, want_lp = list(prompt), torch.zeros(512), [], []
    with torch.no_grad():
        full = model(torch.tensor([prompt]))[0].log_softmax(-1)
        for _ in range(10):
            logits = model(torch.tensor([ids]))[0, -1] - pen * counts
            token = int(logits.argmax())
            want.append(token)
            want_lp.append(float(logits.log_softmax(-1)[token]))
            counts[token] += 1
            ids.append(token)
    assert [o.token for o in outs] == want
    assert [o.logprob for o in outs] == pytest.approx(want_lp, abs=1e-4)
    assert all(len(o.top_logprobs) == 3 and o.top_logprobs[0][1] >= o.top_logprobs[2][1] for o in outs)
    engine = Engine(model, TOK)
    req = engine.generate([prompt], params)[0]
    assert req.prompt_logprobs[0] is None and len(req.prompt_logprobs) == len(prompt)
    for i, (lp, top) in enumerate(req.prompt_logprobs[1:], start=1):
        assert lp == pytest.approx(float(full[i - 1, prompt[i]]), abs=1e-4)
        assert [t for t, _ in top] == full[i - 1].topk(2).indices.tolist()
