"""Request bodies of the OpenAI-compatible server, and the client error they raise (:class:`ApiError`).

Choices:
- Schemas are strict (no "1.5" for a number, no true for an integer) and bound every number, so
  nothing a client sends reaches the engine as NaN, infinity or an out-of-range integer.
- Unknown fields are ignored (OpenAI clients send many we do not use); fields we cannot honour
  (``logit_bias``, ``echo``) are refused with 400 rather than silently dropped.
- A request turns itself into prompt ids and :class:`~ernie45.sampling.SamplingParams`, and checks
  the context length there, so every reason to refuse it is known before a byte is streamed.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from .sampling import MAX_TOP_LOGPROBS, SamplingParams
from .tokenizer import Tokenizer

MAX_N, MAX_PROMPTS, MAX_STOPS, INT32 = 16, 64, 16, 2**31 - 1


class ApiError(Exception):
    """A request the server refuses; becomes an OpenAI-shaped error body with ``status``."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


StopString = Annotated[str, Field(min_length=1, max_length=512)]
TokenId = Annotated[int, Field(ge=0, le=INT32)]
TokenIds = Annotated[list[TokenId], Field(min_length=1)]
TextBatch = Annotated[list[str], Field(min_length=1, max_length=MAX_PROMPTS)]


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, allow_inf_nan=False, extra="ignore")


class StreamOptions(_Strict):
    include_usage: bool | None = False


class SamplingRequest(_Strict):
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


class ChatCompletionRequest(SamplingRequest):
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


class CompletionRequest(SamplingRequest):
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
