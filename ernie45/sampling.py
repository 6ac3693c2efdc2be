"""Sampling: per-request parameters, pure logits processors and a seeded sampler.

Owns :class:`SamplingParams` (validated once, at construction), the processors that turn a batch
of logits into a sampling distribution, the draw itself and the logprobs reported to clients.
Stop conditions live in ``stopping.py``.

Choices:
- Processor order is penalties -> temperature -> top-k -> top-p -> min-p (transformers' order).
  Every processor works on float32, returns a new tensor and masks with ``-inf``; each row always
  keeps its best token, so a distribution can never become empty.
- Temperature below ``GREEDY_TEMPERATURE`` means greedy: the argmax of the *penalised* logits.
- The draw is an exponential race, ``argmax(p / E)`` with ``E ~ Exp(1)``, which samples exactly
  from ``p``. A seeded request draws its ``V`` noise values from its own ``torch.Generator`` every
  step, so its tokens depend on its seed and its own logits only, never on its batch neighbours or
  its row index. Unseeded rows share one generator (or torch's global one).
- Logprobs are of the model's raw distribution (``log_softmax`` of the unprocessed logits), the
  OpenAI / vLLM default: they do not change with temperature, penalties or truncation.

Shape legend: B rows (one per sequence in the batch), V vocabulary, N top logprobs.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Sequence

import torch

GREEDY_TEMPERATURE = 1e-5  # below this a row is sampled greedily (dividing by ~0 would overflow)
MAX_TOP_LOGPROBS = 20  # OpenAI's limit for top_logprobs


@dataclass(frozen=True)
class SamplingParams:
    """How one request is sampled and when it stops; OpenAI-compatible ranges.

    ``top_k`` 0 or -1 disables top-k. ``stop`` strings and ``stop_token_ids`` end the request with
    finish_reason "stop" (as does EOS unless ``ignore_eos``); ``max_tokens`` ends it with "length".
    ``logprobs`` asks for the chosen token's logprob, ``top_logprobs`` for that many alternatives.
    ``n > 1`` is fanned out by the engine into n requests (see :func:`derive_seed`).
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    max_tokens: int = 16
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    n: int = 1
    logprobs: bool | None = None
    top_logprobs: int = 0

    def __post_init__(self) -> None:
        # Normalise once: a bare string or a list becomes a tuple, so params stay hashable.
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        object.__setattr__(self, "stop", stop)
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first parameter outside its allowed range."""
        _check(0.0 <= self.temperature <= 2.0, "temperature", self.temperature, "0 <= temperature <= 2")
        _check(0.0 < self.top_p <= 1.0, "top_p", self.top_p, "0 < top_p <= 1")
        _check(_is_int(self.top_k) and (self.top_k >= -1), "top_k", self.top_k, "-1 or 0 (off) or an integer >= 1")
        _check(0.0 <= self.min_p <= 1.0, "min_p", self.min_p, "0 <= min_p <= 1")
        _check(self.repetition_penalty > 0.0, "repetition_penalty", self.repetition_penalty, "> 0 (1 is off)")
        for name in ("presence_penalty", "frequency_penalty"):
            _check(-2.0 <= getattr(self, name) <= 2.0, name, getattr(self, name), f"-2 <= {name} <= 2")
        _check(self.seed is None or _is_int(self.seed), "seed", self.seed, "an integer or None")
        _check(_is_int(self.max_tokens) and self.max_tokens >= 1, "max_tokens", self.max_tokens, "an integer >= 1")
        _check(all(isinstance(s, str) and s for s in self.stop), "stop", self.stop, "non-empty strings")
        _check(all(_is_int(t) and t >= 0 for t in self.stop_token_ids), "stop_token_ids", self.stop_token_ids,
               "non-negative token ids")
        _check(_is_int(self.n) and self.n >= 1, "n", self.n, "an integer >= 1")
        _check(_is_int(self.top_logprobs) and 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS, "top_logprobs",
               self.top_logprobs, f"an integer in 0..{MAX_TOP_LOGPROBS}")
        _check(self.top_logprobs == 0 or bool(self.logprobs), "top_logprobs", self.top_logprobs,
               "0 unless logprobs is true (set logprobs=True to get alternatives)")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE

    @property
    def has_penalties(self) -> bool:
        return (self.repetition_penalty != 1.0 or self.presence_penalty != 0.0
                or self.frequency_penalty != 0.0)


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check(ok: bool, name: str, value: object, allowed: str) -> None:
    if not ok:
        raise ValueError(f"SamplingParams.{name}={value!r} is out of range; allowed: {allowed}")


def derive_seed(seed: int, index: int) -> int:
    """Seed of the ``index``-th of n samples of one request; index 0 keeps ``seed`` itself.

    Giving every sample the parent's seed would make all n completions identical; mixing through
    sha256 keeps (seed, index) pairs from colliding the way ``seed + index`` would.
    """
    if index == 0:
        return seed
    digest = hashlib.sha256(f"{seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


# ----------------------------------------------------------------------------- processors

def _rows(x: float | int | torch.Tensor | Sequence[float], batch: int, like: torch.Tensor) -> torch.Tensor:
    """A per-row parameter as a [B] tensor on ``like``'s device (scalars are broadcast)."""
    t = torch.as_tensor(x, device=like.device)
    if t.dim() == 0:
        return t.expand(batch)
    if t.shape != (batch,):
        raise ValueError(f"a per-row sampling parameter has shape {tuple(t.shape)}; expected ({batch},)")
    return t


