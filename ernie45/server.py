"""OpenAI-compatible HTTP API over an :class:`~ernie45.async_engine.AsyncEngine`; HTTP only.

Routes: ``POST /v1/chat/completions``, ``POST /v1/completions`` (JSON, or SSE with ``stream: true``),
``GET /v1/models``, ``GET /health``, ``GET /metrics`` (Prometheus text). Usage: docs/serving.md.

Choices:
- Every error is OpenAI-shaped, ``{"error": {"message", "type", "param", "code"}}``. Client errors
  are 4xx: FastAPI's 422 validation errors become 400 (OpenAI's status), malformed JSON 400, an
  unknown model 404, a missing or wrong key 401, a body over ``max_body_bytes`` 413. 5xx is left
  for real faults (an engine step that raised) and shutdown (503).
- The key check and the body limit run in a small ASGI middleware, before FastAPI reads the body:
  a request without the key never has its body read, and an oversized one is cut off at the limit.
- Request schemas are strict (no "1.5" for a number, no true for an integer) and bound every
  number, so nothing a client sends reaches the engine as NaN, infinity or an out-of-range integer.
- A request is accepted by the engine (or refused with 400) before the first byte is sent, so a
  stream never starts for a request that cannot run. A response that ends for any reason (done,
  client gone, server stopping) aborts its unfinished sequences: their KV blocks return at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Annotated, Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from .async_engine import FINISH_ERROR, AsyncEngine, GenerationStream, SeqEvent
from .engine import Engine
from .sampling import MAX_TOP_LOGPROBS, SamplingParams
from .tokenizer import Tokenizer

DEFAULT_MAX_BODY_BYTES = 4 << 20
MAX_N, MAX_PROMPTS, MAX_STOPS, INT32 = 16, 64, 16, 2**31 - 1
LOGPROB_FLOOR = -9999.0  # JSON has no -inf; a token of probability 0 reports this


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    kind = {401: "authentication_error", 404: "not_found_error", 413: "request_too_large",
            503: "service_unavailable"}.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_response(status: int, message: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, code), status_code=status)


# ----------------------------------------------------------------------------- request schemas
StopString = Annotated[str, Field(min_length=1, max_length=512)]
TokenId = Annotated[int, Field(ge=0, le=INT32)]
TokenIds = Annotated[list[TokenId], Field(min_length=1)]
TextBatch = Annotated[list[str], Field(min_length=1, max_length=MAX_PROMPTS)]


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, allow_inf_nan=False, extra="ignore")


class StreamOptions(_Strict):
    include_usage: bool | None = False


class _Sampling(_Strict):
    """Fields both endpoints share; None means the OpenAI default."""

    model: str | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1, le=INT32, description="0 or -1: off")
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, ge=0.01, le=100)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1)
    stop: StopString | Annotated[list[StopString], Field(max_length=MAX_STOPS)] | None = None
    stop_token_ids: Annotated[list[TokenId], Field(max_length=64)] | None = None
    max_tokens: int | None = Field(None, ge=1, le=INT32)
    n: int | None = Field(None, ge=1, le=MAX_N)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool | None = Field(False, description="keep generating past EOS / end of turn")
    logit_bias: dict[str, float] | None = Field(None, description="not supported; must be empty")

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def sampling_params(self, prompt_len: int, max_model_len: int, *, max_tokens: int | None,
                        top_logprobs: int | None, logprobs: bool) -> SamplingParams:
        """SamplingParams after the context-length check (max_tokens None: the rest of the context)."""
        if self.logit_bias:
            raise ApiError(400, "logit_bias is not supported by this server", "logit_bias", "unsupported")
        if prompt_len >= max_model_len:
            raise ApiError(400, f"the prompt has {prompt_len} tokens but the context holds {max_model_len}, "
                           "the prompt included; shorten the prompt", None, "context_length_exceeded")
        max_tokens = max_tokens or max_model_len - prompt_len
        if prompt_len + max_tokens > max_model_len:
            raise ApiError(400, f"prompt ({prompt_len} tokens) + max_tokens ({max_tokens}) exceeds the context of "
                           f"{max_model_len} tokens; lower max_tokens to at most {max_model_len - prompt_len}",
                           "max_tokens", "context_length_exceeded")
        fields = {k: getattr(self, k) for k in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty",
                  "presence_penalty", "frequency_penalty", "seed", "stop", "stop_token_ids", "n", "ignore_eos")}
        try:
            return SamplingParams(**{k: v for k, v in fields.items() if v is not None}, max_tokens=max_tokens,
                                  logprobs=logprobs, top_logprobs=top_logprobs or 0)
        except ValueError as err:
            raise ApiError(400, str(err).removeprefix("SamplingParams."), None, "invalid_value") from None


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | Annotated[list[TextPart], Field(max_length=256)]


class ChatCompletionRequest(_Sampling):
    messages: Annotated[list[Message], Field(min_length=1, max_length=1024)]
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    max_completion_tokens: int | None = Field(None, ge=1, le=INT32)

    def prompt_ids(self, tok: Tokenizer) -> list[int]:
        """The chat template (the tokenizer's own) rendered and encoded; 'developer' is a system turn."""
        messages = [{"role": "system" if m.role == "developer" else m.role,
                     "content": m.content if isinstance(m.content, str) else "".join(p.text for p in m.content)}
                    for m in self.messages]
        try:
            return tok.encode_chat(messages)
        except Exception as err:  # the template refused the conversation (raise_exception)
            raise ApiError(400, f"the chat template could not render these messages: {err}", "messages") from None

    def params(self, prompt_len: int, max_model_len: int) -> SamplingParams:
        return self.sampling_params(prompt_len, max_model_len, max_tokens=self.max_tokens or self.max_completion_tokens,
                                    top_logprobs=self.top_logprobs, logprobs=bool(self.logprobs))


class CompletionRequest(_Sampling):
    prompt: str | TextBatch | TokenIds | Annotated[list[TokenIds], Field(min_length=1, max_length=MAX_PROMPTS)]
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS, description="how many top alternatives")
    echo: bool | None = Field(False, description="not supported; must be false")

    def prompt_ids(self, tok: Tokenizer, vocab_size: int) -> list[list[int]]:
        if self.echo:
            raise ApiError(400, "echo is not supported by this server", "echo", "unsupported")
        p = self.prompt
        prompts = [tok.encode(p)] if isinstance(p, str) else [p] if isinstance(p[0], int) else \
            [tok.encode(s) if isinstance(s, str) else s for s in p]
        if any(not ids for ids in prompts):
            raise ApiError(400, "a prompt is empty; give at least one token of text", "prompt")
        if bad := [t for ids in prompts for t in ids if t >= vocab_size]:
            raise ApiError(400, f"prompt token ids {bad[:5]} are outside the vocabulary [0, {vocab_size})", "prompt")
        return prompts

    def params(self, prompt_len: int, max_model_len: int) -> SamplingParams:
        return self.sampling_params(prompt_len, max_model_len, max_tokens=self.max_tokens or 16,  # OpenAI's default
                                    top_logprobs=self.logprobs, logprobs=self.logprobs is not None)


