"""Byte-level BPE tokenizer with DeepSeek's special tokens and chat template.

    tok = Tokenizer.train(texts, vocab_size=4096)     # HF `tokenizers` BPE, in-process
    tok = Tokenizer.byte_level()                      # no training: 256 bytes + special tokens
    ids, mask = tok.render_chat([{"role": "user", "content": "2+2?"},
                                 {"role": "assistant", "content": "<think>...</think><answer>4</answer>"}])
    tok.save(model_dir)                               # tokenizer.json + tokenizer_config.json

Special tokens take ids 0..8 (begin/end of sentence first, as in DeepSeek-V3: bos=0, eos=1).
`render_chat` gives exactly the ids transformers' `apply_chat_template` gives on the saved dir;
its mask covers the assistant's tokens (and the end-of-sentence that closes them) only.
No normaliser: encode -> decode reproduces any text byte for byte.

A tokenizer made elsewhere (any HF tokenizer.json, e.g. DeepSeek's own, which has no <answer>)
loads too: its begin/end/pad tokens are those its tokenizer_config.json names, chat renders its
chat template as transformers does, and tags it lacks are plain text. Only what truly needs a
token it lacks (a chat without a template, pretraining shards without a begin token) fails.
"""

from __future__ import annotations

import json
import os
from functools import cached_property
from pathlib import Path
from typing import Iterable, Sequence

from tokenizers import Regex
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from .io import model_dir

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
PAD = "<｜▁pad▁｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
THINK, THINK_END = "<think>", "</think>"
ANSWER, ANSWER_END = "<answer>", "</answer>"
SPECIAL_TOKENS = [BOS, EOS, PAD, USER, ASSISTANT, THINK, THINK_END, ANSWER, ANSWER_END]

# The same rendering as `render_chat`, for transformers, vLLM and SGLang.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }}"
    "{% elif message['role'] == 'user' %}{{ '" + USER + "' + message['content'] }}"
    "{% elif message['role'] == 'assistant' %}{{ '" + ASSISTANT + "' + message['content'] + '" + EOS + "' }}"
    "{% else %}{{ raise_exception('unknown role: ' + message['role']) }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '" + ASSISTANT + "' }}{% endif %}"
)
ROLES = ("system", "user", "assistant")


class TokenizerError(ValueError):
    """A tokenizer dir or a chat message is invalid; the message says which and why."""


def _pre_tokenizer():
    """Every digit is a piece of its own, as DeepSeek LLM and LLaMA split numbers: column arithmetic
    then sees digits, never "95" as one opaque token. The space before a number is a piece of its
    own too, so a digit is one token wherever it stands and copying it from the prompt into the
    working is copying the same token. Then GPT-2-style byte-level pieces."""
    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(r"\p{N}"), behavior="isolated"),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])


def _token_name(value) -> str | None:
    """A special token as tokenizer_config.json names it: a string, or an object with its content."""
    return value.get("content") if isinstance(value, dict) else value if isinstance(value, str) else None