def token_counts(id_lists: Sequence[Sequence[int]], vocab: int, device: torch.device | str) -> torch.Tensor:
    """How often each token occurs in each row's id list: [B, V] float32 counts."""
    width = max((len(ids) for ids in id_lists), default=0)
    ids = torch.full((len(id_lists), width), vocab, dtype=torch.long)  # pad with an extra column
    for row, seq in enumerate(id_lists):
        ids[row, :len(seq)] = torch.as_tensor(list(seq), dtype=torch.long)
    counts = torch.zeros(len(id_lists), vocab + 1)  # [B, V+1]
    counts.scatter_add_(1, ids, torch.ones(ids.shape))
    return counts[:, :vocab].to(device)


def apply_penalties(logits: torch.Tensor, prompt_ids: Sequence[Sequence[int]],
                    output_ids: Sequence[Sequence[int]], repetition=1.0, presence=0.0,
                    frequency=0.0) -> torch.Tensor:
    """Repetition penalty over prompt+output tokens; presence/frequency over output tokens only.

    Repetition (CTRL / transformers / vLLM): a seen token's logit is divided by the penalty when
    positive and multiplied when negative. Presence/frequency (OpenAI): subtract
    ``presence * [count > 0] + frequency * count``. Costs O(context) per call.
    """
    out = logits.float()  # [B, V]
    batch, vocab = out.shape
    out_counts = token_counts(output_ids, vocab, out.device)  # [B, V]
    seen = (token_counts(prompt_ids, vocab, out.device) > 0) | (out_counts > 0)  # [B, V]
    rep = _rows(repetition, batch, out).float()[:, None]  # [B, 1]
    out = torch.where(seen, torch.where(out > 0, out / rep, out * rep), out)
    frequency = _rows(frequency, batch, out).float()[:, None]
    presence = _rows(presence, batch, out).float()[:, None]
    return out - frequency * out_counts - presence * (out_counts > 0).float()


def apply_temperature(logits: torch.Tensor, temperature) -> torch.Tensor:
    """Divide each row by its temperature; greedy rows (temperature ~0) are left unscaled."""
    t = _rows(temperature, logits.shape[0], logits).float()  # [B]
    t = torch.where(t < GREEDY_TEMPERATURE, torch.ones_like(t), t)
    return logits.float() / t[:, None]


