"""`nanoseek serve`: an OpenAI-compatible HTTP server over the engine, and a web chat page.

    app = create_app(engine, tokenizer, model_name="base")
    uvicorn.run(app, host="127.0.0.1", port=8000)

Routes: `/v1/chat/completions` and `/v1/completions` (stream or not, n choices, stop, seed,
logprobs; completions also take token-id prompts and `echo`, for lm-evaluation-harness),
`/v1/models`, `/health` and `/` (the chat page). Each route is a function of its own; both
generating routes hand their choices to `respond`, which assembles either server-sent events or
one JSON body. Every request becomes engine requests on the engine thread (`runner.py`), so all
clients share continuous batching. A client that goes away cancels its sequences, which frees
their cache blocks.

Errors are OpenAI's JSON shape, {"error": {"message", "type", "param", "code"}}: 400 for an
invalid parameter (naming it) or a body that is not JSON, 401 for a missing or wrong API key,
404 for another model or route, 413 for a body over the limit, 503 at once when the running +
waiting bounds are full (a client retries later), 500 only for a fault of the server's own. A
stream that fails after its 200 ends with an error event, then `[DONE]`.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from dataclasses import dataclass
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..engine.engine import Engine, Output
from ..engine.reasoning import ReasoningSplitter
from ..tokenizer import Tokenizer, TokenizerError
from .protocol import (APIError, ChatRequest, CompletionRequest, chat_messages, check_n, check_unicode,
                       include_usage, not_unicode, sampling, token_budget)
from .runner import EngineRunner, Handle

log = logging.getLogger("nanoseek.server")


@dataclass
class Served:
    """What the routes share, kept on `app.state.served`."""
    runner: EngineRunner
    tok: Tokenizer
    name: str  # the one model name clients must ask for
    context: int  # the engine's max_len: prompt + new tokens
    vocab: int  # a prompt's token ids must be below it
    reasoning: bool  # split text at </think> into reasoning_content and content
    created: int


def create_app(engine: Engine, tok: Tokenizer, model_name: str, api_key: str | None = None, max_queue: int = 64,
               max_body: int = 1 << 20, reasoning: bool = True, engine_thread: bool = True) -> FastAPI:
    """engine_thread: start the engine on a thread with the app; False when the caller runs
    `app.state.runner.run()` itself (on the main thread, as `nanoseek serve` does)."""
    app = FastAPI(title="nanoseek", version="1", lifespan=_lifespan,
                  description="OpenAI-compatible API over nanoseek's latent-cache engine.")
    app.state.runner = EngineRunner(engine, max_queue)
    app.state.engine_thread = engine_thread
    app.state.served = Served(app.state.runner, tok, model_name, engine.max_len, engine.model.cfg.vocab_size,
                              reasoning, int(time.time()))
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(RequestValidationError, _invalid)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _fault)
    app.add_middleware(Guard, api_key=api_key, max_body=max_body)
    app.openapi = lambda: _openapi(app)
    app.get("/", response_class=HTMLResponse, include_in_schema=False)(page)
    app.get("/health")(health)
    app.get("/v1/models")(models)
    app.post("/v1/chat/completions")(chat)
    app.post("/v1/completions")(completions)
    return app


async def _lifespan(app: FastAPI):
    if app.state.engine_thread:
        app.state.runner.start()
    yield
    if app.state.engine_thread:
        app.state.runner.stop()


def _openapi(app: FastAPI) -> dict:
    """FastAPI's schema, with `model` narrowed to the one model served here."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        for name in ("ChatRequest", "CompletionRequest"):
            schema["components"]["schemas"][name]["properties"]["model"] = {
                "type": "string", "enum": [app.state.served.name], "title": "Model"}
        app.openapi_schema = schema
    return app.openapi_schema


# ---- routes ---------------------------------------------------------------------------------------
async def page():
    return resources.files("nanoseek.server").joinpath("chat.html").read_text(encoding="utf-8")


async def health(request: Request):
    return {"status": "ok", **request.app.state.runner.stats()}


