"""`lmlab serve`: an OpenAI-compatible HTTP API over one batched engine.

One `lmlab.infer.engine.Engine` runs in a background thread and batches every
request (continuous batching); this module is the asyncio side of it. A call
to /v1/chat/completions is checked field by field (`protocol`), its messages
rendered to ids with the tokenizer's chat template (`lmlab.data.chat.prompt_ids`:
the ids that `usage.prompt_tokens` counts and /tokenize returns), and submitted
to the engine, n times for n choices (choice i with seed + i). The engine calls
back from its thread at every step; `loop.call_soon_threadsafe` moves each event
onto the call's asyncio queue, from which the response is built, or streamed
as server-sent events, one per step that shows new text:

    data: {"object": "chat.completion.chunk", "choices": [{"index": 0,
           "delta": {"role": "assistant", "content": ""}}], ...}
    data: {..., "choices": [{"index": 0, "delta": {"content": "你好"}}]}
    data: {..., "choices": [{"index": 0, "delta": {"content": "！"}, "finish_reason": "stop"}]}
    data: [DONE]

(each event is one line, followed by a blank line).

Every failure has OpenAI's body `{"error": {"message", "type", "param", "code"}}`:
a bad field 400 (FastAPI's 422, remapped, `param` naming the field), a missing or
wrong key 401, an unknown model 404, a prompt longer than the context 400, a full
queue 429, a model still loading 503, anything unexpected 500 (its traceback in the
server's log). A failure after a stream has begun is sent as one `data: {"error":
...}` event before `data: [DONE]`.

A client that goes away cancels its requests: a task waits for the ASGI
`http.disconnect` message (and a stream that is cut off cancels in its `finally`),
and the engine frees their slots at its next step.

`run_server` listens at once and loads the model in a background thread; /health
answers 503 `{"status": "loading"}` until the engine runs, then 200.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
import logging
import os
import re
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException

from lmlab import __version__
from lmlab.data.chat import prompt_ids
from lmlab.errors import ConfigError, InputError
from lmlab.infer.engine import Engine, Event, QueueFull, SamplingParams, TokenLogprob
from lmlab.serve.metrics import CountResponses, ServerMetrics
from lmlab.serve.protocol import (
    MAX_N, AssistantMessage, ChatChoice, ChatChunkChoice, ChatCompletion, ChatCompletionChunk,
    ChatCompletionRequest, ChatLogprobs, ChatTokenLogprob, CompletionRequest, Delta,
    ErrorDetail, ErrorResponse, ModelCard, ModelList, TextChoice, TextCompletion, TextLogprobs,
    TokenizeRequest, TokenizeResponse, TopLogprob, Usage,
)

__all__ = ["create_app", "run_server", "APIError"]

logger = logging.getLogger(__name__)

STATIC = Path(__file__).with_name("static")  # the web chat page (index.html, its js and css)
MAX_BODY = 32 * 2**20  # bytes of one request body


class APIError(Exception):
    """A failure to answer with OpenAI's error body."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.detail = ErrorDetail(message=message, type=type, param=param, code=code)


def _error(status: int, detail: ErrorDetail) -> JSONResponse:
    return JSONResponse(ErrorResponse(error=detail).model_dump(), status)


def _json(body: BaseModel) -> str:
    return body.model_dump_json()


def _sse(body: BaseModel) -> str:
    return f"data: {_json(body)}\n\n"


DONE = "data: [DONE]\n\n"


# ------------------------------------------------------------------ one call's generations

@dataclass
class _Choice:
    """What the events of one generation add up to."""

    text: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    error: str | None = None

    def add(self, ev: Event) -> None:
        self.text.append(ev.text)
        self.token_ids += ev.token_ids
        self.logprobs += ev.logprobs or []
        self.finish_reason, self.error = ev.finish_reason, ev.error


