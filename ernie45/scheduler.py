"""Continuous batching by token budget.

Owns which requests run each step and how many of their tokens are computed. There are no prefill
and decode phases: every request has ``num_tokens`` known tokens (prompt + output so far) and
``num_computed_tokens`` of them in the KV cache, and each step catches some of the gap up. A decode
is a gap of one token; a long prompt is caught up over several steps (chunked prefill); a prefix
cache hit starts ``num_computed_tokens`` past the cached full blocks.

Choices:
- Each step, running requests go first, oldest arrival first, then waiting requests in queue order,
  while ``max_num_batched_tokens`` and ``max_num_seqs`` allow. A waiting request is admitted only if
  blocks for its chunk are free now, and no request is admitted in a step that preempted one.
- When a running request needs a block and none is free, the most recently arrived running request
  is preempted: its blocks are freed, ``num_computed_tokens`` returns to 0 and it goes to the front
  of the waiting queue. It keeps its output tokens and recomputes prompt + outputs on return
  (often partly from the prefix cache). ``add`` rejects requests that could never fit the pool
  alone, so the oldest request always progresses and ``schedule`` never raises for lack of memory.
- Prefix hits are capped so at least one token is computed: its logits give the next token.
- A block is published to the prefix cache in ``update``, after the step that computed it.
- Token-level stops (stop ids, EOS, max_tokens) finish requests in ``update``; the engine detects
  stop strings on text and calls :meth:`Scheduler.finish`. ``n > 1`` is fanned out by the engine.
"""

from __future__ import annotations

import bisect
import enum
import itertools
from collections import deque
from dataclasses import dataclass, field
from typing import Iterable, Mapping

from .kv_cache import BlockPool, BlockTable, hash_blocks
from .sampling import SamplingParams
from .stopping import check_stop_token

FINISH_ABORT = "abort"


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"  # back in the waiting queue, to be recomputed
    FINISHED = "finished"


@dataclass(eq=False)
class Request:
    """One sequence: its tokens, how many are in the KV cache, and its blocks."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    arrival: int = -1  # set by Scheduler.add; orders priority and picks preemption victims
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: str | None = None
    num_prefix_hit_tokens: int = 0  # tokens served by the prefix cache at the latest admission
    num_preemptions: int = 0
    block_table: BlockTable | None = None
    block_hashes: list[bytes] = field(default_factory=list)  # of full blocks of all_token_ids
    num_published_blocks: int = 0  # leading blocks already offered to the prefix cache

    def __post_init__(self) -> None:
        self.prompt_token_ids = list(self.prompt_token_ids)
        self.all_token_ids = self.prompt_token_ids + list(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    def append_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)


@dataclass(frozen=True)
class ScheduledRequest:
    """This step's work for one request: compute ``token_ids`` at positions ``start, start+1, ...``."""

    request: Request
    start: int  # num_computed_tokens before this step; position of token_ids[0]
    token_ids: tuple[int, ...]
    block_ids: tuple[int, ...]  # the request's whole block table for this step
    needs_sample: bool  # the chunk reaches the last known token: sample from its last logits

    @property
    def num_new_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def positions(self) -> range:
        return range(self.start, self.start + len(self.token_ids))


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)  # the batch, in order
    preempted_ids: list[str] = field(default_factory=list)

    @property
    def total_num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


@dataclass(frozen=True)
class StepEvent:
    """A token appended to a request by ``update``; ``finish_reason`` set if it ended the request."""

    request_id: str
    token_id: int
    finish_reason: str | None


