"""OpenAI response bodies from engine events: whole responses, SSE chunks, logprobs and error objects.

Choices:
- One :class:`ResponseFormat` per API request builds both the non-streamed response and the
  stream's chunks, so the two always agree on ids, ``created`` and field layout.
- Logprob token strings: a lone byte-fallback token is ``"bytes:\\xNN"`` (OpenAI's spelling for a
  token that is not text by itself); any other token is its decoded text.
"""

from __future__ import annotations

import abc
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from .async_engine import FINISH_ERROR, GenerationStream, SeqEvent
from .tokenizer import Tokenizer

LOGPROB_FLOOR = -9999.0  # JSON has no -inf; a token of probability 0 reports this


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    """The OpenAI error object, ``{"error": {"message", "type", "param", "code"}}``."""
    kind = {401: "authentication_error", 404: "not_found_error", 413: "request_too_large",
            503: "service_unavailable"}.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _data(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def sse_events(stream: GenerationStream, fmt: ResponseFormat, prompt_tokens: int,
                     include_usage: bool) -> AsyncIterator[str]:
    """The server-sent events of a streamed request, ``data: [DONE]`` last."""
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


class ResponseFormat(abc.ABC):
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
        raw = self.tok.token_bytes(token_id)
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw) if raw is not None else self.tok.decode([token_id])

    def byte_values(self, token_id: int) -> list[int]:
        """The ``bytes`` field of a chat logprob: the raw byte, or the UTF-8 of the token's text."""
        raw = self.tok.token_bytes(token_id)
        return list(raw) if raw is not None else list(self.tok.decode([token_id]).encode())

    @abc.abstractmethod
    def chunk(self, e: SeqEvent) -> dict:
        """One streamed event as this endpoint's chunk."""

    @abc.abstractmethod
    def choice(self, index: int, events: list[SeqEvent]) -> dict:
        """A finished sequence as this endpoint's non-streamed choice."""


class ChatFormat(ResponseFormat):
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
                "bytes": self.byte_values(token_id)}

    def _logprobs(self, events: list[SeqEvent]) -> dict | None:
        if not self.logprobs:
            return None
        return {"content": [{**self._entry(lp.token_id, lp.logprob), "top_logprobs": [self._entry(*t) for t in lp.top]}
                            for e in events if (lp := e.logprobs) is not None]}


class TextFormat(ResponseFormat):
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