async def models(request: Request):
    s: Served = request.app.state.served
    return {"object": "list", "data": [{"id": s.name, "object": "model", "created": s.created,
                                        "owned_by": "nanoseek", "max_model_len": s.context}]}


async def chat(body: ChatRequest, request: Request):
    s: Served = request.app.state.served
    _check_common(body, s)
    try:
        ids, _ = s.tok.render_chat(chat_messages(body), add_generation_prompt=True)
    except TokenizerError as e:
        raise APIError(400, str(e), "messages") from None
    if body.top_logprobs is not None:
        if not body.logprobs:
            raise APIError(400, "top_logprobs is only allowed when logprobs is true", "top_logprobs")
        if not 0 <= body.top_logprobs <= 20:
            raise APIError(400, f"top_logprobs must be in [0, 20] (got {body.top_logprobs})", "top_logprobs")
    param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    max_tokens = token_budget(len(ids), body.max_completion_tokens if param != "max_tokens" else body.max_tokens,
                              s.context, param, "messages")
    params = sampling(body, max_tokens, body.n, body.logprobs, body.top_logprobs or 0)
    usage_chunk = include_usage(body)
    gen = Generation(s.runner, [(ids, p) for p in params])
    choices = [ChatChoice(s.tok, s.reasoning, body.logprobs) for _ in params]
    return await respond(request, gen, choices, f"chatcmpl-{uuid.uuid4().hex}", len(ids), body.stream, usage_chunk)


async def completions(body: CompletionRequest, request: Request):
    s: Served = request.app.state.served
    _check_common(body, s)
    prompts = _prompts(body.prompt, s.tok, s.vocab)
    if body.suffix:
        raise APIError(400, "suffix is not supported", "suffix")
    k = body.logprobs
    if k is not None and not 0 <= k <= 20:
        raise APIError(400, f"logprobs must be in [0, 20] (got {k})", "logprobs")
    score_only = body.echo and body.max_tokens == 0  # prompt log-probabilities only
    jobs = []
    for ids in prompts:
        budget = token_budget(len(ids), None if score_only else body.max_tokens, s.context)
        jobs += [(ids, p) for p in sampling(body, 1 if score_only else budget, body.n, k is not None, k or 0,
                                            prompt_logprobs=k if body.echo and k is not None else None)]
    usage_chunk = include_usage(body)
    gen = Generation(s.runner, jobs)
    choices = [CompletionChoice(s.tok, ids, handle, body.echo, k, score_only)
               for (ids, _), handle in zip(jobs, gen.handles)]
    return await respond(request, gen, choices, f"cmpl-{uuid.uuid4().hex}", sum(len(p) for p in prompts),
                         body.stream, usage_chunk)


def _check_common(body: ChatRequest | CompletionRequest, s: Served) -> None:
    check_unicode(body)  # first: later errors quote what the client sent
    if body.model != s.name:
        raise APIError(404, f"The model '{body.model}' does not exist; this server serves '{s.name}'", "model",
                       "model_not_found")
    check_n(body)
    if body.unknown_fields():
        log.info("ignoring unknown field(s): %s", ", ".join(body.unknown_fields()))