class Scheduler:
    def __init__(self, block_pool: BlockPool, max_num_batched_tokens: int, max_num_seqs: int,
                 block_size: int | None = None, eos_token_ids: Iterable[int] = (),
                 max_model_len: int | None = None):
        block_size = block_pool.block_size if block_size is None else block_size
        if block_size != block_pool.block_size:
            raise ValueError(f"block_size {block_size} differs from the pool's {block_pool.block_size}")
        if max_num_batched_tokens < 1 or max_num_seqs < 1:
            raise ValueError(f"max_num_batched_tokens ({max_num_batched_tokens}) and max_num_seqs "
                             f"({max_num_seqs}) must both be >= 1")
        self.pool, self.block_size = block_pool, block_size
        self.max_num_batched_tokens, self.max_num_seqs = max_num_batched_tokens, max_num_seqs
        self.eos_token_ids = frozenset(eos_token_ids)
        self.max_model_len = max_model_len
        self.requests: dict[str, Request] = {}
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # sorted by arrival
        self._arrivals = itertools.count()

    # ------------------------------------------------------------------ requests in and out

    @property
    def has_unfinished(self) -> bool:
        return bool(self.requests)

    def add(self, request: Request) -> None:
        """Queue a request; ValueError if it is malformed or could never fit the KV pool."""
        self._check_admissible(request)
        request.arrival, request.status = next(self._arrivals), RequestStatus.WAITING
        request.block_table = BlockTable(self.block_size)
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def _check_admissible(self, request: Request) -> None:
        rid, prompt, max_tokens = request.request_id, len(request.prompt_token_ids), request.params.max_tokens
        if rid in self.requests:
            raise ValueError(f"request id {rid!r} is already scheduled; ids must be unique")
        if prompt == 0:
            raise ValueError(f"request {rid!r} has an empty prompt; at least one token is needed")
        if request.params.n != 1:
            raise ValueError(f"request {rid!r} has n={request.params.n}; the engine must fan n out into "
                             "n requests (sampling.derive_seed gives each its seed)")
        if self.max_model_len is not None and prompt + max_tokens > self.max_model_len:
            raise ValueError(f"request {rid!r}: prompt ({prompt}) + max_tokens ({max_tokens}) exceeds "
                             f"max_model_len ({self.max_model_len})")
        capacity = self.pool.num_blocks * self.block_size
        if prompt + max_tokens - 1 > capacity:  # the last sampled token is never written to the cache
            raise ValueError(f"request {rid!r} needs {prompt + max_tokens - 1} KV slots (prompt {prompt} + "
                             f"max_tokens {max_tokens} - 1) but the whole pool holds {capacity} tokens "
                             f"({self.pool.num_blocks} blocks x {self.block_size}); lower max_tokens to at "
                             f"most {capacity - prompt + 1} or give the KV cache more memory")

    def finish(self, request_id: str, reason: str) -> bool:
        """End a request (e.g. "stop" on a stop string) and free its blocks; False if unknown."""
        request = self.requests.get(request_id)
        if request is None:
            return False
        self._finish(request, reason)
        return True

    def abort(self, request_id: str) -> bool:
        """Drop a request wherever it is and return its blocks to the pool; False if unknown."""
        return self.finish(request_id, FINISH_ABORT)

    def _finish(self, request: Request, reason: str) -> None:
        if request.status is RequestStatus.RUNNING:
            self.running.remove(request)
        else:
            self.waiting.remove(request)
        request.block_table.release(self.pool)
        request.status, request.finish_reason = RequestStatus.FINISHED, reason
        del self.requests[request.request_id]

    # ------------------------------------------------------------------ one step

    def schedule(self) -> SchedulerOutput:
        """Pick this step's batch within the token budget; never raises for lack of blocks."""
        out = SchedulerOutput()
        budget = self._schedule_running(self.max_num_batched_tokens, out)
        if not out.preempted_ids:
            self._schedule_waiting(budget, out)
        return out

    def _schedule_running(self, budget: int, out: SchedulerOutput) -> int:
        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            num_new = min(request.num_tokens - request.num_computed_tokens, budget)
            if self._reserve_or_preempt(request, num_new, out):
                self._emit(request, num_new, out)
                budget -= num_new
            i += 1  # victims come from the tail, so indices before i are unaffected
        return budget

    def _reserve_or_preempt(self, request: Request, num_new: int, out: SchedulerOutput) -> bool:
        """Blocks for ``num_new`` more tokens, preempting from the newest arrival; False if it was this one."""
        while not self._reserve(request, num_new):
            victim = self.running[-1]
            self._preempt(victim)
            out.preempted_ids.append(victim.request_id)
            if victim is request:
                return False
        return True

    def _schedule_waiting(self, budget: int, out: SchedulerOutput) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            request = self.waiting[0]
            self._acquire_prefix(request)
            num_new = min(request.num_tokens - request.num_computed_tokens, budget)
            if not self._reserve(request, num_new):
                self._reset(request)  # give the prefix hits back; it stays first in line
                return
            self.waiting.popleft()
            request.status = RequestStatus.RUNNING
            bisect.insort(self.running, request, key=lambda r: r.arrival)
            self._emit(request, num_new, out)
            budget -= num_new

    def _reserve(self, request: Request, num_new: int) -> bool:
        needed = request.block_table.blocks_needed(request.num_computed_tokens + num_new)
        if needed > self.pool.num_free_blocks:
            return False
        request.block_table.blocks.extend(self.pool.allocate(needed))
        return True

    def _acquire_prefix(self, request: Request) -> None:
        """Take the cached full blocks of the request's known tokens, leaving >= 1 token to compute."""
        limit = (request.num_tokens - 1) // self.block_size
        request.block_hashes = hash_blocks(request.all_token_ids, self.block_size, limit, request.block_hashes)
        hits = self.pool.match_prefix(request.block_hashes)
        self.pool.acquire(hits)
        request.block_table.blocks = list(hits)
        request.num_computed_tokens = request.num_prefix_hit_tokens = len(hits) * self.block_size
        request.num_published_blocks = len(hits)

    def _reset(self, request: Request) -> None:
        request.block_table.release(self.pool)
        request.num_computed_tokens = request.num_published_blocks = 0

    def _preempt(self, request: Request) -> None:
        self.running.remove(request)
        self._reset(request)
        request.status = RequestStatus.PREEMPTED
        request.num_preemptions += 1
        self.waiting.appendleft(request)

    def _emit(self, request: Request, num_new: int, out: SchedulerOutput) -> None:
        start = request.num_computed_tokens
        out.scheduled.append(ScheduledRequest(
            request, start, tuple(request.all_token_ids[start:start + num_new]),
            tuple(request.block_table.blocks), needs_sample=start + num_new == request.num_tokens))

    # ------------------------------------------------------------------ after the model ran

    def update(self, output: SchedulerOutput, sampled_token_ids: Mapping[str, int]) -> list[StepEvent]:
        """Advance the computed tokens of ``output``'s batch and append sampled tokens.

        ``sampled_token_ids`` maps request id -> token for every scheduled request with
        ``needs_sample``; requests aborted since ``schedule()`` are skipped.
        """
        events = []
        for item in output.scheduled:
            request = item.request
            if request.is_finished:
                continue
            if request.num_computed_tokens != item.start:
                raise RuntimeError(f"request {request.request_id!r} was at {request.num_computed_tokens} "
                                   f"computed tokens, not {item.start}: call update() once per schedule()")
            request.num_computed_tokens += item.num_new_tokens
            self._publish_full_blocks(request)
            if item.needs_sample:
                events.append(self._append(request, self._sampled(sampled_token_ids, request)))
        return events

    @staticmethod
    def _sampled(sampled_token_ids: Mapping[str, int], request: Request) -> int:
        if request.request_id not in sampled_token_ids:
            raise KeyError(f"no sampled token for request {request.request_id!r}, which reached the end "
                           "of its tokens this step (needs_sample=True)")
        return int(sampled_token_ids[request.request_id])

    def _append(self, request: Request, token_id: int) -> StepEvent:
        request.append_token(token_id)
        reason = check_stop_token(request.params, token_id, len(request.output_token_ids), self.eos_token_ids)
        if reason is not None:
            self._finish(request, reason)
        return StepEvent(request.request_id, token_id, reason)

    def _publish_full_blocks(self, request: Request) -> None:
        """Offer blocks that are now full and computed to the prefix cache."""
        full = request.num_computed_tokens // self.block_size
        if full <= request.num_published_blocks or not self.pool.enable_prefix_caching:
            return
        request.block_hashes = hash_blocks(request.all_token_ids, self.block_size, full, request.block_hashes)
        for i in range(request.num_published_blocks, full):
            self.pool.cache_block(request.block_table.blocks[i], request.block_hashes[i])
        request.num_published_blocks = full