def validation_message(errors: list[dict]) -> tuple[str, str | None]:
    """One readable message (and the first offending top-level field) from pydantic's errors."""
    first = errors[0] if errors else {"loc": (), "msg": "invalid request", "type": ""}
    if first["type"] == "json_invalid":
        return f"the request body is not valid JSON ({first.get('ctx', {}).get('error', '')})", None
    if tuple(first["loc"]) == ("body",):
        return "the request body must be a JSON object (send Content-Type: application/json)", None
    parts = []
    for e in errors[:4]:  # pydantic puts union member tags ("str", "list[int]") in loc: keep field names only
        loc = ".".join(str(x) for x in e["loc"][1:] if isinstance(x, int) or x in _FIELD_NAMES) or "body"
        parts.append(f"{loc}: {e['msg']}")
    param = next((str(x) for x in first["loc"][1:2]), None)
    return "; ".join(dict.fromkeys(parts)), param


_FIELD_NAMES = frozenset(name for m in (ChatCompletionRequest, CompletionRequest, Message, TextPart, StreamOptions)
                         for name in m.model_fields)


def _openapi_without_422(app: FastAPI) -> Callable[[], dict]:
    """The generated schema, with FastAPI's 422 answers documented as the 400 errors they become."""
    generate = app.openapi

    def openapi() -> dict:
        schema = generate()
        for path in schema.get("paths", {}).values():
            for op in path.values():
                if op.get("responses", {}).pop("422", None) is not None:
                    op["responses"]["400"] = {"description": "Invalid request (OpenAI-style error object)"}
        return schema
    return openapi


