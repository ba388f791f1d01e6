"""`nanoseek serve`: an OpenAI-compatible HTTP server over the engine, and a web chat page.

    app = create_app(engine, tokenizer, model_name="base")
    uvicorn.run(app, host="127.0.0.1", port=8000)

Routes: `/v1/chat/completions` and `/v1/completions` (stream or not, n choices, stop, seed,
logprobs; completions also take token-id prompts and `echo`, for lm-evaluation-harness),
`/v1/models`, `/health` and `/` (the chat page). Every request becomes engine requests on the
engine thread (`runner.py`), so all clients share continuous batching; a request that does not
fit the running + waiting bounds gets 503 at once. A client that goes away cancels its
sequences, which frees their cache blocks. Errors are OpenAI's JSON shape with the status codes
of ../../shared/reference/serving-and-reliability.md.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..engine.engine import Engine, Output
from ..engine.reasoning import ReasoningSplitter
from ..tokenizer import Tokenizer, TokenizerError
from .protocol import (APIError, ChatRequest, CompletionRequest, chat_messages, check_n, include_usage, sampling,
                       token_budget)
from .runner import EngineRunner

log = logging.getLogger("nanoseek.server")


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


def create_app(engine: Engine, tok: Tokenizer, model_name: str, api_key: str | None = None, max_queue: int = 64,
               max_body: int = 1 << 20, reasoning: bool = True, engine_thread: bool = True) -> FastAPI:
    """engine_thread: start the engine on a thread with the app; False when the caller runs
    `app.state.runner.run()` itself (on the main thread, as `nanoseek serve` does)."""
    runner = EngineRunner(engine, max_queue)
    context = engine.max_len
    created = int(time.time())

    async def lifespan(app):
        if engine_thread:
            runner.start()
        yield
        if engine_thread:
            runner.stop()

    app = FastAPI(title="nanoseek", version="1", lifespan=lifespan,
                  description="OpenAI-compatible API over nanoseek's latent-cache engine.")
    app.state.runner = runner

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {}
        param = _param(first.get("loc", ()))
        if first.get("type") == "json_invalid":
            message, param = f"The body is not valid JSON ({first.get('ctx', {}).get('error', 'parse error')})", None
        elif first.get("type") == "missing":
            message = f"{param} is required"
        else:
            message = f"{param}: {first.get('msg', 'invalid value')}" if param else first.get("msg", "invalid body")
        return JSONResponse(APIError(400, message, param).body(), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        return JSONResponse(APIError(e.status_code, str(e.detail)).body(), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def fault(request: Request, e: Exception):
        log.exception("unhandled error on %s", request.url.path)
        return JSONResponse(APIError(500, "internal server error").body(), status_code=500)

    app.add_middleware(Guard, api_key=api_key, max_body=max_body)

    def openapi() -> dict:
        """FastAPI's schema, with `model` narrowed to the one model served here."""
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            for name in ("ChatRequest", "CompletionRequest"):
                schema["components"]["schemas"][name]["properties"]["model"] = {
                    "type": "string", "enum": [model_name], "title": "Model"}
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi

    # ---- small routes -------------------------------------------------------------------------
    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page():
        return resources.files("nanoseek.server").joinpath("chat.html").read_text(encoding="utf-8")

    @app.get("/health")
    async def health():
        return {"status": "ok", **runner.stats()}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "nanoseek", "max_model_len": context}]}

    def check_model(name: str) -> None:
        if name != model_name:
            raise APIError(404, f"The model '{name}' does not exist; this server serves '{model_name}'", "model",
                           "model_not_found")

    def note_unknown(body) -> None:
        if body.unknown_fields():
            log.info("ignoring unknown field(s): %s", ", ".join(body.unknown_fields()))

    def token_info(token: int, logprob: float, top: list[tuple[int, float]] | None) -> dict:
        return {"token": tok.decode([token]), "logprob": logprob, "bytes": list(tok.token_bytes(token)),
                "top_logprobs": [{"token": tok.decode([t]), "logprob": lp, "bytes": list(tok.token_bytes(t))}
                                 for t, lp in (top or [])]}

    # ---- chat -----------------------------------------------------------------------------------
    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request):
        check_model(body.model)
        check_n(body)
        note_unknown(body)
        try:
            ids, _ = tok.render_chat(chat_messages(body), add_generation_prompt=True)
        except TokenizerError as e:
            raise APIError(400, str(e), "messages") from None
        if body.top_logprobs is not None:
            if not body.logprobs:
                raise APIError(400, "top_logprobs is only allowed when logprobs is true", "top_logprobs")
            if not 0 <= body.top_logprobs <= 20:
                raise APIError(400, f"top_logprobs must be in [0, 20] (got {body.top_logprobs})", "top_logprobs")
        param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        max_tokens = token_budget(len(ids), body.max_completion_tokens if param != "max_tokens" else body.max_tokens,
                                  context, param, "messages")
        params = sampling(body, max_tokens, body.n, body.logprobs, body.top_logprobs or 0)
        usage_chunk = include_usage(body)
        gen = Generation(runner, [(ids, p) for p in params])
        rid, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        splits = [ReasoningSplitter() if reasoning else None for _ in params]

        def split(i: int, text: str, final: bool) -> tuple[str, str]:
            if splits[i] is None:
                return "", text
            r, c = splits[i].push(text)
            if final:
                r2, c2 = splits[i].finish()
                r, c = r + r2, c + c2
            return r, c

        def logprob_entry(out: Output) -> dict | None:
            if not body.logprobs or out.token is None:
                return None
            return token_info(out.token, out.logprob, out.top_logprobs)

        if not body.stream:
            texts = [["", ""] for _ in params]
            lps: list[list] = [[] for _ in params]
            reasons, counts = [None] * len(params), [0] * len(params)
            try:
                while gen.pending:
                    i, out = await gen.next(request)
                    counts[i] += out.token is not None
                    r, c = split(i, out.delta, bool(out.finish_reason))
                    texts[i][0] += r
                    texts[i][1] += c
                    if (entry := logprob_entry(out)) is not None:
                        lps[i].append(entry)
                    reasons[i] = out.finish_reason or reasons[i]
            except ClientGone:
                return JSONResponse({}, status_code=499)
            choices = []
            for i in range(len(params)):
                message = {"role": "assistant", "content": texts[i][1]}
                if reasoning:
                    message["reasoning_content"] = texts[i][0]
                choices.append({"index": i, "message": message, "finish_reason": reasons[i],
                                "logprobs": {"content": lps[i]} if body.logprobs else None})
            return {"id": rid, "object": "chat.completion", "created": now, "model": model_name, "choices": choices,
                    "usage": _usage(len(ids), sum(counts))}

        async def events():
            counts = [0] * len(params)
            try:
                base = {"id": rid, "object": "chat.completion.chunk", "created": now, "model": model_name}
                for i in range(len(params)):
                    yield _sse({**base, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                                     "logprobs": None, "finish_reason": None}]})
                while gen.pending:
                    i, out = await gen.next()
                    counts[i] += out.token is not None
                    r, c = split(i, out.delta, bool(out.finish_reason))
                    entry = logprob_entry(out)
                    if r or c or entry is not None:
                        delta = {**({"reasoning_content": r} if r else {}), **({"content": c} if c else {})}
                        yield _sse({**base, "choices": [{"index": i, "delta": delta, "finish_reason": None,
                                                         "logprobs": {"content": [entry]} if entry else None}]})
                    if out.finish_reason:
                        yield _sse({**base, "choices": [{"index": i, "delta": {}, "logprobs": None,
                                                         "finish_reason": out.finish_reason}]})
                if usage_chunk:
                    yield _sse({**base, "choices": [], "usage": _usage(len(ids), sum(counts))})
            except APIError as e:
                yield _sse(e.body())
            finally:
                if gen.pending:
                    gen.cancel()  # the client went away, or the stream failed: free the cache now
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    # ---- completions ----------------------------------------------------------------------------
    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        check_model(body.model)
        check_n(body)
        note_unknown(body)
        prompts = _prompts(body.prompt, tok, engine.model.cfg.vocab_size)
        if body.suffix:
            raise APIError(400, "suffix is not supported", "suffix")
        k = body.logprobs
        if k is not None and not 0 <= k <= 20:
            raise APIError(400, f"logprobs must be in [0, 20] (got {k})", "logprobs")
        score_only = body.echo and body.max_tokens == 0  # prompt log-probabilities only
        jobs = []
        for ids in prompts:
            budget = token_budget(len(ids), None if score_only else body.max_tokens, context)
            jobs += [(ids, p) for p in sampling(body, 1 if score_only else budget, body.n, k is not None, k or 0,
                                                prompt_logprobs=k if body.echo and k is not None else None)]
        usage_chunk = include_usage(body)
        gen = Generation(runner, jobs)
        rid, now = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        base = {"id": rid, "object": "text_completion", "created": now, "model": model_name}
        n = body.n

        def echo_part(i: int) -> tuple[str, dict]:
            ids = prompts[i // n]
            text = tok.decode(ids)
            if k is None:
                return text, {}
            req = gen.handles[i].request
            pl = req.prompt_logprobs or [None] * len(ids)
            return text, _legacy_logprobs(tok, ids, [None if x is None else x[0] for x in pl],
                                          [None if x is None else x[1] for x in pl], 0)

        if not body.stream:
            texts, counts, reasons = [""] * len(jobs), [0] * len(jobs), [None] * len(jobs)
            tokens: list[list] = [[] for _ in jobs]
            try:
                while gen.pending:
                    i, out = await gen.next(request)
                    reasons[i] = out.finish_reason or reasons[i]
                    if score_only:
                        continue
                    counts[i] += out.token is not None
                    texts[i] += out.delta
                    if out.token is not None:
                        tokens[i].append((out.token, out.logprob, out.top_logprobs))
            except ClientGone:
                return JSONResponse({}, status_code=499)
            choices = []
            for i in range(len(jobs)):
                text, lp = echo_part(i) if body.echo else ("", {})
                if k is not None:
                    gen_lp = _legacy_logprobs(tok, [t for t, _, _ in tokens[i]], [x for _, x, _ in tokens[i]],
                                              [x for _, _, x in tokens[i]], len(text))
                    lp = {key: lp.get(key, []) + gen_lp[key] for key in gen_lp}
                choices.append({"index": i, "text": text + texts[i], "logprobs": lp if k is not None else None,
                                "finish_reason": "length" if score_only else reasons[i]})
            return {**base, "choices": choices,
                    "usage": _usage(sum(len(p) for p in prompts), sum(counts))}

        async def events():
            counts = [0] * len(jobs)
            started = [False] * len(jobs)
            try:
                while gen.pending:
                    i, out = await gen.next()
                    text = ""
                    if body.echo and not started[i]:
                        text = echo_part(i)[0]
                    started[i] = True
                    if not score_only:
                        text += out.delta
                        counts[i] += out.token is not None
                    lp = None
                    if k is not None and out.token is not None and not score_only:
                        lp = _legacy_logprobs(tok, [out.token], [out.logprob], [out.top_logprobs], 0)
                    if text or lp or out.finish_reason:
                        yield _sse({**base, "choices": [{"index": i, "text": text, "logprobs": lp,
                                                         "finish_reason": out.finish_reason and
                                                         ("length" if score_only else out.finish_reason)}]})
                if usage_chunk:
                    yield _sse({**base, "choices": [], "usage": _usage(sum(len(p) for p in prompts), sum(counts))})
            except APIError as e:
                yield _sse(e.body())
            finally:
                if gen.pending:
                    gen.cancel()
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return app


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
        ids = tok.encode(p) if isinstance(p, str) else list(p)
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