class Tokenizer:
    def __init__(self, tk: HFTokenizer, config: dict | None = None, source: str = "tokenizer"):
        """`config`: the tokenizer_config.json of a tokenizer made elsewhere; None for nanoseek's own, which
        must have all nine special tokens."""
        self.tk, self.source = tk, source
        ids = {t: tk.token_to_id(t) for t in SPECIAL_TOKENS}
        self.native = all(i is not None for i in ids.values())
        if config is None and not self.native:
            missing = [t for t, i in ids.items() if i is None]
            raise TokenizerError(f"tokenizer lacks special token(s) {', '.join(missing)}")
        self.config = None if self.native else config

        def named(key: str, fallback: str) -> int | None:
            name = _token_name((config or {}).get(key))
            found = tk.token_to_id(name) if name else None
            return found if found is not None else ids[fallback]

        self.bos_id, self.eos_id = named("bos_token", BOS), named("eos_token", EOS)
        pad = named("pad_token", PAD)
        self.pad_id = pad if pad is not None else self.eos_id if self.eos_id is not None else 0  # masked out anyway
        self.user_id, self.assistant_id = ids[USER], ids[ASSISTANT]
        self.think_id, self.think_end_id = ids[THINK], ids[THINK_END]
        self.answer_id, self.answer_end_id = ids[ANSWER], ids[ANSWER_END]
        added = {i for i, t in tk.get_added_tokens_decoder().items() if t.special}
        self.special_ids = frozenset({i for i in ids.values() if i is not None} | added)
        self.chat_template = CHAT_TEMPLATE if self.native else (config or {}).get("chat_template")

    # ---- construction ----------------------------------------------------------------
    @classmethod
    def byte_level(cls) -> "Tokenizer":
        """The 9 special tokens and the 256 bytes, no merges: works without any training."""
        vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
        for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):  # alphabet() order varies per process
            vocab[ch] = len(vocab)
        return cls(_assemble(HFTokenizer(models.BPE(vocab=vocab, merges=[]))))

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, show_progress: bool = False) -> "Tokenizer":
        floor = len(SPECIAL_TOKENS) + 256
        if vocab_size < floor:
            raise TokenizerError(f"vocab_size must be >= {floor} (9 special tokens + 256 bytes); got {vocab_size}")
        tk = HFTokenizer(models.BPE())
        tk.pre_tokenizer = _pre_tokenizer()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                      show_progress=show_progress)
        tk.train_from_iterator(texts, trainer=trainer)
        return cls(_assemble(tk))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Tokenizer":
        """From a tokenizer dir or file, a model dir, or a training run dir (its newest checkpoint)."""
        path = model_dir(path)
        f = path / "tokenizer.json" if path.is_dir() else path
        if not f.exists():
            raise TokenizerError(f"{f}: not found (train one with `nanoseek tokenizer`)")
        try:
            tk = HFTokenizer.from_file(str(f))
        except Exception as e:
            raise TokenizerError(f"{f}: not a valid tokenizer.json ({e})") from None
        config_file = f.with_name("tokenizer_config.json")
        try:
            config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.exists() else {}
        except json.JSONDecodeError as e:
            raise TokenizerError(f"{config_file}: invalid JSON at line {e.lineno}: {e.msg}") from None
        if not isinstance(config, dict):
            raise TokenizerError(f"{config_file}: expected a JSON object")
        if isinstance(config.get("chat_template"), list):  # named templates: take the default
            named = {t.get("name"): t.get("template") for t in config["chat_template"] if isinstance(t, dict)}
            config["chat_template"] = named.get("default")
        jinja = f.with_name("chat_template.jinja")  # where transformers >= 4.50 saves it; it wins, as there
        if jinja.exists():
            config["chat_template"] = jinja.read_text(encoding="utf-8")
        try:
            return cls(tk, config, source=str(f.parent))
        except TokenizerError as e:
            raise TokenizerError(f"{f}: {e}") from None

    def save(self, path: str | os.PathLike, model_max_length: int | None = None) -> None:
        """Write tokenizer.json and tokenizer_config.json (with the chat template) into `path`."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        for name, content in self.files(model_max_length).items():
            tmp = path / f".{name}.tmp"
            tmp.write_text(content, encoding="utf-8")
            os.replace(tmp, path / name)

    def files(self, model_max_length: int | None = None) -> dict[str, str]:
        """The file contents `save` writes, for writers that place them themselves. A tokenizer made
        elsewhere keeps its own tokenizer_config.json."""
        if not self.native:
            config = dict(self.config or {})
            if model_max_length and "model_max_length" not in config:
                config["model_max_length"] = model_max_length
            return {"tokenizer.json": self.tk.to_str(),
                    "tokenizer_config.json": json.dumps(config, indent=2, ensure_ascii=False)}
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": BOS, "eos_token": EOS, "pad_token": PAD,
            "add_bos_token": False, "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
            "chat_template": CHAT_TEMPLATE,
        }
        if model_max_length:
            config["model_max_length"] = model_max_length
        return {"tokenizer.json": self.tk.to_str(), "tokenizer_config.json": json.dumps(config, indent=2,
                                                                                       ensure_ascii=False)}

    # ---- use -------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.tk.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.tk.encode(text, add_special_tokens=False).ids

    def encode_prompt(self, text: str) -> list[int]:
        """A completion prompt as transformers' tokenizer(text) encodes it: with whatever the tokenizer adds
        around a text (a begin token for DeepSeek's; nothing for nanoseek's, whose config says so)."""
        if self.native or (self.config or {}).get("add_bos_token") is False:
            return self.encode(text)
        ids = self.tk.encode(text, add_special_tokens=True).ids
        if self.config.get("add_bos_token") and self.bos_id is not None and ids[:1] != [self.bos_id]:
            ids = [self.bos_id] + ids
        return ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self.tk.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self.tk.decode(list(ids), skip_special_tokens=skip_special_tokens)

    @property
    def decodes_bytes(self) -> bool:
        """Whether decoding joins the tokens' bytes and reads them as UTF-8 (a byte-level decoder, as every
        tokenizer nanoseek trains has): then the text of a sequence is the text of a prefix that ends on
        a whole character followed by the text of the rest, so a stream can decode only what is new."""
        return isinstance(self.tk.decoder, decoders.ByteLevel)

    def token_bytes(self, token: int) -> bytes:
        """The raw bytes one token stands for (part of a UTF-8 character, possibly): what the
        OpenAI API's `bytes` fields report, where the decoded text would show U+FFFD."""
        piece = self.tk.id_to_token(token)
        if piece is None:  # a row of a model vocabulary padded past the tokenizer's: decodes to nothing
            return b""
        if token in self.special_ids or not self.decodes_bytes:
            return piece.encode() if token in self.special_ids else self.decode([token]).encode()
        try:
            return bytes(_BYTE_OF_CHAR[c] for c in piece)
        except KeyError:  # an added token of a tokenizer made elsewhere: its text as it is
            return piece.encode()

    def check_fits(self, vocab_size: int) -> None:
        """Raise TokenizerError when a model with `vocab_size` rows cannot embed every token id."""
        if self.vocab_size > vocab_size:
            raise TokenizerError(f"the tokenizer has {self.vocab_size} tokens but the model's vocab_size is "
                                 f"{vocab_size}; use a smaller tokenizer or a config with a larger vocab_size")

    def render_chat(self, messages: Sequence[dict], add_generation_prompt: bool = False
                    ) -> tuple[list[int], list[int]]:
        """Token ids of a conversation and a loss mask that is 1 on the assistant's tokens only."""
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                raise TokenizerError(f"messages[{i}]: expected {{'role': one of {', '.join(ROLES)}, "
                                     f"'content': str}} (got {m!r:.80})")
        if not self.native:
            return self._render_template(messages, add_generation_prompt)
        ids, mask = [self.bos_id], [0]
        for m in messages:
            # special tokens split the text, so encoding segment by segment equals encoding the
            # whole rendered string, which is what the Jinja template + transformers do
            body = self.encode(m["content"])
            if m["role"] == "system":
                ids += body
                mask += [0] * len(body)
            elif m["role"] == "user":
                ids += [self.user_id] + body
                mask += [0] * (len(body) + 1)
            else:
                ids += [self.assistant_id] + body + [self.eos_id]
                mask += [0] + [1] * (len(body) + 1)
        if add_generation_prompt:
            ids.append(self.assistant_id)
            mask.append(0)
        return ids, mask

    @cached_property
    def _template(self):
        """The chat template compiled once, in the environment transformers' apply_chat_template gives it, and
        the special-token variables it renders with."""
        import datetime

        import jinja2
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        if not self.chat_template:
            raise TokenizerError(f"{self.source}: the tokenizer has no chat_template in its tokenizer_config.json, "
                                 f"so chat cannot be rendered; use plain completion, or add a template")

        def raise_exception(message):
            raise TokenizerError(f"{self.source}: the chat template refused the messages: {message}")

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        env.filters["tojson"] = lambda x, indent=None, separators=None, sort_keys=False: json.dumps(
            x, ensure_ascii=False, indent=indent, separators=separators, sort_keys=sort_keys)
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
        config = self.config or {}
        specials = {k: name for k in ("bos_token", "eos_token", "pad_token", "unk_token", "sep_token", "cls_token",
                                      "mask_token") if (name := _token_name(config.get(k)))}
        try:
            return env.from_string(self.chat_template), specials
        except jinja2.TemplateError as e:
            raise TokenizerError(f"{self.source}: its chat template failed: {e}") from None

    def _template_ids(self, messages: Sequence[dict], add_generation_prompt: bool) -> list[int]:
        import jinja2

        template, specials = self._template
        try:
            text = template.render(messages=list(messages), add_generation_prompt=add_generation_prompt, tools=None,
                                   documents=None, **specials)
        except jinja2.TemplateError as e:
            raise TokenizerError(f"{self.source}: its chat template failed: {e}") from None
        return self.encode(text)

    def _render_template(self, messages: Sequence[dict], add_generation_prompt: bool
                         ) -> tuple[list[int], list[int]]:
        """The tokenizer's own chat template; the mask covers each assistant turn, found as what rendering the
        turn adds to the conversation before it (with its generation prompt)."""
        ids = self._template_ids(messages, add_generation_prompt)
        mask = [0] * len(ids)
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before, upto = self._template_ids(messages[:i], True), self._template_ids(messages[:i + 1], False)
            if upto[:len(before)] != before or ids[:len(upto)] != upto:
                raise TokenizerError(f"{self.source}: its chat template does not render assistant turn {i} as an "
                                     f"extension of the conversation before it (with its generation prompt), so "
                                     f"the turn's tokens cannot be masked for training; make the template render "
                                     f"an assistant turn starting with exactly what add_generation_prompt adds, or "
                                     f"train with a tokenizer from `nanoseek tokenizer`")
            mask[len(before):len(upto)] = [1] * (len(upto) - len(before))
        return ids, mask


