"""The serving engine: owns the model, the paged KV cache, the scheduler and the sampler.

One `step()` = one scheduler decision + one model call over every scheduled token of every request,
flattened into a single row `[1, N]` (decodes and prefill chunks mixed), + one batched sampling call.
The model sees the paged cache only through `PagedAttentionCache.attention` (attention.py's one
method): it writes this step's K/V into the requests' slots, gathers each request's blocks into a
padded `[R, S, Nkv, Dh]` view and runs grouped-query attention (`attend_gqa`) with position masks — no
Python loop over requests or tokens inside the model call. With the model on the fast path, a step where
every request adds one token attends in one C call over the block tables instead (kernels.paged_attention).
Only the rows that need a token go through the LM
head; greedy rows that need no logits (no logprobs, no penalties) take the fast path's exact screened argmax
(greedy_head.py) together, when the model has one, instead of full logits.

The engine has no tokenizer and no clock: text, stop strings and HTTP live in the server layer,
which calls `finish()` when a stop string matches.

Shape legend: N tokens this step, R requests this step, S = max blocks x block size, V vocab.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import kernels
from .attention import attend_gqa
from .fast import is_accelerated
from .kv_cache import BlockPool, PagedKVCache, num_blocks_for_bytes, slot_mapping
from .model import Ernie45ForCausalLM
from .sampling import Sampler, SamplingParams, TokenLogprobs
from .scheduler import Request, Scheduler, SchedulerOutput


@dataclass
class StepBatch:
    """Flattened inputs and the paged-attention metadata of one step."""

    input_ids: torch.Tensor  # [1, N]
    positions: torch.Tensor  # [1, N]
    slots: torch.Tensor  # [N] flat KV slot of each token
    seq_idx: torch.Tensor  # [N] which of the R requests each token belongs to
    offsets: torch.Tensor  # [N] index of the token within its request's chunk
    block_tables: torch.Tensor  # [R, MB] padded with block 0 (masked by ctx_lens)
    ctx_lens: torch.Tensor  # [R] tokens in the cache after this step
    sample_rows: list[int]  # indices into N whose logits produce a token
    sample_reqs: list[Request]


def build_batch(out: SchedulerOutput, block_size: int) -> StepBatch:
    ids, pos, slots, seq, offs, tables, lens, rows, reqs = [], [], [], [], [], [], [], [], []
    for r, item in enumerate(out.scheduled):
        n = item.num_new_tokens
        ids += item.token_ids
        pos += list(item.positions)
        slots.append(slot_mapping(list(item.block_ids), list(item.positions), block_size))
        seq += [r] * n
        offs += range(n)
        tables.append(list(item.block_ids))
        lens.append(item.start + n)
        if item.needs_sample:
            rows.append(len(ids) - 1)
            reqs.append(item.request)
    width = max(len(t) for t in tables)
    return StepBatch(torch.tensor([ids]), torch.tensor([pos]), torch.cat(slots), torch.tensor(seq), torch.tensor(offs),
                     torch.tensor([t + [0] * (width - len(t)) for t in tables]), torch.tensor(lens), rows, reqs)


class PagedAttentionCache:
    """Implements `AttentionCache` over a `PagedKVCache` for the batch set by the engine.

    `decode_kernel` (set by the engine each step: a model on the fast path, every request adding one token):
    attend in one C call over the block tables (kernels.paged_attention) instead of gathering each
    request's blocks into padded tensors."""

    def __init__(self, kv: PagedKVCache):
        self.kv = kv
        self.batch: StepBatch | None = None
        self.decode_kernel = False

    def attention(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  positions: torch.Tensor) -> torch.Tensor:
        """q [1,N,Nq,Dh], k/v [1,N,Nkv,Dh] -> [1,N,Nq,Dh]"""
        b = self.batch
        self.kv.write(layer_idx, b.slots, k[0], v[0])
        if self.decode_kernel and q.dtype == self.kv.dtype and q.device.type == "cpu" and q.shape[-1] % 8 == 0:
            rows = self.kv.kv[layer_idx].view(2, -1, *self.kv.kv.shape[-2:])  # [2, slots, Nkv, Dh]
            return kernels.paged_attention(rows[0], rows[1], b.block_tables, self.kv.block_size, b.seq_idx,
                                           positions[0], q[0])[None]
        keys = self.kv.kv[layer_idx, 0][b.block_tables].flatten(1, 2)  # [R, S, Nkv, Dh]
        values = self.kv.kv[layer_idx, 1][b.block_tables].flatten(1, 2)  # [R, S, Nkv, Dh]
        R, S, T = keys.shape[0], keys.shape[1], int(b.offsets.max()) + 1
        k_pos = torch.arange(S).expand(R, S)
        k_pos = torch.where(k_pos < b.ctx_lens[:, None], k_pos, -1)  # [R, S]; -1 = not this sequence's
        q_pad = q.new_zeros(R, T, *q.shape[2:])  # [R, T, Nq, Dh]
        q_pad[b.seq_idx, b.offsets] = q[0]
        q_pos = torch.full((R, T), -1, dtype=torch.long)
        q_pos[b.seq_idx, b.offsets] = positions[0]
        out = attend_gqa(q_pad, keys.to(q.dtype), values.to(q.dtype), q_pos, k_pos)  # [R, T, Nq, Dh]
        return out[b.seq_idx, b.offsets][None]


