"""Streaming detokenisation: UTF-8 safe deltas, stop strings never leaked even across tokens."""

import random

import pytest

from nanoseek.engine.stream import TextStream
from nanoseek.tokenizer import Tokenizer

BYTES = Tokenizer.byte_level()  # one token per byte: multi-byte characters span several tokens


def run(text, stop=(), tok=BYTES):
    stream = TextStream(tok, stop)
    deltas = []
    for t in tok.encode(text):
        deltas.append(stream.push(t))
        if stream.stopped:
            break
    deltas.append(stream.finish())
    return deltas, stream


@pytest.mark.parametrize("text", ["plain ascii", "中文和emoji 😀 mixed", "é\u0301 combining", "\x00\x01 controls"])
def test_deltas_concatenate_to_the_text_and_never_split_a_character(text):
    deltas, stream = run(text)
    assert "".join(deltas) == text == stream.text
    assert not any("\ufffd" in d for d in deltas)


@pytest.mark.parametrize("text, stop, want", [
    ("hello world. The end", ["."], "hello world"),
    ("answer: 42\n\nmore text", ["\n\n"], "answer: 42"),
    ("abcSTOPdef", ["STOP"], "abc"),
    ("STOP at once", ["STOP"], ""),
    ("no stop here", ["STOP"], "no stop here"),
    ("almost STO", ["STOP"], "almost STO"),  # a held-back prefix comes out at the end
    ("x 😀😀 y", ["😀😀"], "x "),  # a multi-byte stop string split across byte tokens
    ("first<|x|>second", ["<|x|>", "nope"], "first"),
])
def test_stop_strings_are_never_leaked(text, stop, want):
    deltas, stream = run(text, stop)
    assert "".join(deltas) == want
    for i in range(1, len(deltas) + 1):  # no prefix of the output ever contained the stop string
        assert not any(s in "".join(deltas[:i]) for s in stop)


def test_held_back_text_waits_for_the_next_token():
    stream = TextStream(BYTES, ["END"])
    out = [stream.push(t) for t in BYTES.encode("xEN")]
    assert "".join(out) == "x"  # "EN" might become "END"
    assert stream.push(BYTES.encode("d")[0]) == "ENd"


class WholeDecode:
    """The tokenizer decoding the whole sequence at every token: what the stream did before it decoded
    only the new ids, and the reference for it."""

    decodes_bytes = False

    def __init__(self, tok):
        self.decode = tok.decode


@pytest.mark.parametrize("vocab", ["bytes", "trained"])
def test_decoding_only_new_ids_streams_what_the_whole_sequence_decodes(vocab):
    """Random ids: split multi-byte characters, invalid bytes, special tokens in between. The stream
    that decodes only what follows the last whole character hands out the same deltas, at the same
    tokens, as one that decodes everything each time, with and without a stop string."""
    tok = BYTES if vocab == "bytes" else Tokenizer.train(["héllo wörld 中文 😀 ok\n" * 50, "answer: 42\n" * 50], 300)
    assert tok.decodes_bytes
    rng = random.Random(0)
    for trial in range(60):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randrange(1, 120))]
        stop = [rng.choice(["", "a", "ö", "\ufffd", "😀", "<think>x"])]
        ours, ref = TextStream(tok, stop), TextStream(WholeDecode(tok), stop)
        for t in ids:
            assert ours.push(t) == ref.push(t), (trial, ids)
            assert ours.stopped == ref.stopped
        assert ours.finish() == ref.finish()
        assert ours.text == ref.text
        if not ref.stopped:
            assert ours.text == tok.decode(ids)