def train_on_files(paths: Sequence[str | os.PathLike], vocab_size: int, text_field: str | None = None,
                   progress: bool = False) -> tuple[Tokenizer, list[str]]:
    """A tokenizer trained on the documents under `paths` (`nanoseek tokenizer`), and the inputs it skipped,
    each as "why: where"."""
    from .data.readers import iter_documents

    skipped: list[str] = []
    texts = (text for _, text, _ in iter_documents(paths, lambda why, where: skipped.append(f"{why}: {where}"),
                                                   text_field))
    return Tokenizer.train(texts, vocab_size, show_progress=progress), skipped


def _byte_of_char() -> dict[str, int]:
    """Byte-level BPE's alphabet: printable bytes stand for themselves, the other bytes take the
    characters from U+0100 on, in byte order."""
    printable = {*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)}
    table, shifted = {}, 0
    for b in range(256):
        if b in printable:
            table[chr(b)] = b
        else:
            table[chr(0x100 + shifted)] = b
            shifted += 1
    return table


_BYTE_OF_CHAR = _byte_of_char()


def _assemble(tk: HFTokenizer) -> HFTokenizer:
    """Byte-level pieces around a BPE model, with the special tokens registered as special."""
    tk.pre_tokenizer = _pre_tokenizer()
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens(SPECIAL_TOKENS)
    return tk