def _failure(finish_reason: str | None, error: str | None) -> APIError | None:
    """The error a generation that ended this way is for its client (None: it answered)."""
    if finish_reason == "error":
        return APIError(500, f"generation failed: {error}", "server_error")
    if finish_reason == "cancelled":  # not by this client, who would not be listening
        return APIError(503, "the server is stopping; the request was cancelled", "server_error")
    return None


class _Mailbox:
    """Events from the engine's thread to the event loop, one wake-up per batch of them.

    The engine emits one event per running row per step. Waking the loop for each one
    (`call_soon_threadsafe` writes to a pipe) would cost a system call per event, and each
    system call hands the GIL over: the engine's thread and the loop's would take turns
    at every event. Here the engine's thread appends under a lock and wakes the loop only
    when no delivery is pending; the loop then moves every event waiting to its queue."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self._lock = threading.Lock()
        self._waiting: list[tuple[asyncio.Queue, Any]] = []
        self._pending = False

    @classmethod
    def of(cls, app: FastAPI) -> "_Mailbox":
        """The app's mailbox on the running loop (a test client may run each call on a new one)."""
        loop = asyncio.get_running_loop()
        if getattr(app.state, "mailbox", None) is None or app.state.mailbox.loop is not loop:
            app.state.mailbox = cls(loop)
        return app.state.mailbox

    def post(self, queue: asyncio.Queue, item: Any) -> None:
        """From any thread; must not block or raise (it runs in the engine's thread)."""
        with self._lock:
            self._waiting.append((queue, item))
            if self._pending:
                return
            self._pending = True
        try:
            self.loop.call_soon_threadsafe(self._deliver)
        except RuntimeError:  # the loop has closed: the server has stopped
            self._pending = False

    def _deliver(self) -> None:
        with self._lock:
            items, self._waiting, self._pending = self._waiting, [], False
        for queue, item in items:
            queue.put_nowait(item)


class _Generations:
    """The engine requests of one API call (its choices), their events on one asyncio queue."""

    def __init__(self, engine: Engine, metrics: ServerMetrics, mailbox: _Mailbox,
                 jobs: list[tuple[list[int], SamplingParams]], param: str):
        self.queue: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()
        self.requests = []
        try:
            for i, (ids, params) in enumerate(jobs):
                on_event = metrics.track(functools.partial(self._post, mailbox, i))
                self.requests.append(engine.submit(ids, params, on_event=on_event))
                metrics.prompt_tokens.inc(len(ids))
        except InputError as e:  # GenerationError: a prompt too long, a bad setting
            self.cancel()
            raise APIError(400, str(e), param=param) from None
        except QueueFull as e:
            self.cancel()
            raise APIError(429, f"the server is busy: {e}", "rate_limit_error",
                           code="queue_full") from None
        except BaseException:
            self.cancel()
            raise

    def _post(self, mailbox: _Mailbox, i: int, ev: Event) -> None:
        mailbox.post(self.queue, (i, ev))

    def cancel(self) -> None:
        for r in self.requests:
            r.cancel()  # a finished request ignores it

    async def batches(self) -> AsyncIterator[list[tuple[int, Event]]]:
        """(choice index, event) pairs in the order the engine sent them, as many at a time
        as have arrived, until every choice has finished."""
        left = len(self.requests)
        while left:
            batch = [await self.queue.get()]
            while not self.queue.empty():
                batch.append(self.queue.get_nowait())
            left -= sum(ev.finish_reason is not None for _, ev in batch)
            yield batch

    @contextlib.asynccontextmanager
    async def cancelled_on_disconnect(self, request: Request) -> AsyncIterator[None]:
        """Inside: the requests are cancelled when the client disconnects; on leaving, too."""
        async def watch() -> None:
            while (await request.receive())["type"] != "http.disconnect":
                pass
            self.cancel()

        watcher = asyncio.create_task(watch())
        try:
            yield
        finally:
            watcher.cancel()
            self.cancel()

    async def collect(self, request: Request) -> list[_Choice]:
        """Every choice, whole (for a response that does not stream)."""
        out = [_Choice() for _ in self.requests]
        async with self.cancelled_on_disconnect(request):
            async for batch in self.batches():
                for i, ev in batch:
                    out[i].add(ev)
        for c in out:
            if (err := _failure(c.finish_reason, c.error)) is not None:
                raise err
        return out


