import pytest

from nanoseek.tokenizer import ANSWER, BOS, EOS, SPECIAL_TOKENS, THINK, THINK_END, Tokenizer, TokenizerError

CORPUS = ["The quick brown fox jumps over the lazy dog. 12 + 34 = 46.",
          "你好，世界！这是一个测试。", "def f(x):\n    return x * 2\n", "emoji 😀🎉 and tabs\tand\r\nnewlines"] * 40
TRICKY = ["", "a", "\x00\x01\x7f control \x1b[31m", "中文 English 混合 🙂", "  leading and trailing  ",
          "<think> reasoning </think> <answer>4</answer>", "é (composed) vs e\u0301 (decomposed)",
          "\ufeff BOM, \u200b zero width, \U0010ffff last code point", "a" * 5000]


@pytest.fixture(scope="module")
def trained():
    return Tokenizer.train(CORPUS, vocab_size=400)


def test_special_ids_fixed_order(trained):
    for tok in (trained, Tokenizer.byte_level()):
        assert [tok.tk.token_to_id(t) for t in SPECIAL_TOKENS] == list(range(9))
        assert (tok.bos_id, tok.eos_id) == (0, 1)
    assert Tokenizer.byte_level().vocab_size == 265


@pytest.mark.parametrize("text", TRICKY + CORPUS[:4])
def test_round_trip_exact(trained, text):
    for tok in (trained, Tokenizer.byte_level()):
        assert tok.decode(tok.encode(text)) == text


def test_special_tokens_never_split(trained):
    for tok in (trained, Tokenizer.byte_level()):
        for t in SPECIAL_TOKENS:
            assert tok.encode(t) == [tok.tk.token_to_id(t)]
        ids = tok.encode(f"x{THINK}y{THINK_END}{ANSWER}")
        assert tok.think_id in ids and tok.think_end_id in ids and tok.answer_id in ids


def test_training_learns_merges(trained):
    assert trained.vocab_size > 265
    assert len(trained.encode(CORPUS[0])) < len(Tokenizer.byte_level().encode(CORPUS[0]))


def test_numbers_are_split_into_digits():
    """However often a number occurs, every digit is a token of its own, with nothing else on it: the 9 of
    " 95" in a prompt is the same token as the 9 at the start of a line of working."""
    tok = Tokenizer.train(["What is 95 + 80? so 95 + 80 = 175\n9 + 8\n" * 200, "year 2024, 3.14159 ١٢٣\n" * 200], 400)
    texts = [tok.tk.decoder.decode([t]) for t in tok.tk.get_vocab()]
    assert [t for t in texts if any(c.isdigit() for c in t) and len(t) > 1] == []
    pieces = [tok.decode([i]) for i in tok.encode("What is 95 + 80?\n9 + 8")]
    assert pieces[pieces.index("9") - 1:pieces.index("9") + 2] == [" ", "9", "5"]
    assert pieces[-4:] == ["9", " +", " ", "8"]
    assert tok.decode(tok.encode("95 + 80 = 175")) == "95 + 80 = 175"


def test_vocab_size_floor():
    with pytest.raises(TokenizerError, match="vocab_size must be >= 265"):
        Tokenizer.train(CORPUS, vocab_size=100)


MESSAGES = [
    [{"role": "user", "content": "What is 2 + 2?"},
     {"role": "assistant", "content": "<think>\n2 + 2 = 4\n</think> <answer>4</answer>"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "你好"},
     {"role": "assistant", "content": "你好！"}, {"role": "user", "content": "again 😀"}],
]


@pytest.mark.parametrize("messages", MESSAGES)
@pytest.mark.parametrize("gen", [False, True])
def test_render_chat_matches_transformers(trained, tmp_path, messages, gen):
    transformers = pytest.importorskip("transformers")
    trained.save(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    want = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=gen)
    if not isinstance(want, list):
        want = want["input_ids"]
    ids, mask = trained.render_chat(messages, add_generation_prompt=gen)
    assert ids == want
    assert hf.decode(want) == trained.decode(ids)


def test_render_chat_mask_covers_assistant_only(trained):
    ids, mask = trained.render_chat(MESSAGES[0])
    assert len(ids) == len(mask) and ids[0] == trained.bos_id and ids[-1] == trained.eos_id
    learned = [i for i, m in zip(ids, mask) if m]
    assert trained.decode(learned) == MESSAGES[0][1]["content"] + EOS
    assert trained.assistant_id not in learned and BOS not in trained.decode(learned)


@pytest.mark.parametrize("bad, where", [([{"role": "robot", "content": "x"}], "messages[0]"),
                                        ([{"role": "user"}], "messages[0]"),
                                        ([{"role": "user", "content": "ok"}, "text"], "messages[1]")])
def test_render_chat_rejects_bad_messages(trained, bad, where):
    with pytest.raises(TokenizerError, match=where.replace("[", r"\[")):
        trained.render_chat(bad)


def test_load_errors(tmp_path):
    with pytest.raises(TokenizerError, match="not found"):
        Tokenizer.load(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{broken")
    with pytest.raises(TokenizerError, match="not a valid tokenizer.json"):
        Tokenizer.load(tmp_path)


def test_byte_level_ids_are_the_same_in_every_process():
    import subprocess
    import sys
    code = "from nanoseek.tokenizer import Tokenizer; print(Tokenizer.byte_level().encode('What is 2+2? 你'))"
    here = str(Tokenizer.byte_level().encode("What is 2+2? 你"))
    for _ in range(3):
        assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == here
