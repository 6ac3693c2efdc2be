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
- Request schemas (strict, every number bounded) live in ``server_schema``; response and SSE shapes
  in ``server_format``. This module is routes, middleware and error handlers.
- A request is accepted by the engine (or refused with 400) before the first byte is sent, so a
  stream never starts for a request that cannot run. A response that ends for any reason (done,
  client gone, server stopping) aborts its unfinished sequences: their KV blocks return at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .async_engine import FINISH_ERROR, AsyncEngine, GenerationStream, SeqEvent
from .engine import Engine
from .sampling import SamplingParams
from .server_format import ChatFormat, ResponseFormat, TextFormat, error_body, sse_events
from .server_schema import ApiError, ChatCompletionRequest, CompletionRequest, SamplingRequest, validation_message
from .tokenizer import Tokenizer

DEFAULT_MAX_BODY_BYTES = 4 << 20


def error_response(status: int, message: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, code), status_code=status)


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


async def _run(aengine: AsyncEngine, request: Request, body: SamplingRequest, prompts: list[list[int]],
               params: SamplingParams, fmt: ResponseFormat) -> Any:
    """Submit, then answer with one JSON object or a server-sent event stream."""
    try:
        stream = await aengine.submit(prompts, params, chat=isinstance(fmt, ChatFormat))
    except ValueError as err:  # the engine refused it (e.g. it could never fit the KV pool)
        raise ApiError(400, str(err), "max_tokens", "context_length_exceeded") from None
    except RuntimeError as err:
        raise ApiError(503, str(err)) from None
    prompt_tokens = sum(map(len, prompts))
    if body.stream:
        return AbortingStream(sse_events(stream, fmt, prompt_tokens, body.include_usage), stream.abort)
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

