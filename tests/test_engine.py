"""The engine: continuous batching == one by one == a plain greedy loop == transformers; seeds; cancel."""

import pytest
import torch

from nanoseek import Transformer, preset
from nanoseek.engine.engine import Engine
from nanoseek.engine.sampling import SamplingParams
from nanoseek.tokenizer import Tokenizer

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
    assert main(["generate", "--model", str(tmp_path / "m"), "--prompt", "x", "--top-p", "0"]) == 2
    assert "top_p must be in (0, 1]" in capsys.readouterr().err