# ------------------------------------------------------------------ shapes

def _bytes(token: str) -> list[int] | None:
    """A token's UTF-8 bytes; None for a piece of a character (decoded as U+FFFD)."""
    return None if "\ufffd" in token else list(token.encode("utf-8"))


def _chat_logprobs(lps: list[TokenLogprob]) -> ChatLogprobs:
    return ChatLogprobs(content=[ChatTokenLogprob(
        token=t.token, logprob=t.logprob, bytes=_bytes(t.token),
        top_logprobs=[TopLogprob(token=s, logprob=v, bytes=_bytes(s)) for _, s, v in t.top])
        for t in lps])


def _text_logprobs(lps: list[TokenLogprob], top: int) -> TextLogprobs:
    offsets, at = [], 0
    for t in lps:
        offsets.append(at)
        at += len(t.token)
    return TextLogprobs(tokens=[t.token for t in lps], token_logprobs=[t.logprob for t in lps],
                        top_logprobs=[{s: v for _, s, v in t.top} for t in lps] if top else None,
                        text_offset=offsets)


def _usage(prompt: int, completion: int) -> Usage:
    return Usage(prompt_tokens=prompt, completion_tokens=completion,
                 total_tokens=prompt + completion)


def _param_of(loc: tuple) -> str | None:
    """'messages.0.content' from pydantic's ('body', 'messages', 0, 'content', 'list[...]')."""
    parts = []
    for p in loc[1:]:
        if not (isinstance(p, int) or re.fullmatch(r"[A-Za-z_]\w*", str(p))):
            break  # the name of a union's member, not a field
        parts.append(str(p))
    return ".".join(parts) or None


def _validation_error(exc: RequestValidationError) -> APIError:
    errors = exc.errors()
    first = errors[0] if errors else {"type": "", "loc": (), "msg": "invalid request"}
    param = _param_of(tuple(first["loc"]))
    if first["type"] == "json_invalid":
        why = (first.get("ctx") or {}).get("error", "")
        return APIError(400, f"the body is not valid JSON ({why}); send one JSON object")
    if param is None:
        if isinstance(first.get("input"), bytes):  # FastAPI reads JSON only when told it is
            return APIError(400, "the body is not JSON: send it with the header "
                            "'Content-Type: application/json'")
        return APIError(400, "the body must be a JSON object of the request's fields")
    msg = first["msg"].removeprefix("Value error, ")
    more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
    return APIError(400, f"{param}: {msg}{more}", param=param, code=first["type"] or None)


