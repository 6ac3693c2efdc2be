"""The bridge between asyncio HTTP handlers and the (synchronous, not thread-safe) `Engine`.

Owns the one engine thread, text per request (detokenization + stop strings) and serving metrics.

Choices:
- Every engine call (add_request, abort, finish, step) happens on ONE background thread, fed by a
  thread-safe command queue; handlers never touch the engine. The thread blocks on the queue when
  there is no work, and drains it without blocking between steps when there is.
- Output crosses back with ``loop.call_soon_threadsafe(queue.put_nowait, event)``: one asyncio
  queue per API request, so a request with ``n`` samples (or several prompts) reads all its
  sequences' events, in order, from one place.
- Text is produced on the engine thread, where a stop string must be detected anyway so the
  request can be finished (``engine.finish(rid, "stop")``) before it wastes another step. Special
  tokens are skipped in text, and a token that ended the request at token level (EOS, a stop id,
  ``<|end_of_sentence|>`` in chat) is counted but never shown.
- ``n > 1`` becomes n engine requests; sample j gets seed ``derive_seed(seed, j)``.
- A step that raises fails the requests that were running (their state is unknown after a partial
  step; waiting ones were not touched) with an error event, and the loop keeps serving.
- Metrics are plain counters and histograms written on the engine thread and rendered in the
  Prometheus text format (no dependency); a lock keeps a scrape from seeing a half-made update.
"""

from __future__ import annotations

import asyncio
import bisect
import concurrent.futures
import dataclasses
import itertools
import logging
import queue
import threading
import time
import uuid
from dataclasses import dataclass
from collections.abc import AsyncIterator, Callable

from .engine import Engine, EngineOutput
from .sampling import SamplingParams, TokenLogprobs, derive_seed
from .stopping import FINISH_STOP, StopChecker
from .tokenizer import IncrementalDetokenizer, Tokenizer

log = logging.getLogger("ernie45.serve")
FINISH_ERROR = "error"  # the request failed: a step raised, or the server shut down under it


@dataclass(frozen=True)
class SeqEvent:
    """New text of sequence ``index`` of an API request; ``finish_reason`` set on its last event."""

    index: int
    text: str
    token_id: int | None  # None for an event that carries no token (an error)
    logprobs: TokenLogprobs | None = None
    finish_reason: str | None = None  # "stop" | "length" | "error"
    error: str | None = None


@dataclass
class _Seq:
    """Engine-thread state of one engine request."""

    rid: str
    index: int
    prompt: list[int]
    params: SamplingParams
    detok: IncrementalDetokenizer
    stops: StopChecker
    deliver: Callable[[SeqEvent], None]
    arrival: float
    last_token_at: float | None = None


class Histogram:
    """A Prometheus histogram: cumulative counts per upper bound, plus sum and count."""

    def __init__(self, name: str, help_text: str, buckets: tuple[float, ...]):
        self.name, self.help, self.buckets = name, help_text, buckets
        self.counts, self.sum, self.count = [0] * (len(buckets) + 1), 0.0, 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1

    def render(self) -> list[str]:
        lines, total = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"], 0
        for bound, n in zip((*map(str, self.buckets), "+Inf"), self.counts):
            total += n
            lines.append(f'{self.name}_bucket{{le="{bound}"}} {total}')
        return lines + [f"{self.name}_sum {self.sum}", f"{self.name}_count {self.count}"]


LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                   10.0, 30.0, 60.0)


class Metrics:
    """Serving counters, gauges and latency histograms (names in docs/serving.md)."""

    def __init__(self, num_blocks: int):
        self.lock = threading.Lock()
        self.gauges = {"num_requests_running": 0, "num_requests_waiting": 0, "kv_cache_usage_ratio": 0.0,
                       "kv_blocks_free": num_blocks, "kv_blocks_total": num_blocks}
        self.counters = {"prompt_tokens_total": 0, "generation_tokens_total": 0, "request_errors_total": 0}
        self.finished: dict[str, int] = {}
        self.ttft = Histogram("ernie45_time_to_first_token_seconds", "Seconds from request arrival to its first "
                              "token.", LATENCY_BUCKETS)
        self.itl = Histogram("ernie45_inter_token_latency_seconds", "Seconds between consecutive tokens of a "
                             "sequence.", LATENCY_BUCKETS)

    def render(self) -> str:
        with self.lock:
            lines = []
            for name, value in self.gauges.items():
                lines += [f"# TYPE ernie45_{name} gauge", f"ernie45_{name} {value}"]
            for name, value in self.counters.items():
                lines += [f"# TYPE ernie45_{name} counter", f"ernie45_{name} {value}"]
            lines.append("# TYPE ernie45_request_success_total counter")
            lines += [f'ernie45_request_success_total{{finish_reason="{r}"}} {n}' for r, n in self.finished.items()]
            return "\n".join(lines + self.ttft.render() + self.itl.render()) + "\n"