def apply_top_k(logits: torch.Tensor, top_k) -> torch.Tensor:
    """Keep each row's k largest logits (k <= 0 or k >= V: off); ties with the k-th are kept."""
    x = logits.float()  # [B, V]
    k = _rows(top_k, x.shape[0], x).long()  # [B]
    k = torch.where((k <= 0) | (k > x.shape[1]), torch.full_like(k, x.shape[1]), k)
    kth = x.sort(dim=-1, descending=True).values.gather(1, (k - 1)[:, None])  # [B, 1]
    return x.masked_fill(x < kth, float("-inf"))


def apply_top_p(logits: torch.Tensor, top_p) -> torch.Tensor:
    """Keep each row's smallest set of top tokens whose probability mass reaches p (p = 1: off)."""
    x = logits.float()  # [B, V]
    p = _rows(top_p, x.shape[0], x).float()[:, None]  # [B, 1]
    sorted_x, order = x.sort(dim=-1, descending=True)  # [B, V]
    probs = sorted_x.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # [B, V] mass of the strictly better tokens
    drop = (mass_before >= p) & (p < 1.0)  # p = 1 must keep even tokens past float rounding
    drop[:, 0] = False
    return torch.empty_like(x).scatter_(1, order, sorted_x.masked_fill(drop, float("-inf")))


def apply_min_p(logits: torch.Tensor, min_p) -> torch.Tensor:
    """Drop tokens whose probability is below ``min_p`` times the row's top probability."""
    x = logits.float()  # [B, V]
    probs = x.softmax(dim=-1)
    floor = _rows(min_p, x.shape[0], x).float()[:, None] * probs.max(dim=-1, keepdim=True).values  # [B, 1]
    return x.masked_fill(probs < floor, float("-inf"))


