"""Stop conditions: stop token ids, EOS, ``max_tokens`` and stop strings across streamed text.

Owns when a request finishes and which generated text a client may see. The scheduler uses the
token-level check (:func:`check_stop_token`); the engine feeds each detokenised text delta to a
:class:`StopChecker` and finishes the request when a stop string matches.

Choices:
- A stop token id or EOS (unless ``ignore_eos``) finishes with "stop" even when it is also the
  ``max_tokens``-th token; otherwise reaching ``max_tokens`` finishes with "length". The stop token
  stays in the request's output ids (it was generated); detokenisation decides whether it shows.
- A stop string ends the text just before its earliest occurrence (the stop string itself is not
  returned, as in OpenAI's API). Until a match is ruled out, the longest tail of the text that is a
  prefix of some stop string is held back, so streamed text never contains part of a stop string;
  :meth:`StopChecker.flush` releases that tail when the request ends for another reason.
"""

from __future__ import annotations

from typing import Iterable

from .sampling import SamplingParams

FINISH_STOP = "stop"
FINISH_LENGTH = "length"


def check_stop_token(params: SamplingParams, token_id: int, num_output_tokens: int,
                     eos_token_ids: Iterable[int] = ()) -> str | None:
    """Finish reason after appending ``token_id`` as output token number ``num_output_tokens``."""
    if token_id in params.stop_token_ids or (not params.ignore_eos and token_id in eos_token_ids):
        return FINISH_STOP
    if num_output_tokens >= params.max_tokens:
        return FINISH_LENGTH
    return None


class StopChecker:
    """Incremental stop detection for one request (one per completion when n > 1).

    ``finish_reason`` is None while running, then "stop" or "length"; ``stop_reason`` records what
    matched: the stop string or the stop/EOS token id (None for "length").
    """

    def __init__(self, params: SamplingParams, eos_token_ids: Iterable[int] = ()):
        self.params = params
        self.eos_token_ids = frozenset(eos_token_ids)
        self.finish_reason: str | None = None
        self.stop_reason: str | int | None = None
        self._held = ""  # tail that might be the start of a stop string
        self._longest = max((len(s) for s in params.stop), default=0)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def check_token(self, token_id: int, num_output_tokens: int) -> str | None:
        """Token-level check; records and returns the finish reason, if any."""
        reason = check_stop_token(self.params, token_id, num_output_tokens, self.eos_token_ids)
        if reason is not None and not self.finished:
            self.finish_reason = reason
            self.stop_reason = token_id if reason == FINISH_STOP else None
        return reason

    def feed(self, delta: str) -> str:
        """Text from ``delta`` that is safe to show now; sets ``finish_reason`` on a stop string."""
        if self.finished:
            return ""
        text = self._held + delta
        match = self._earliest_stop(text)
        if match is not None:
            index, stop = match
            self._held, self.finish_reason, self.stop_reason = "", FINISH_STOP, stop
            return text[:index]
        keep = self._partial_tail(text)
        self._held = text[len(text) - keep:]
        return text[:len(text) - keep]

    def flush(self) -> str:
        """Release the held-back tail (call when the request ends without a stop string)."""
        held, self._held = self._held, ""
        return held

    def _earliest_stop(self, text: str) -> tuple[int, str] | None:
        found = [(i, s) for s in self.params.stop if (i := text.find(s)) >= 0]
        return min(found, key=lambda m: m[0]) if found else None

    def _partial_tail(self, text: str) -> int:
        """Length of the longest tail of ``text`` that is a proper prefix of some stop string."""
        for k in range(min(len(text), self._longest - 1), 0, -1):
            tail = text[-k:]
            if any(s.startswith(tail) for s in self.params.stop):
                return k
        return 0