class GenerationStream:
    """The events of one API request's sequences; iterate it, and call :meth:`abort` when leaving early."""

    def __init__(self, owner: AsyncEngine, rids: list[str], events: asyncio.Queue):
        self._owner, self.rids, self._events, self._open = owner, rids, events, len(rids)

    async def __aiter__(self) -> AsyncIterator[SeqEvent]:
        while self._open:
            event = await self._events.get()
            self._open -= event.finish_reason is not None
            yield event

    def abort(self) -> None:
        """Abort every sequence still running (a no-op once all have finished)."""
        if self._open:
            self._owner._post(("abort", self.rids))


class AsyncEngine:
    """Runs ``engine`` on its own thread; :meth:`submit` is the only way in from asyncio code."""

    def __init__(self, engine: Engine, tokenizer: Tokenizer):
        self.engine, self.tokenizer = engine, tokenizer
        self.metrics = Metrics(engine.pool.num_blocks)
        cfg = engine.model.config
        # The last sampled token is never written to the cache, hence the + 1.
        self.max_model_len = min(cfg.max_position_embeddings, engine.pool.num_blocks * engine.block_size + 1)
        self.vocab_size = cfg.vocab_size
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._live: dict[str, _Seq] = {}
        self._ids = itertools.count()
        self._thread = threading.Thread(target=self._run, name="ernie45-engine", daemon=True)
        self._stopping = False
        self._closed = False  # set by the engine thread as it exits; guarded by _lock with every "add"
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ asyncio side
    def start(self) -> None:
        if not self._thread.is_alive():
            self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._stopping

    def shutdown(self, timeout: float = 10.0) -> None:
        """Fail whatever is still running with an error event and stop the thread."""
        self._stopping = True
        if self._thread.is_alive():
            self._post(("stop", None))
            self._thread.join(timeout)

    async def submit(self, prompts: list[list[int]], params: SamplingParams, chat: bool = False) -> GenerationStream:
        """Queue ``params.n`` samples of each prompt; sequence index = prompt index * n + sample index.

        Raises ValueError (the engine's message) if any of them is refused; then none is queued.
        """
        if not self.alive:
            raise RuntimeError("the engine is not running (the server is shutting down)")
        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        deliver = _deliverer(loop, events)
        base = f"r{next(self._ids)}-{uuid.uuid4().hex[:8]}"
        seqs = [self._new_seq(f"{base}-{i}-{j}", i * params.n + j, prompt, self._engine_params(params, j, chat),
                              deliver) for i, prompt in enumerate(prompts) for j in range(params.n)]
        accepted: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:  # so an "add" is never queued behind the thread's last look at the queue
            if self._closed:
                raise RuntimeError("the engine is not running (the server is shutting down)")
            self._post(("add", (seqs, accepted)))
        rids = [s.rid for s in seqs]
        try:
            await asyncio.wrap_future(accepted)
        except asyncio.CancelledError:  # the client left while we waited: do not leak its requests
            self._post(("abort", rids))
            raise
        return GenerationStream(self, rids, events)

    def _engine_params(self, params: SamplingParams, index: int, chat: bool) -> SamplingParams:
        """One engine request's params: n=1, a derived seed, EOS (and end-of-turn in chat) as stop ids."""
        tok, extra = self.tokenizer, []
        if not params.ignore_eos:
            extra += [t for t in (tok.eos_token_id, tok.sep_token_id if chat else None) if t is not None]
        seed = None if params.seed is None else derive_seed(params.seed, index)
        stop_ids = tuple(dict.fromkeys((*params.stop_token_ids, *extra)))
        return dataclasses.replace(params, n=1, seed=seed, stop_token_ids=stop_ids)

    def _new_seq(self, rid: str, index: int, prompt: list[int], params: SamplingParams, deliver) -> _Seq:
        eos = self.engine.model.config.eos_token_ids
        return _Seq(rid, index, list(prompt), params, IncrementalDetokenizer(self.tokenizer, skip_special_tokens=True),
                    StopChecker(params, eos), deliver, time.perf_counter())

    def _post(self, command: tuple) -> None:
        self._commands.put(command)

    # ------------------------------------------------------------------ engine thread
    def _run(self) -> None:
        while True:
            try:
                if not self._drain(block=not self._live):
                    break
                if self._live:
                    self._step()
                self._update_gauges()
            except Exception:  # a bug outside step(): log it, keep the thread (and the server) alive
                log.exception("engine loop error")
        with self._lock:  # refuse whatever arrived after "stop"
            self._closed = True
            while not self._commands.empty():
                kind, arg = self._commands.get_nowait()
                if kind == "add":
                    arg[1].set_exception(RuntimeError("the engine is not running (the server is shutting down)"))
        self._update_gauges()

    def _drain(self, block: bool) -> bool:
        """Run queued commands; False once told to stop."""
        while True:
            try:
                kind, arg = self._commands.get() if block else self._commands.get_nowait()
            except queue.Empty:
                return True
            block = False
            if kind == "add":
                self._add(*arg)
            elif kind == "abort":
                for rid in arg:
                    self._end(rid, abort=True)
            elif kind == "stop":
                self._fail(list(self._live), "the server is shutting down")
                return False

    def _add(self, seqs: list[_Seq], accepted: concurrent.futures.Future) -> None:
        added = []
        try:
            for seq in seqs:
                self.engine.add_request(seq.rid, seq.prompt, seq.params)
                added.append(seq)
        except Exception as err:
            for seq in added:
                self.engine.abort(seq.rid)
            accepted.set_exception(err)
            return
        for seq in seqs:
            self._live[seq.rid] = seq
        with self.metrics.lock:
            self.metrics.counters["prompt_tokens_total"] += sum(len(s.prompt) for s in seqs)
        accepted.set_result(None)

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception as err:
            log.exception("engine step failed")
            running = [r.request_id for r in self.engine.scheduler.running if r.request_id in self._live]
            self._fail(running or list(self._live), f"the engine failed while running this request: {err!r}")
            return
        for out in outputs:
            if out.request_id in self._live:  # else aborted between schedule and now
                self._advance(self._live[out.request_id], out)

    def _advance(self, seq: _Seq, out: EngineOutput) -> None:
        """Detokenize one token, check stop strings, time it and deliver the visible text."""
        self._time_token(seq)
        reason, text = out.finish_reason, ""
        if reason != FINISH_STOP:  # a token-level stop (EOS, stop id, end of turn) is never shown
            text = seq.stops.feed(seq.detok.feed(out.token_id))
            if seq.stops.finished:  # a stop string matched
                self.engine.finish(seq.rid, FINISH_STOP)
                reason = FINISH_STOP
        if reason is not None and not seq.stops.finished:
            text += seq.stops.feed(seq.detok.finish())
            text += "" if seq.stops.finished else seq.stops.flush()
        seq.deliver(SeqEvent(seq.index, text, out.token_id, out.logprobs, reason))
        if reason is not None:
            self._end(seq.rid, finish_reason=reason)

    def _time_token(self, seq: _Seq) -> None:
        now = time.perf_counter()
        with self.metrics.lock:
            self.metrics.counters["generation_tokens_total"] += 1
            if seq.last_token_at is None:
                self.metrics.ttft.observe(now - seq.arrival)
            else:
                self.metrics.itl.observe(now - seq.last_token_at)
        seq.last_token_at = now

    def _fail(self, rids: list[str], message: str) -> None:
        for rid in rids:
            seq = self._live.get(rid)
            if seq is not None:
                seq.deliver(SeqEvent(seq.index, "", None, finish_reason=FINISH_ERROR, error=message))
            self._end(rid, abort=True, finish_reason=FINISH_ERROR)

    def _end(self, rid: str, abort: bool = False, finish_reason: str | None = None) -> None:
        """Forget a sequence; ``abort`` also drops it from the engine (returning its KV blocks)."""
        if self._live.pop(rid, None) is None:
            return
        if abort:
            try:
                self.engine.abort(rid)
            except Exception:
                log.exception("engine.abort(%s) failed", rid)
        key = finish_reason or "abort"
        with self.metrics.lock:
            if key == FINISH_ERROR:
                self.metrics.counters["request_errors_total"] += 1
            else:
                self.metrics.finished[key] = self.metrics.finished.get(key, 0) + 1

    def _update_gauges(self) -> None:
        sched, pool = self.engine.scheduler, self.engine.pool
        with self.metrics.lock:
            g = self.metrics.gauges
            g["num_requests_running"], g["num_requests_waiting"] = len(sched.running), len(sched.waiting)
            g["kv_blocks_free"] = pool.num_free_blocks
            g["kv_cache_usage_ratio"] = round(1.0 - pool.num_free_blocks / pool.num_blocks, 6)


def _deliverer(loop: asyncio.AbstractEventLoop, events: asyncio.Queue) -> Callable[[SeqEvent], None]:
    """A thread-safe put into ``events``; silently drops events once the loop is closed."""
    def deliver(event: SeqEvent) -> None:
        try:
            loop.call_soon_threadsafe(events.put_nowait, event)
        except RuntimeError:  # loop closed: nobody is listening any more
            pass
    return deliver