class _BodyLimit:
    """ASGI middleware: a body whose Content-Length is over `limit` bytes gets a 413 in
    OpenAI's shape (FastAPI's own limit answers in plain text). One without a length that
    runs over is cut off, which FastAPI answers with a 400."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            length = Headers(scope=scope).get("content-length", "")
            if length.isdigit() and int(length) > self.limit:
                response = _error(413, ErrorDetail(
                    message=f"the body is {length} bytes; at most {self.limit} are read",
                    type="invalid_request_error", code="body_too_large"))
                return await response(scope, receive, send)
            receive = self._limited(receive)
        await self.app(scope, receive, send)

    def _limited(self, receive):
        total = 0

        async def limited():
            nonlocal total
            message = await receive()
            total += len(message.get("body", b""))
            if total > self.limit:
                raise ValueError(f"the body is over {self.limit} bytes")
            return message

        return limited


class _NoCache(StaticFiles):
    """The page's files, revalidated at every load, so a new lmlab's page is never stale."""

    def file_response(self, *args, **kwargs) -> Response:
        response = super().file_response(*args, **kwargs)
        response.headers["Cache-Control"] = "no-cache"
        return response


# ------------------------------------------------------------------ the app

def create_app(engine: Engine | None, *, model_name: str, api_key: str | None = None,
               retriever=None, ready: threading.Event | None = None) -> FastAPI:
    """The FastAPI app that serves `engine` (already started) as model `model_name`.

    `api_key`: the Bearer token every /v1 call, /tokenize and /metrics need (None: open).
    `retriever`: answers from documents (`lmlab.rag.DocIndex`): chat messages go through
    its `augment(messages, tokenizer=, max_prompt_tokens=) -> (messages, sources)`, with
    room left for the answer's max_tokens, and responses carry `"sources"`.
    `ready`: set once the model is loaded; until then (or while `engine` is None) every
    call but /health answers 503. A caller that loads later sets `app.state.engine` (and
    `app.state.retriever`) first, then `ready`.
    """
    app = FastAPI(title="lmlab", version=__version__, docs_url=None, redoc_url=None)
    app.state.engine, app.state.retriever, app.state.ready = engine, retriever, ready
    metrics = ServerMetrics(lambda: app.state.engine.stats() if _ready(app) else None)
    app.state.metrics = metrics

    # ---------------------------------------------------------- errors
    @app.exception_handler(APIError)
    async def api_error(_: Request, exc: APIError) -> JSONResponse:
        return _error(exc.status, exc.detail)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        err = _validation_error(exc)
        return _error(err.status, err.detail)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(exc.status_code, ErrorDetail(
            message=str(exc.detail), type="invalid_request_error" if exc.status_code < 500
            else "server_error", code={404: "not_found"}.get(exc.status_code)))

    @app.exception_handler(Exception)
    async def unexpected(_: Request, exc: Exception) -> JSONResponse:
        # Starlette logs the traceback after this answer
        return _error(500, ErrorDetail(message=f"internal error: {type(exc).__name__}: {exc}",
                                       type="server_error"))

    # ---------------------------------------------------------- helpers
    async def require_key(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise APIError(401, "no API key: send the header 'Authorization: Bearer KEY' "
                           "with the key the server was started with", code="invalid_api_key")
        if not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise APIError(401, "incorrect API key", code="invalid_api_key")

    def running() -> Engine:
        if not _ready(app):
            raise APIError(503, "the model is still loading; try again once GET /health "
                           "answers 200", "server_error", code="model_not_loaded")
        return app.state.engine

    def check_model(name: str | None) -> None:
        if name is not None and name != model_name:
            raise APIError(404, f"the model {name!r} does not exist; this server serves "
                           f"{model_name!r} (GET /v1/models)", param="model",
                           code="model_not_found")

    def sampling(engine: Engine, body, index: int, logprobs: bool, top: int) -> SamplingParams:
        context, vocab = engine.model.max_seq_len, engine.model.vocab_size
        budget = body.token_budget
        return SamplingParams(
            # bounded here so that no huge number reaches a tensor; the engine's own limits
            max_tokens=budget if budget is None or context is None else min(budget, context),
            temperature=body.temperature,
            top_k=None if body.top_k is None else min(body.top_k, vocab),
            top_p=body.top_p, repetition_penalty=body.repetition_penalty,
            seed=None if body.seed is None else body.seed + index,
            stop=body.stops, stop_ids=() if body.ignore_eos else None,
            logprobs=logprobs, top_logprobs=min(top, vocab))

    async def chat_ids(engine: Engine, messages: list,
                       max_tokens: int | None) -> tuple[list[int], list | None]:
        """(the prompt's ids, the sources) of chat messages, augmented by the retriever with
        as many passages as leave `max_tokens` of the context for the answer."""
        messages = [m.as_dict() for m in messages]
        sources = None
        try:
            if app.state.retriever is not None:
                from lmlab.rag.answer import prompt_budget

                messages, sources = await run_in_threadpool(
                    functools.partial(app.state.retriever.augment, messages,
                                      tokenizer=engine.tokenizer,
                                      max_prompt_tokens=prompt_budget(engine.model, max_tokens)))
            return await run_in_threadpool(prompt_ids, engine.tokenizer, messages), sources
        except InputError as e:
            raise APIError(400, str(e), param="messages") from None

    def head(prefix: str) -> dict[str, Any]:
        return dict(id=f"{prefix}-{uuid.uuid4().hex}", created=int(time.time()), model=model_name)

    # ---------------------------------------------------------- the API
    api = APIRouter(dependencies=[Depends(require_key)])

    @api.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        engine = running()
        check_model(body.model)
        if body.top_logprobs and not body.logprobs:
            raise APIError(400, "top_logprobs: needs logprobs: true", param="top_logprobs")
        ids, sources = await chat_ids(engine, body.messages, body.token_budget)
        jobs = [(ids, sampling(engine, body, i, body.logprobs, body.top_logprobs or 0))
                for i in range(body.n)]
        gens = _Generations(engine, metrics, _Mailbox.of(app), jobs, "messages")
        h = head("chatcmpl")
        if body.stream:
            return _stream(_chat_chunks(request, gens, h, body, len(ids), sources))
        choices = await gens.collect(request)
        return Response(_json(ChatCompletion(
            **h, sources=sources, usage=_usage(len(ids), sum(len(c.token_ids) for c in choices)),
            choices=[ChatChoice(index=i, message=AssistantMessage(content="".join(c.text)),
                                logprobs=_chat_logprobs(c.logprobs) if body.logprobs else None,
                                finish_reason=c.finish_reason)
                     for i, c in enumerate(choices)])), media_type="application/json")

    @api.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        engine = running()
        check_model(body.model)
        if body.echo:
            raise APIError(400, "echo: not supported; the prompt is yours already", param="echo")
        if body.suffix is not None:
            raise APIError(400, "suffix: not supported (no fill-in-the-middle)", param="suffix")
        prompts = await run_in_threadpool(_prompt_ids, engine, body.prompt)
        if len(prompts) * body.n > MAX_N:
            raise APIError(400, f"prompt: {len(prompts)} prompts × n={body.n} choices is more "
                           f"than {MAX_N}", param="prompt")
        top = body.logprobs
        jobs = [(ids, sampling(engine, body, j, top is not None, top or 0))
                for ids in prompts for j in range(body.n)]
        gens = _Generations(engine, metrics, _Mailbox.of(app), jobs, "prompt")
        h = head("cmpl")
        prompt_tokens = sum(len(p) for p in prompts)
        if body.stream:
            return _stream(_text_chunks(request, gens, h, body, prompt_tokens))
        choices = await gens.collect(request)
        return Response(_json(TextCompletion(
            **h, usage=_usage(prompt_tokens, sum(len(c.token_ids) for c in choices)),
            choices=[TextChoice(index=i, text="".join(c.text), finish_reason=c.finish_reason,
                                logprobs=None if top is None else _text_logprobs(c.logprobs, top))
                     for i, c in enumerate(choices)])), media_type="application/json")

    def card() -> ModelCard:
        return ModelCard(id=model_name, created=int(time.time()),
                         max_model_len=running().model.max_seq_len)

    @api.get("/v1/models")
    async def models() -> ModelList:
        return ModelList(data=[card()])

    @api.get("/v1/models/{name:path}")
    async def model(name: str) -> ModelCard:
        check_model(name)
        return card()

    @api.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> TokenizeResponse:
        engine = running()
        check_model(body.model)
        if (body.text is None) == (body.messages is None):
            raise APIError(400, 'give one of "text" (a string) or "messages" (a chat)',
                           param="text")
        if body.messages is not None:
            ids, _ = await chat_ids(engine, body.messages, None)
        else:
            ids = await run_in_threadpool(engine.tokenizer.encode, body.text)
        return TokenizeResponse(tokens=ids, count=len(ids), max_model_len=engine.model.max_seq_len)

    @api.get("/metrics")
    async def prometheus() -> Response:
        content, media_type = metrics.render()
        return Response(content, media_type=media_type)

    app.include_router(api)

    @app.get("/health")
    async def health() -> JSONResponse:
        return (JSONResponse({"status": "ok"}) if _ready(app)
                else JSONResponse({"status": "loading"}, 503))

    if STATIC.is_dir():  # the web chat page, at / (index.html) and its files beside it
        app.mount("/static", _NoCache(directory=STATIC), name="static")
        app.mount("/", _NoCache(directory=STATIC, html=True), name="page")

    paths = {r.path for r in api.routes} | {"/health", "/"}

    def endpoint(path: str) -> str:
        """A metrics label: the route, or "static" / "other" (never a client's own path)."""
        if path in paths:
            return path
        if path.startswith("/v1/models/"):
            return "/v1/models/{name:path}"
        return "static" if "." in path.rsplit("/", 1)[-1] else "other"

    app.add_middleware(_BodyLimit, limit=MAX_BODY)
    app.add_middleware(CountResponses, metrics=metrics, endpoint=endpoint)
    return app


def _ready(app: FastAPI) -> bool:
    ready = app.state.ready
    return app.state.engine is not None and (ready is None or ready.is_set())


def _prompt_ids(engine: Engine, prompt) -> list[list[int]]:
    """/v1/completions' prompt (a string, strings, ids or lists of ids) as lists of ids."""
    if isinstance(prompt, str):
        prompt = [prompt]
    if not prompt:
        raise APIError(400, "prompt: an empty list; give a string", param="prompt")
    if isinstance(prompt[0], int):
        return [list(prompt)]
    if isinstance(prompt[0], str):
        return engine.tokenizer.encode_batch(list(prompt))
    return [list(p) for p in prompt]


def _stream(chunks: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(chunks, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _sse_events(request: Request, gens: _Generations,
                      chunk: Callable[[int, Event, list[TokenLogprob]], BaseModel],
                      final: Callable[[int], BaseModel | None]) -> AsyncIterator[str]:
    """A stream's events: `chunk(index, event, its logprobs)` for each event that shows text
    or ends a choice (the logprobs of silent steps carried to the next one), then
    `final(completion tokens)`; an error as one `{"error": ...}` event; then [DONE].
    The events that have arrived together go out in one write."""
    held: dict[int, list[TokenLogprob]] = {}
    completion = 0
    async with gens.cancelled_on_disconnect(request):
        try:
            async for batch in gens.batches():
                out, failed = [], None
                for i, ev in batch:
                    completion += len(ev.token_ids)
                    held.setdefault(i, []).extend(ev.logprobs or [])
                    if (failed := _failure(ev.finish_reason, ev.error)) is not None:
                        out.append(_sse(ErrorResponse(error=failed.detail)))
                        break
                    if ev.text or ev.finish_reason is not None:
                        out.append(_sse(chunk(i, ev, held.pop(i))))
                if out:
                    yield "".join(out)
                if failed is not None:
                    break
            else:
                if (body := final(completion)) is not None:
                    yield _sse(body)
        except Exception as e:  # the status line has gone out: the error becomes an event
            logger.exception("streaming failed")
            yield _sse(ErrorResponse(error=ErrorDetail(
                message=f"internal error: {type(e).__name__}: {e}", type="server_error")))
    yield DONE


async def _chat_chunks(request: Request, gens: _Generations, head: dict,
                       body: ChatCompletionRequest, prompt_tokens: int,
                       sources: list | None) -> AsyncIterator[str]:
    def chunk(i: int, ev: Event, lps: list[TokenLogprob]) -> ChatCompletionChunk:
        return ChatCompletionChunk(**head, choices=[ChatChunkChoice(
            index=i, delta=Delta(content=ev.text or None), finish_reason=ev.finish_reason,
            logprobs=_chat_logprobs(lps) if body.logprobs else None)])

    def final(completion: int) -> ChatCompletionChunk | None:
        return (ChatCompletionChunk(**head, choices=[], usage=_usage(prompt_tokens, completion))
                if body.include_usage else None)

    # the first delta of each choice carries its role (and the sources, on the first chunk)
    yield _sse(ChatCompletionChunk(**head, sources=sources, choices=[
        ChatChunkChoice(index=i, delta=Delta(role="assistant", content=""))
        for i in range(len(gens.requests))]))
    async for event in _sse_events(request, gens, chunk, final):
        yield event


async def _text_chunks(request: Request, gens: _Generations, head: dict,
                       body: CompletionRequest, prompt_tokens: int) -> AsyncIterator[str]:
    top = body.logprobs

    def chunk(i: int, ev: Event, lps: list[TokenLogprob]) -> TextCompletion:
        return TextCompletion(**head, choices=[TextChoice(
            index=i, text=ev.text, finish_reason=ev.finish_reason,
            logprobs=None if top is None else _text_logprobs(lps, top))])

    def final(completion: int) -> TextCompletion | None:
        return (TextCompletion(**head, choices=[], usage=_usage(prompt_tokens, completion))
                if body.include_usage else None)

    async for event in _sse_events(request, gens, chunk, final):
        yield event


# ------------------------------------------------------------------ the process

def run_server(model: str | os.PathLike, host: str = "127.0.0.1", port: int = 8000,
               api_key: str | None = None, max_batch: int = 8, max_queue: int = 64,
               docs: str | os.PathLike | None = None, device: str = "auto",
               log_level: str = "info", warm_up_s: float = 20.0) -> None:
    """Serve the model directory `model` on http://host:port until interrupted (Ctrl-C).

    Listens at once; the model (and the `docs` index) load in a background thread, and
    /health answers 200 once they have. `api_key` None: the environment's LMLAB_API_KEY,
    if set; without a key the API is open to whoever reaches the port. A model that fails
    to load stops the server and its error is raised here. Before /health turns 200 the
    engine runs up to `warm_up_s` seconds of dummy decode steps at each batch size
    (`Engine.warm_up`), so the first users do not pay the fast paths' timing."""
    import uvicorn

    from lmlab.model_io import read_model_config

    path = Path(model)
    read_model_config(path)  # a directory that is not a model: one line now, not in a thread
    if max_batch < 1 or max_queue < 0:
        raise ConfigError(f"--max-batch {max_batch} / --max-queue {max_queue}: need at least "
                          "1 and 0")
    if docs is not None and not Path(docs).exists():
        raise InputError(f"--docs {docs}: no such folder; give a folder of .txt, .md, .pdf files")
    if api_key is None:
        api_key = os.environ.get("LMLAB_API_KEY") or None
    ready = threading.Event()
    name = path.resolve().name
    app = create_app(None, model_name=name, api_key=api_key, ready=ready)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level,
                                           timeout_graceful_shutdown=5))
    failed: list[BaseException] = []

    def load() -> None:
        try:
            import lmlab
            from lmlab.train.distributed import pick_device

            lm = lmlab.load(path, device=str(pick_device(device)))
            engine = Engine(lm.model, lm.tokenizer, max_batch=max_batch, max_queue=max_queue,
                            model_name=name)
            if docs is not None:
                from lmlab.rag import DocIndex

                app.state.retriever = DocIndex.build(docs)
            if warm_up_s > 0:
                t0 = time.perf_counter()
                n = engine.warm_up(budget_s=warm_up_s)
                logging.getLogger("uvicorn.error").info(
                    "lmlab: warmed up batch sizes 1-%d in %.1f s", n, time.perf_counter() - t0)
            app.state.engine = engine.start()
            ready.set()
            logging.getLogger("uvicorn.error").info(  # uvicorn's own logger: shown at its level
                "lmlab: %s loaded (max_batch=%d), serving on http://%s:%d", name, max_batch,
                host, port)
        except BaseException as e:  # noqa: BLE001 — raised again by run_server
            failed.append(e)
            server.should_exit = True

    threading.Thread(target=load, name="lmlab-load", daemon=True).start()
    try:
        server.run()
    finally:
        if app.state.engine is not None:
            app.state.engine.close()
    if failed:
        raise failed[0]