# ----------------------------------------------------------------------------- app
class Gate:
    """ASGI middleware: Bearer key on every route but /health, and a cap on request body bytes."""

    def __init__(self, app, api_key: str | None, max_body_bytes: int):
        self.app, self.api_key, self.max_body_bytes = app, api_key, max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if self.api_key and scope["path"] != "/health" and not self._authorized(headers.get("authorization", "")):
            return await error_response(401, "a valid API key is required: send 'Authorization: Bearer <key>'",
                                        code="invalid_api_key")(scope, receive, send)
        length = headers.get("content-length", "0")
        if not length.isdigit() or int(length) > self.max_body_bytes:
            return await self._too_large(scope, receive, send)
        body, more = bytearray(), True
        while more:  # also bounds chunked bodies, which carry no Content-Length
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_body_bytes:
                return await self._too_large(scope, receive, send)
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()  # later calls wait for the disconnect, as usual
            replayed = True
            return {"type": "http.request", "body": bytes(body), "more_body": False}

        await self.app(scope, replay, send)

    def _authorized(self, header: str) -> bool:
        scheme, _, key = header.partition(" ")
        return scheme.lower() == "bearer" and secrets.compare_digest(key.strip().encode(), self.api_key.encode())

    async def _too_large(self, scope, receive, send):
        await error_response(413, f"the request body is over the server's limit of {self.max_body_bytes} bytes "
                             "(or its Content-Length is not a number)", code="request_too_large")(scope, receive, send)


def create_app(engine: Engine | AsyncEngine, tokenizer: Tokenizer, model_name: str, api_key: str | None = None,
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> FastAPI:
    """The FastAPI app; an :class:`Engine` is wrapped here, and the engine thread runs for the app's lifespan."""
    aengine = engine if isinstance(engine, AsyncEngine) else AsyncEngine(engine, tokenizer)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        aengine.start()
        yield
        aengine.shutdown()

    app = FastAPI(title="ernie45", version="0.1.0", lifespan=lifespan,
                  description="OpenAI-compatible serving of ERNIE 4.5 models.")
    app.state.engine = aengine
    _install_error_handlers(app)
    _add_routes(app, aengine, tokenizer, model_name)
    app.add_middleware(Gate, api_key=api_key, max_body_bytes=max_body_bytes)
    app.openapi = _openapi_without_422(app)
    return app


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def on_validation(_: Request, exc: RequestValidationError):
        return error_response(400, *validation_message(exc.errors()), "invalid_value")

    @app.exception_handler(ApiError)
    async def on_api_error(_: Request, exc: ApiError):
        return error_response(exc.status, exc.message, exc.param, exc.code)

    @app.exception_handler(StarletteHTTPException)
    async def on_http(_: Request, exc: StarletteHTTPException):
        return error_response(exc.status_code, str(exc.detail))

    @app.exception_handler(Exception)
    async def on_bug(_: Request, exc: Exception):  # a bug, not a client error; still an OpenAI-shaped body
        return error_response(500, f"internal error: {exc!r}")


def _add_routes(app: FastAPI, aengine: AsyncEngine, tokenizer: Tokenizer, model_name: str) -> None:
    def check_model(name: str | None) -> None:
        if name is not None and name != model_name:
            raise ApiError(404, f"the model {name!r} does not exist; this server serves {model_name!r}",
                           "model", "model_not_found")

    @app.get("/health")
    async def health():
        return {"status": "ok"} if aengine.alive else error_response(503, "the engine is not running")

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics():
        return PlainTextResponse(aengine.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "ernie45",
                                            "max_model_len": aengine.max_model_len}]}

    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest, request: Request):
        check_model(body.model)
        prompt = body.prompt_ids(tokenizer)
        fmt = ChatFormat(model_name, tokenizer, body.n or 1, bool(body.logprobs))
        return await _run(aengine, request, body, [prompt], body.params(len(prompt), aengine.max_model_len), fmt)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        check_model(body.model)
        prompts = body.prompt_ids(tokenizer, aengine.vocab_size)
        params = body.params(max(map(len, prompts)), aengine.max_model_len)
        fmt = TextFormat(model_name, tokenizer, body.n or 1, body.logprobs is not None)
        return await _run(aengine, request, body, prompts, params, fmt)