# ---- one assembler for both routes, streamed or whole ------------------------------------------------
async def respond(request: Request, gen: Generation, choices: list[ChatChoice] | list[CompletionChoice], rid: str,
                  prompt_tokens: int, stream: bool, usage_chunk: bool):
    """Feed each engine output to its choice; stream the pieces the choices return as server-sent
    events, or wait for every choice to finish and answer them in one body."""
    kind = type(choices[0])
    head = {"id": rid, "object": kind.OBJECT, "created": int(time.time()), "model": request.app.state.served.name}
    if stream:
        events = _events(gen, choices, {**head, "object": kind.CHUNK_OBJECT}, prompt_tokens, usage_chunk)
        # X-Accel-Buffering: a proxy (nginx) would otherwise hold events back until its buffer fills
        return StreamingResponse(events, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    try:
        while gen.pending:
            i, out = await gen.next(request)
            choices[i].push(out)
    except ClientGone:
        return JSONResponse({}, status_code=499)  # nobody reads it; the client has gone
    return {**head, "choices": [{"index": i, **c.result()} for i, c in enumerate(choices)],
            "usage": _usage(prompt_tokens, sum(c.tokens for c in choices))}


async def _events(gen: Generation, choices: list, head: dict, prompt_tokens: int, usage_chunk: bool):
    """Each choice's opening, its pieces as outputs arrive, the usage chunk if asked, then [DONE]; an
    error after the 200 has gone out can only be an event of its own."""
    try:
        for i, choice in enumerate(choices):
            for piece in choice.opening():
                yield _sse({**head, "choices": [{"index": i, **piece}]})
        while gen.pending:
            i, out = await gen.next()
            for piece in choices[i].push(out):
                yield _sse({**head, "choices": [{"index": i, **piece}]})
        if usage_chunk:
            yield _sse({**head, "choices": [], "usage": _usage(prompt_tokens, sum(c.tokens for c in choices))})
    except APIError as e:
        yield _sse(e.body())
    finally:
        if gen.pending:
            gen.cancel()  # the client went away, or the stream failed: free the cache now
    yield "data: [DONE]\n\n"


class ChatChoice:
    """One chat choice: its text split into reasoning and content, and its logprobs. `push` returns
    the stream's pieces for one output (a delta, then a finish_reason of its own); `result` the
    whole message."""
    OBJECT, CHUNK_OBJECT = "chat.completion", "chat.completion.chunk"

    def __init__(self, tok: Tokenizer, reasoning: bool, logprobs: bool):
        self.tok = tok
        self.splitter = ReasoningSplitter() if reasoning else None
        self.reasoning, self.content = "", ""
        self.logprobs: list[dict] | None = [] if logprobs else None
        self.tokens, self.finish_reason = 0, None

    def opening(self) -> list[dict]:
        return [{"delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}]

    def push(self, out: Output) -> list[dict]:
        self.tokens += out.token is not None
        self.finish_reason = out.finish_reason or self.finish_reason
        r, c = self._split(out.delta, bool(out.finish_reason))
        self.reasoning += r
        self.content += c
        entry = None
        if self.logprobs is not None and out.token is not None:
            entry = _token_info(self.tok, out.token, out.logprob, out.top_logprobs)
            self.logprobs.append(entry)
        pieces = []
        if r or c or entry is not None:
            delta = {**({"reasoning_content": r} if r else {}), **({"content": c} if c else {})}
            pieces.append({"delta": delta, "finish_reason": None,
                           "logprobs": {"content": [entry]} if entry else None})
        if out.finish_reason:
            pieces.append({"delta": {}, "logprobs": None, "finish_reason": out.finish_reason})
        return pieces

    def result(self) -> dict:
        message = {"role": "assistant", "content": self.content}
        if self.splitter is not None:
            message["reasoning_content"] = self.reasoning
        return {"message": message, "finish_reason": self.finish_reason,
                "logprobs": None if self.logprobs is None else {"content": self.logprobs}}

    def _split(self, text: str, final: bool) -> tuple[str, str]:
        if self.splitter is None:
            return "", text
        r, c = self.splitter.push(text)
        if final:
            r2, c2 = self.splitter.finish()
            r, c = r + r2, c + c2
        return r, c


class CompletionChoice:
    """One completion choice: the prompt's text first when echoing, then the new text, with the
    legacy logprobs object. With `score_only` (echo and max_tokens 0) the one token generated to
    score the prompt is not shown, and the finish_reason is "length"."""
    OBJECT = CHUNK_OBJECT = "text_completion"

    def __init__(self, tok: Tokenizer, prompt: list[int], handle: Handle, echo: bool, logprobs: int | None,
                 score_only: bool):
        self.tok, self.prompt, self.handle = tok, prompt, handle
        self.k, self.score_only = logprobs, score_only
        self.echo = tok.decode(prompt) if echo else None
        self.text, self.generated = "", []  # generated: (token, logprob, top) for each new token
        self.tokens, self.finish_reason, self.started = 0, None, False

    def opening(self) -> list[dict]:
        return []

    def push(self, out: Output) -> list[dict]:
        self.finish_reason = out.finish_reason or self.finish_reason
        text = self.echo if self.echo is not None and not self.started else ""
        self.started = True
        lp = None
        if not self.score_only:
            text += out.delta
            self.text += out.delta
            self.tokens += out.token is not None
            if out.token is not None:
                self.generated.append((out.token, out.logprob, out.top_logprobs))
                if self.k is not None:
                    lp = _legacy_logprobs(self.tok, [out.token], [out.logprob], [out.top_logprobs], 0)
        if not (text or lp or out.finish_reason):
            return []
        return [{"text": text, "logprobs": lp,
                 "finish_reason": out.finish_reason and ("length" if self.score_only else out.finish_reason)}]

    def result(self) -> dict:
        echo = self.echo or ""
        lp = None
        if self.k is not None:
            lp = self._prompt_logprobs() if self.echo is not None else {}
            new = _legacy_logprobs(self.tok, [t for t, _, _ in self.generated], [x for _, x, _ in self.generated],
                                   [x for _, _, x in self.generated], len(echo))
            lp = {key: lp.get(key, []) + new[key] for key in new}
        return {"text": echo + self.text, "logprobs": lp,
                "finish_reason": "length" if self.score_only else self.finish_reason}

    def _prompt_logprobs(self) -> dict:
        pl = self.handle.request.prompt_logprobs or [None] * len(self.prompt)
        return _legacy_logprobs(self.tok, self.prompt, [None if x is None else x[0] for x in pl],
                                [None if x is None else x[1] for x in pl], 0)


class ClientGone(Exception):
    """The client disconnected; its sequences were cancelled."""


class Generation:
    """Sequences submitted together (n choices, or several prompts); outputs arrive on a queue."""

    def __init__(self, runner: EngineRunner, jobs: list[tuple[list[int], object]]):
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.runner = runner
        handles = runner.submit(jobs, self.loop, self.queue)
        if handles is None:
            raise APIError(503, f"The server is busy ({runner.stats()['accepted']} requests running or waiting, "
                                f"at most {runner.capacity}); retry later", code="server_busy")
        self.handles = handles
        self.pending = len(jobs)
        self._next: asyncio.Future | None = None
        self._checked = time.monotonic()  # when the client's connection was last looked at

    async def next(self, request: Request | None = None) -> tuple[int, Output]:
        """The next output of any of the sequences; polls for a disconnect while waiting (streams
        learn of one from Starlette, which cancels them)."""
        if request is None:
            return self._take(await self.queue.get())
        if self._next is None:
            self._next = asyncio.ensure_future(self.queue.get())
        while True:
            done, _ = await asyncio.wait({self._next}, timeout=0.5)
            if request is not None and time.monotonic() - self._checked > 0.5:  # outputs may never pause
                self._checked = time.monotonic()
                if await request.is_disconnected():
                    self.cancel()
                    raise ClientGone
            if done:
                break
        item, self._next = self._next.result(), None
        return self._take(item)

    def _take(self, item: tuple[int, Output | Exception]) -> tuple[int, Output]:
        index, out = item
        if isinstance(out, Exception) or out.finish_reason:
            self.pending -= 1
        if isinstance(out, Exception):
            raise APIError(400, str(out))
        if out.finish_reason == "error":
            raise APIError(500, "the engine failed while generating; the request was dropped", code="internal_error")
        return index, out

    def cancel(self) -> None:
        if self._next is not None:
            self._next.cancel()
        self.runner.cancel(self.handles)


# ---- error handlers: every error in the one JSON shape ---------------------------------------------
async def _api_error(request: Request, e: APIError):
    return JSONResponse(e.body(), status_code=e.status)


async def _invalid(request: Request, e: RequestValidationError):
    errors = e.errors()
    # a lone surrogate is the one thing wrong with such a string: name it before the union's other errors
    first = next((x for x in errors if x.get("type") == "string_unicode"), errors[0] if errors else {})
    param = _param(first.get("loc", ()))
    if first.get("type") == "string_unicode":
        return await _api_error(request, not_unicode(param))
    if first.get("type") == "json_invalid":
        message, param = f"The body is not valid JSON ({first.get('ctx', {}).get('error', 'parse error')})", None
    elif first.get("type") == "missing":
        message = f"{param} is required"
    else:
        message = f"{param}: {first.get('msg', 'invalid value')}" if param else first.get("msg", "invalid body")
    return JSONResponse(APIError(400, message, param).body(), status_code=400)


async def _http_error(request: Request, e: StarletteHTTPException):
    return JSONResponse(APIError(e.status_code, str(e.detail)).body(), status_code=e.status_code)


async def _fault(request: Request, e: Exception):
    log.exception("unhandled error on %s", request.url.path)
    return JSONResponse(APIError(500, "internal server error").body(), status_code=500)


class BodyTooLarge(Exception):
    pass


class Guard:
    """ASGI middleware: the API key on /v1/*, and the body size limit (413)."""

    def __init__(self, app, api_key: str | None, max_body: int):
        self.app, self.max_body = app, max_body
        self.key = api_key.encode() if api_key else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        if self.key is not None and scope["path"].startswith("/v1/"):
            auth = headers.get(b"authorization", b"")
            given = auth[7:].strip() if auth[:7].lower() == b"bearer " else b""
            if not hmac.compare_digest(given, self.key):  # constant time; the key is never logged
                return await _send(send, APIError(401, "Invalid or missing API key: send the header "
                                                       "'Authorization: Bearer <key>'", code="invalid_api_key"))
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body):
            return await _send(send, APIError(413, f"The request body is over {self.max_body} bytes",
                                              code="body_too_large"))
        received = 0
        started = False

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body:
                    raise BodyTooLarge
            return message

        async def tracking_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyTooLarge:
            if not started:
                await _send(send, APIError(413, f"The request body is over {self.max_body} bytes",
                                           code="body_too_large"))


async def _send(send, error: APIError) -> None:
    body = json.dumps(error.body()).encode()
    await send({"type": "http.response.start", "status": error.status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def _param(loc) -> str | None:
    """A validation error's location as a parameter name, e.g. messages[0].role, without the body
    prefix and pydantic's union-member tags (str, list[...], constrained-str, ...)."""
    out = ""
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("str", "int", "float", "bool") or "[" in part or "-" in part or part[:1].isupper():
            break
        else:
            out += ("." if out else "") + part
    return out or None


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _prompts(prompt, tok: Tokenizer, vocab: int) -> list[list[int]]:
    """A completion request's prompt(s) as token ids: text, texts, ids or lists of ids."""
    if isinstance(prompt, str):
        prompt = [prompt]
    if not prompt:
        raise APIError(400, "prompt must not be empty", "prompt")
    if all(isinstance(x, int) for x in prompt):
        prompt = [prompt]
    out = []
    for i, p in enumerate(prompt):
        ids = tok.encode_prompt(p) if isinstance(p, str) else list(p)
        if not ids:
            raise APIError(400, f"prompt[{i}] is empty", "prompt")
        if not all(0 <= t < vocab for t in ids):
            raise APIError(400, f"prompt[{i}]: token ids must be in [0, {vocab})", "prompt")
        out.append(ids)
    return out


def _legacy_logprobs(tok: Tokenizer, tokens: list[int], logprobs: list, tops: list, offset: int) -> dict:
    """The completions API's logprobs object: tokens, token_logprobs, top_logprobs, text_offset."""
    texts = [tok.decode([t]) for t in tokens]
    offsets, at = [], offset
    for t in texts:
        offsets.append(at)
        at += len(t)
    return {"tokens": texts, "token_logprobs": logprobs,
            "top_logprobs": [None if top is None else {tok.decode([t]): lp for t, lp in top} for top in tops],
            "text_offset": offsets}


def _token_info(tok: Tokenizer, token: int, logprob: float, top: list[tuple[int, float]] | None) -> dict:
    """The chat API's logprobs entry for one token."""
    return {"token": tok.decode([token]), "logprob": logprob, "bytes": list(tok.token_bytes(token)),
            "top_logprobs": [{"token": tok.decode([t]), "logprob": lp, "bytes": list(tok.token_bytes(t))}
                             for t, lp in (top or [])]}