def process_logits(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """Temperature, top-k, top-p, min-p for a batch; processors no row uses are skipped."""
    x = apply_temperature(logits, [p.temperature for p in params])
    if any(p.top_k > 0 for p in params):
        x = apply_top_k(x, [p.top_k for p in params])
    if any(p.top_p < 1.0 for p in params):
        x = apply_top_p(x, [p.top_p for p in params])
    if any(p.min_p > 0.0 for p in params):
        x = apply_min_p(x, [p.min_p for p in params])
    return x


# ----------------------------------------------------------------------------- drawing

def _exponential_noise(probs: torch.Tensor, rows: list[int], generators: Sequence[torch.Generator | None],
                       default: torch.Generator | None) -> torch.Tensor:
    """Exp(1) noise [B, V]: a seeded row draws V values from its own generator, others share one."""
    noise = torch.ones_like(probs)  # [B, V]; rows not listed keep 1 (they are greedy)
    shared = [r for r in rows if generators[r] is None]
    if shared:
        noise[shared] = torch.empty(len(shared), probs.shape[1], device=probs.device).exponential_(generator=default)
    for r in rows:
        if generators[r] is not None:
            noise[r].exponential_(generator=generators[r])
    # Exp(1) can return exactly 0; 0/0 would be NaN and argmax picks NaN, so keep the noise positive.
    return noise.clamp_(min=torch.finfo(noise.dtype).tiny)


def sample(logits: torch.Tensor, params: Sequence[SamplingParams],
           generators: Sequence[torch.Generator | None] | None = None,
           default_generator: torch.Generator | None = None) -> torch.Tensor:
    """Token ids [B] from (already penalised) logits [B, V]: greedy rows take the argmax.

    ``generators[b]`` (on the logits' device) makes row b reproducible; ``None`` rows use
    ``default_generator`` (torch's global RNG when that is None too).
    """
    if len(params) != logits.shape[0]:
        raise ValueError(f"sample() got {logits.shape[0]} logit rows but {len(params)} SamplingParams")
    generators = generators if generators is not None else [None] * len(params)
    tokens = logits.float().argmax(dim=-1)  # [B]
    random_rows = [r for r, p in enumerate(params) if not p.greedy]
    if not random_rows:
        return tokens
    probs = process_logits(logits, params).softmax(dim=-1)  # [B, V]
    noise = _exponential_noise(probs, random_rows, generators, default_generator)
    drawn = (probs / noise).argmax(dim=-1)  # [B] exponential race
    rows = torch.as_tensor(random_rows, device=logits.device)
    return tokens.index_copy(0, rows, drawn[rows])


def compute_logprobs(logits: torch.Tensor, token_ids: torch.Tensor, top_n: int
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Raw-distribution logprobs: chosen [B], top ids [B, N] and top logprobs [B, N] (best first)."""
    logp = logits.float().log_softmax(dim=-1)  # [B, V]
    chosen = logp.gather(1, token_ids.long()[:, None]).squeeze(1)  # [B]
    top = logp.topk(top_n, dim=-1)  # [B, N]
    return chosen, top.indices, top.values


@dataclass(frozen=True)
class TokenLogprobs:
    """One sampled token's logprob and its top alternatives [(token id, logprob)], best first."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass
class SamplerOutput:
    token_ids: torch.Tensor  # [B] long
    logprobs: list[TokenLogprobs | None]  # per row; None where the request did not ask


class Sampler:
    """Penalties, processors, the seeded draw and logprobs for a batch; owns per-request RNGs.

    A seeded request gets a ``torch.Generator`` seeded once, on first use, and kept until
    :meth:`release`; it keeps its state across preemption, so a recomputed request continues its
    random stream where it left off. ``seed`` seeds the generator shared by unseeded requests.
    """

    def __init__(self, device: torch.device | str = "cpu", seed: int | None = None):
        self.device = torch.device(device)
        self._shared = torch.Generator(self.device).manual_seed(seed) if seed is not None else None
        self._generators: dict[str, torch.Generator] = {}

    def generator(self, request_id: str, params: SamplingParams) -> torch.Generator | None:
        if params.seed is None:
            return None
        if request_id not in self._generators:
            self._generators[request_id] = torch.Generator(self.device).manual_seed(params.seed)
        return self._generators[request_id]

    def release(self, request_id: str) -> None:
        """Forget a finished or aborted request's generator."""
        self._generators.pop(request_id, None)

    def __call__(self, logits: torch.Tensor, request_ids: Sequence[str], params: Sequence[SamplingParams],
                 prompt_ids: Sequence[Sequence[int]], output_ids: Sequence[Sequence[int]]) -> SamplerOutput:
        x = logits.float()  # [B, V]
        if any(p.has_penalties for p in params):
            x = apply_penalties(x, prompt_ids, output_ids, [p.repetition_penalty for p in params],
                                [p.presence_penalty for p in params], [p.frequency_penalty for p in params])
        gens = [self.generator(rid, p) for rid, p in zip(request_ids, params)]
        tokens = sample(x, params, gens, self._shared)  # [B]
        return SamplerOutput(tokens, self._logprobs(logits, tokens, params))

    @staticmethod
    def _logprobs(logits: torch.Tensor, tokens: torch.Tensor, params: Sequence[SamplingParams]
                  ) -> list[TokenLogprobs | None]:
        if not any(p.logprobs for p in params):
            return [None] * len(params)
        chosen, top_ids, top_lp = compute_logprobs(logits, tokens, max(p.top_logprobs for p in params))
        ids, chosen, top_ids, top_lp = tokens.tolist(), chosen.tolist(), top_ids.tolist(), top_lp.tolist()
        return [TokenLogprobs(ids[b], chosen[b], tuple(zip(top_ids[b][:p.top_logprobs], top_lp[b][:p.top_logprobs])))
                if p.logprobs else None for b, p in enumerate(params)]