@dataclass(frozen=True)
class EngineOutput:
    """A new token for a request; `finish_reason` set when it ended the request."""

    request_id: str
    token_id: int
    finish_reason: str | None
    logprobs: TokenLogprobs | None = None


class Engine:
    """Continuous-batching generation over a paged KV cache.

    kv_cache_bytes sizes the block pool (default 256 MiB); the pool's real size is `kv_bytes_total`.
    """

    def __init__(self, model: Ernie45ForCausalLM, *, block_size: int = 16, kv_cache_bytes: int = 256 << 20,
                 num_blocks: int | None = None, max_num_batched_tokens: int = 512, max_num_seqs: int = 32,
                 enable_prefix_caching: bool = True, seed: int | None = None):
        cfg = model.config
        self.model, self.block_size = model, block_size
        dtype = model.model.embed_tokens.weight.dtype
        shape = (cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim)
        num_blocks = num_blocks or num_blocks_for_bytes(kv_cache_bytes, block_size, *shape, dtype)
        self.kv = PagedKVCache(*shape[:1], num_blocks, block_size, *shape[1:], dtype=dtype)
        self.pool = BlockPool(num_blocks, block_size, enable_prefix_caching)
        self.scheduler = Scheduler(self.pool, max_num_batched_tokens, max_num_seqs, eos_token_ids=cfg.eos_token_ids,
                                   max_model_len=cfg.max_position_embeddings)
        self.sampler = Sampler(seed=seed)
        self.cache = PagedAttentionCache(self.kv)
        self.on_batch = None  # called with each StepBatch before the forward (multi-rank: broadcast it)

    @property
    def kv_bytes_total(self) -> int:
        return self.kv.bytes_total

    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> Request:
        vocab = self.model.config.vocab_size
        if not prompt_ids:
            raise ValueError("the prompt is empty; give at least one token")
        if bad := [t for t in prompt_ids if not 0 <= t < vocab]:
            raise ValueError(f"prompt token ids {bad[:5]} are outside the vocabulary [0, {vocab})")
        request = Request(request_id, prompt_ids, params)
        self.scheduler.add(request)  # raises ValueError when it can never fit
        return request

    def abort(self, request_id: str) -> bool:
        self.sampler.release(request_id)
        return self.scheduler.abort(request_id)

    def finish(self, request_id: str, reason: str = "stop") -> bool:
        self.sampler.release(request_id)
        return self.scheduler.finish(request_id, reason)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished

    @torch.no_grad()
    def forward(self, batch: StepBatch) -> torch.Tensor | None:
        """The model call of one step: K/V written, logits [R', V] of the rows that sample (None if none).

        Under tensor/expert parallelism every rank runs this on the same batch (rank 0 broadcasts it).
        """
        hidden = self.sample_hidden(batch)
        return None if hidden is None else self.model.logits(hidden[None])[0]

    def sample_hidden(self, batch: StepBatch) -> torch.Tensor | None:
        """The model call of one step without the head: pre-norm hidden [R', D] of the rows that sample."""
        self.cache.batch = batch
        self.cache.decode_kernel = (is_accelerated(self.model) and kernels.available()
                                    and not bool(batch.offsets.any()))  # one token per request
        try:
            hidden = self.model.model(batch.input_ids, batch.positions, self.cache)  # [1, N, D]
        finally:
            self.cache.batch = None
        return hidden[0, batch.sample_rows] if batch.sample_rows else None

    def greedy_head_rows(self, params: list[SamplingParams]) -> list[int]:
        """Rows whose token the fast path's exact greedy head (greedy_head.py) can choose without logits:
        temperature 0, no penalties (they move the argmax), no logprobs (they need the logits). Only in a
        single process: under parallelism every rank must run the same head."""
        if getattr(self.model, "greedy_head", None) is None or self.on_batch is not None:
            return []
        return [i for i, p in enumerate(params) if p.greedy and not p.has_penalties and not p.logprobs]

    def sample(self, hidden: torch.Tensor, reqs: list[Request]) -> tuple[list[int], list[TokenLogprobs | None]]:
        """Tokens and logprobs for the sampling rows hidden [R', D]: greedy-head rows from one screened
        pass over the head, the others from full logits through the sampler."""
        params = [r.params for r in reqs]
        tokens: list[int] = [0] * len(reqs)
        logprobs: list[TokenLogprobs | None] = [None] * len(reqs)
        greedy = self.greedy_head_rows(params)
        if greedy:
            picked = self.model.greedy_head(self.model.model.norm(hidden[greedy])).tolist()
            for i, t in zip(greedy, picked):
                tokens[i] = t
        taken = set(greedy)
        rest = [i for i in range(len(reqs)) if i not in taken]
        if rest:
            sub = [reqs[i] for i in rest]
            logits = self.model.logits(hidden[rest][None])[0]  # [len(rest), V]
            sampled = self.sampler(logits, [r.request_id for r in sub], [r.params for r in sub],
                                   [r.prompt_token_ids for r in sub], [r.output_token_ids for r in sub])
            for i, t, lp in zip(rest, sampled.token_ids.tolist(), sampled.logprobs):
                tokens[i], logprobs[i] = t, lp
        return tokens, logprobs

    @torch.no_grad()
    def step(self) -> list[EngineOutput]:
        out = self.scheduler.schedule()
        if out.is_empty:
            return []
        batch = build_batch(out, self.block_size)
        if self.on_batch is not None:
            self.on_batch(batch)
        hidden = self.sample_hidden(batch)  # [R', D]
        reqs = batch.sample_reqs
        ids, lps = self.sample(hidden, reqs) if reqs else ([], [])
        tokens = dict(zip([r.request_id for r in reqs], ids))
        logprobs = dict(zip([r.request_id for r in reqs], lps))
        events = self.scheduler.update(out, tokens)
        for e in events:
            if e.finish_reason is not None:
                self.sampler.release(e.request_id)
        return [EngineOutput(e.request_id, e.token_id, e.finish_reason, logprobs.get(e.request_id)) for e in events]

    def generate(self, prompts: dict[str, list[int]], params: SamplingParams) -> dict[str, list[int]]:
        """Run prompts to completion (all added at once); returns new token ids per request id."""
        for rid, ids in prompts.items():
            self.add_request(rid, ids, params)
        outputs: dict[str, list[int]] = {rid: [] for rid in prompts}
        while self.has_unfinished():
            for e in self.step():
                outputs.setdefault(e.request_id, []).append(e.token_id)
        return outputs