async def _run(aengine: AsyncEngine, request: Request, body: _Sampling, prompts: list[list[int]],
               params: SamplingParams, fmt: _Format) -> Any:
    """Submit, then answer with one JSON object or a server-sent event stream."""
    try:
        stream = await aengine.submit(prompts, params, chat=isinstance(fmt, ChatFormat))
    except ValueError as err:  # the engine refused it (e.g. it could never fit the KV pool)
        raise ApiError(400, str(err), "max_tokens", "context_length_exceeded") from None
    except RuntimeError as err:
        raise ApiError(503, str(err)) from None
    prompt_tokens = sum(map(len, prompts))
    if body.stream:
        return AbortingStream(_sse(stream, fmt, prompt_tokens, body.include_usage), stream.abort)
    try:
        events = await _collect(stream, request)
    finally:
        stream.abort()
    if events is None:  # the client has gone; nobody will read this
        return error_response(499, "the client disconnected")
    if failed := [e for e in events if e.finish_reason == FINISH_ERROR]:
        return error_response(503 if "shutting down" in failed[0].error else 500, failed[0].error)
    return fmt.response(events, len(prompts) * params.n, prompt_tokens)


async def _collect(stream: GenerationStream, request: Request) -> list[SeqEvent] | None:
    """All events of a non-streamed request, or None if the client disconnects first."""
    async def until_disconnect():
        while (await request.receive())["type"] != "http.disconnect":
            pass

    work = asyncio.ensure_future(_gather(stream))
    watch = asyncio.ensure_future(until_disconnect())
    try:
        await asyncio.wait((work, watch), return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        work.cancel()  # no-op when done
    return work.result() if work.done() and not work.cancelled() else None


async def _gather(stream: GenerationStream) -> list[SeqEvent]:
    return [e async for e in stream]


class AbortingStream(StreamingResponse):
    """An SSE response that calls ``on_close`` however it ends: done, client gone, or server stopping."""

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None]):
        super().__init__(content, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.on_close = on_close

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


def _data(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def _sse(stream: GenerationStream, fmt: _Format, prompt_tokens: int, include_usage: bool) -> AsyncIterator[str]:
    completion_tokens = 0
    for chunk in fmt.stream_start():
        yield _data(chunk)
    async for event in stream:
        if event.finish_reason == FINISH_ERROR:
            yield _data(error_body(500, event.error))
            continue
        completion_tokens += event.token_id is not None
        if event.text or event.finish_reason or event.logprobs:
            yield _data(fmt.chunk(event))
    if include_usage:
        yield _data(fmt.envelope(fmt.chunk_object, [], fmt.usage(prompt_tokens, completion_tokens)))
    yield "data: [DONE]\n\n"


# ----------------------------------------------------------------------------- response shapes
class _Format:
    """Response envelopes shared by both endpoints; subclasses lay out the choices."""

    object_name = chunk_object = prefix = ""

    def __init__(self, model_name: str, tokenizer: Tokenizer, n: int, logprobs: bool):
        self.model, self.tok, self.n, self.logprobs = model_name, tokenizer, n, logprobs
        self.id, self.created = f"{self.prefix}-{uuid.uuid4().hex}", int(time.time())
        self._offsets: dict[int, int] = {}  # text offset per streamed sequence (completion logprobs)

    def envelope(self, obj: str, choices: list, usage: dict | None = None) -> dict:
        out = {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": choices}
        return out if usage is None else {**out, "usage": usage}

    @staticmethod
    def usage(prompt: int, completion: int) -> dict:
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def stream_start(self) -> list[dict]:
        return []

    def response(self, events: list[SeqEvent], num_seqs: int, prompt_tokens: int) -> dict:
        per_seq: list[list[SeqEvent]] = [[] for _ in range(num_seqs)]
        for e in events:
            per_seq[e.index].append(e)
        choices = [self.choice(i, seq) for i, seq in enumerate(per_seq)]
        return self.envelope(self.object_name, choices,
                             self.usage(prompt_tokens, sum(e.token_id is not None for e in events)))

    def token_text(self, token_id: int) -> str:
        """A token's text for logprobs; a lone byte-fallback token is "bytes:\\xNN" (OpenAI's spelling)."""
        byte = self.tok._bytes.get(token_id)  # Tokenizer has no public id -> byte lookup yet
        return f"bytes:\\x{byte:02x}" if byte is not None else self.tok.decode([token_id])

    def token_bytes(self, token_id: int) -> list[int]:
        byte = self.tok._bytes.get(token_id)
        return [byte] if byte is not None else list(self.tok.decode([token_id]).encode())

    def chunk(self, e: SeqEvent) -> dict:
        raise NotImplementedError

    def choice(self, index: int, events: list[SeqEvent]) -> dict:
        raise NotImplementedError


class ChatFormat(_Format):
    object_name, chunk_object, prefix = "chat.completion", "chat.completion.chunk", "chatcmpl"

    def stream_start(self) -> list[dict]:
        return [self.envelope(self.chunk_object, [{"index": i, "delta": {"role": "assistant", "content": ""},
                                                   "logprobs": None, "finish_reason": None}]) for i in range(self.n)]

    def chunk(self, e: SeqEvent) -> dict:
        return self.envelope(self.chunk_object, [{"index": e.index, "delta": {"content": e.text},
                                                  "logprobs": self._logprobs([e]), "finish_reason": e.finish_reason}])

    def choice(self, index: int, events: list[SeqEvent]) -> dict:
        return {"index": index, "message": {"role": "assistant", "content": "".join(e.text for e in events)},
                "logprobs": self._logprobs(events), "finish_reason": events[-1].finish_reason}

    def _entry(self, token_id: int, logprob: float) -> dict:
        return {"token": self.token_text(token_id), "logprob": max(logprob, LOGPROB_FLOOR),
                "bytes": self.token_bytes(token_id)}

    def _logprobs(self, events: list[SeqEvent]) -> dict | None:
        if not self.logprobs:
            return None
        return {"content": [{**self._entry(lp.token_id, lp.logprob), "top_logprobs": [self._entry(*t) for t in lp.top]}
                            for e in events if (lp := e.logprobs) is not None]}


class TextFormat(_Format):
    object_name, chunk_object, prefix = "text_completion", "text_completion", "cmpl"

    def chunk(self, e: SeqEvent) -> dict:
        return self.envelope(self.object_name, [{"index": e.index, "text": e.text, "logprobs": self._logprobs([e]),
                                                 "finish_reason": e.finish_reason}])

    def choice(self, index: int, events: list[SeqEvent]) -> dict:
        return {"index": index, "text": "".join(e.text for e in events), "logprobs": self._logprobs(events),
                "finish_reason": events[-1].finish_reason}

    def _logprobs(self, events: list[SeqEvent]) -> dict | None:
        if not self.logprobs:
            return None
        out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for e in events:
            if (lp := e.logprobs) is None:
                continue
            text, offset = self.token_text(lp.token_id), self._offsets.get(e.index, 0)
            out["tokens"].append(text)
            out["token_logprobs"].append(max(lp.logprob, LOGPROB_FLOOR))
            out["top_logprobs"].append({self.token_text(t): max(v, LOGPROB_FLOOR) for t, v in lp.top})
            out["text_offset"].append(offset)
            self._offsets[e.index] = offset + len(self.tok.decode([lp.token_id]))
        return out
