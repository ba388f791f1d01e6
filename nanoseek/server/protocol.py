"""The OpenAI request bodies the server accepts, their checks, and its error shape.

Bodies are pydantic models, so FastAPI publishes them in /openapi.json; every rule a model cannot
state (stop lists, top_logprobs without logprobs, ...) is checked here and raised as `APIError`
naming the parameter. Unknown fields are accepted and ignored, as OpenAI-compatible servers do.
Every string in a body, field names and ignored fields included, must be valid Unicode: JSON can
escape a lone surrogate (`"\\ud800"`), which no tokenizer or UTF-8 response can carry.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ..engine.sampling import SamplingParams

INT64 = 2 ** 63


class APIError(Exception):
    """An error answered as {"error": {"message", "type", "param", "code"}} with an HTTP status."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
             413: "invalid_request_error", 503: "server_busy", 500: "internal_error"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "error"),
                          "param": self.param, "code": self.code}}


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str
    max_tokens: int | None = Field(None, ge=0, description="new tokens; default: the rest of the context")
    temperature: float | None = Field(None, ge=0, le=2, description="0 is greedy; default 1")
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0, description="0 turns it off")
    n: int = Field(1, ge=1, le=64)
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    stop: Annotated[str, Field(min_length=1)] | Annotated[list[Annotated[str, Field(min_length=1)]], Field(
        max_length=4)] | None = Field(None, description="up to 4 strings, never part of the output")
    seed: int | None = Field(None, ge=-INT64, lt=INT64)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    user: str | None = None
    ignore_eos: bool = Field(False, description="extension (as vLLM): keep generating past end-of-sentence")

    def unknown_fields(self) -> list[str]:
        return sorted(self.model_extra or {})


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None


class ChatRequest(_Body):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)


class CompletionRequest(_Body):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=20, description="alternatives per token (the legacy API)")
    suffix: str | None = None


ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


def chat_messages(req: ChatRequest) -> list[dict]:
    """The conversation as render_chat takes it; an assistant turn's reasoning is not fed back."""
    out = []
    for i, m in enumerate(req.messages):
        if m.role not in ROLES:
            raise APIError(400, f"messages[{i}].role must be one of {', '.join(ROLES)} (got {m.role!r})",
                           f"messages[{i}].role")
        if isinstance(m.content, list):
            texts = []
            for j, part in enumerate(m.content):
                if part.type != "text" or part.text is None:
                    raise APIError(400, f"messages[{i}].content[{j}]: only text parts are supported "
                                        f"(got type {part.type!r})", f"messages[{i}].content")
                texts.append(part.text)
            content = "".join(texts)
        else:
            content = m.content or ""
        out.append({"role": ROLES[m.role], "content": content})
    return out


def not_unicode(param: str | None) -> APIError:
    """The error for a string holding a lone surrogate, naming where it is (None: a field name at the top)."""
    return APIError(400, f"{param or 'the body'} is not valid Unicode text: it holds a lone surrogate (an unpaired "
                         "\\ud800-\\udfff escape); send characters outside the BMP as a surrogate pair "
                         "(\\ud83d\\ude00) or as UTF-8", param)


def check_unicode(req: _Body) -> None:
    """Raise `not_unicode` for the first string in the body, or field name, holding a lone surrogate."""
    todo = [(req.model_dump(), "")]  # a stack, not recursion: ignored fields may nest deeply
    while todo:
        value, path = todo.pop()
        if isinstance(value, str):
            if not _is_unicode(value):
                raise not_unicode(path or None)
        elif isinstance(value, dict):
            if not all(_is_unicode(key) for key in value):  # the key cannot be named in the reply
                raise not_unicode(path or None)
            todo += reversed([(v, f"{path}.{k}" if path else k) for k, v in value.items()
                              if isinstance(v, (str, dict, list))])
        elif isinstance(value, list):
            todo += reversed([(v, f"{path}[{i}]") for i, v in enumerate(value) if isinstance(v, (str, dict, list))])


def _is_unicode(text: str) -> bool:
    # a str from JSON fails to encode only where it holds a surrogate
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def sampling(req: _Body, max_tokens: int, n: int, logprobs: bool = False, top_logprobs: int = 0,
             prompt_logprobs: int | None = None) -> list[SamplingParams]:
    """The engine's parameters for each of n choices (choice i seeded with seed + i); raises
    APIError naming the first bad parameter."""
    t = 1.0 if req.temperature is None else req.temperature
    if not math.isfinite(t) or not 0 <= t <= 2:
        raise APIError(400, f"temperature must be a finite number in [0, 2] (got {req.temperature})", "temperature")
    top_p = 1.0 if req.top_p is None else req.top_p
    if not (math.isfinite(top_p) and 0 < top_p <= 1):
        raise APIError(400, f"top_p must be in (0, 1] (got {req.top_p})", "top_p")
    if req.top_k is not None and req.top_k < 0:
        raise APIError(400, f"top_k must be >= 0, 0 turning it off (got {req.top_k})", "top_k")
    for name in ("presence_penalty", "frequency_penalty"):
        v = getattr(req, name)
        if v is not None and not (math.isfinite(v) and -2 <= v <= 2):
            raise APIError(400, f"{name} must be in [-2, 2] (got {v})", name)
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stop) > 4 or not all(stop):
        raise APIError(400, "stop must be a non-empty string or a list of at most 4 non-empty strings", "stop")
    if req.seed is not None and not -INT64 <= req.seed < INT64:
        raise APIError(400, f"seed must fit in a signed 64-bit integer (got {req.seed})", "seed")
    if req.stream_options is not None and not req.stream:
        raise APIError(400, "stream_options is only allowed when stream is true", "stream_options")
    return [SamplingParams(temperature=t, top_p=top_p, top_k=req.top_k or 0,
                           seed=None if req.seed is None else (req.seed + i) % INT64, max_tokens=max_tokens,
                           stop=stop, presence_penalty=req.presence_penalty or 0.0,
                           frequency_penalty=req.frequency_penalty or 0.0, logprobs=logprobs,
                           top_logprobs=top_logprobs, prompt_logprobs=prompt_logprobs, ignore_eos=req.ignore_eos)
            for i in range(n)]


def check_n(req: _Body) -> None:
    if not 1 <= req.n <= 64:
        raise APIError(400, f"n must be in [1, 64] (got {req.n})", "n")


def token_budget(prompt_tokens: int, asked: int | None, context: int, param: str = "max_tokens",
                 prompt_param: str = "prompt") -> int:
    """max_tokens for a prompt: what was asked, or the rest of the context; errors name both numbers."""
    if prompt_tokens >= context:
        raise APIError(400, f"Input length ({prompt_tokens}) exceeds the model's maximum context length "
                            f"({context}), which must also hold at least one generated token",
                       prompt_param, "context_length_exceeded")
    if asked is None:
        return context - prompt_tokens
    if asked < 1:
        raise APIError(400, f"{param} must be >= 1 (got {asked})", param)
    if prompt_tokens + asked > context:
        raise APIError(400, f"Input length ({prompt_tokens}) plus {param} ({asked}) is {prompt_tokens + asked} "
                            f"tokens, over the model's maximum context length ({context}); ask for at most "
                            f"{context - prompt_tokens} new tokens", param, "context_length_exceeded")
    return asked


def include_usage(req: _Body) -> bool:
    opts = req.stream_options or {}
    value = opts.get("include_usage", False)
    if not isinstance(value, bool):
        raise APIError(400, "stream_options.include_usage must be a boolean", "stream_options")
    return value

