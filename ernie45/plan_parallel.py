"""Where the planner's bytes land on several GPUs: tensor, expert and pipeline parallelism, offload.

Owns: :class:`Layout` (``tp`` x ``ep`` per pipeline stage, ``pp`` stages), its validity checks
(head counts, expert counts, quantization-group divisibility of the sharded widths), the per-GPU memory
of every stage, and the searches built on it (best layout for N GPUs, minimum GPUs, maximum context or
concurrent sequences) and the decode tokens/s bound.

Model of a layout — exactly what ernie45's runtime allocates (``ernie45/distributed.py``), stated here
so the numbers can be checked by hand:

* A stage has ``G = tp x ep`` GPUs (ranks are ep-major: ``rank = ep_rank * tp + tp_rank``), and every
  GPU runs every sequence (activations are replicated; no data-parallel attention).
* Attention, dense FFN, embedding and head are split ``tp`` ways (embedding/head by vocabulary rows,
  ``ceil(V / tp)`` each) and replicated over the ``ep`` groups. KV heads split with ``tp`` until ``tp``
  exceeds them; then each GPU keeps one KV head.
* Routed experts are dealt out whole over ``ep`` ranks and each is split ``tp`` ways inside.
* Shared experts are split ``tp x ep`` ways (all GPUs of the stage).
* Pipeline stages take contiguous, near-equal runs of decoder layers; the first holds the embedding,
  the last the final norm, head and MTP (and a second copy of a tied table when ``pp > 1``).
* ``offload_experts`` keeps routed experts in host RAM (computed there, as llama.cpp's ``-ot exps=CPU``).

Every GPU of a stage holds the same bytes under this model, so results are reported per stage.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from .config import ModelConfig
from .plan import (DEFAULT_PREFILL_CHUNK, KV_DTYPE_BYTES, MIXED_2BIT_INT4_MOE_LAYERS, OVERHEAD_HIGH, Shards,
                   Tensor, activation_bytes, check_scheme, overhead_bytes, tensor_format, tensors)


@dataclass(frozen=True)
class Layout:
    tp: int = 1
    ep: int = 1
    pp: int = 1

    @property
    def stage_gpus(self) -> int:
        return self.tp * self.ep

    @property
    def num_gpus(self) -> int:
        return self.stage_gpus * self.pp

    @property
    def etp(self) -> int:
        """Ways each routed expert is split inside its EP rank."""
        return self.tp

    def to_dict(self) -> dict:
        return {"num_gpus": self.num_gpus, "tp": self.tp, "ep": self.ep, "pp": self.pp}


@dataclass(frozen=True)
class Workload:
    """What the GPUs must hold besides weights, and the weight scheme."""

    scheme: str = "bf16"
    context: int = 4096
    batch: int = 1
    kv_dtype: str = "bf16"
    mtp: bool = False
    offload_experts: bool = False
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK
    int4_moe_layers: int = MIXED_2BIT_INT4_MOE_LAYERS


@dataclass(frozen=True)
class StageMemory:
    """Bytes on each GPU of one pipeline stage (all its GPUs are alike)."""

    stage: int
    gpus: int
    layers: tuple[int, int]  # [first, last] decoder layer, inclusive; (-1, -1) if none
    weights: dict[str, int]
    kv_cache: int
    activations: int
    overhead: tuple[int, int]
    host_weights: int = 0

    @property
    def weights_total(self) -> int:
        return sum(self.weights.values())

    @property
    def total(self) -> tuple[int, int]:
        base = self.weights_total + self.kv_cache + self.activations
        return base + self.overhead[0], base + self.overhead[1]

    def to_dict(self) -> dict:
        low, high = self.total
        return {"stage": self.stage, "gpus": self.gpus, "layers": list(self.layers), "weights": dict(self.weights),
                "weights_total": self.weights_total, "kv_cache": self.kv_cache, "activations": self.activations,
                "overhead": {"low": self.overhead[0], "high": self.overhead[1]},
                "total": {"low": low, "high": high}, "host_weights_per_gpu": self.host_weights}


# ---- validity -------------------------------------------------------------------------------------
def layout_errors(cfg: ModelConfig, layout: Layout, scheme: str,
                  int4_moe_layers: int = MIXED_2BIT_INT4_MOE_LAYERS) -> list[str]:
    """Why ``layout`` cannot run ``cfg`` under ``scheme`` (empty list: it can)."""
    tp, ep, pp = layout.tp, layout.ep, layout.pp
    if min(tp, ep, pp) < 1:
        return [f"tp, ep and pp must be >= 1 (got tp={tp} ep={ep} pp={pp})"]
    errors = []
    if cfg.num_attention_heads % tp:
        errors.append(f"tp={tp} does not divide the {cfg.num_attention_heads} attention heads")
    kv = cfg.num_key_value_heads
    if kv % tp and tp % kv:
        errors.append(f"tp={tp} neither divides nor is a multiple of the {kv} KV heads")
    if pp > cfg.num_hidden_layers:
        errors.append(f"pp={pp} exceeds the {cfg.num_hidden_layers} decoder layers")
    if ep > 1 and not cfg.is_moe:
        errors.append(f"ep={ep} needs routed experts; {cfg.model_type} is a dense model")
    elif cfg.is_moe and cfg.moe_num_experts % ep:
        errors.append(f"ep={ep} does not divide the {cfg.moe_num_experts} experts")
    return errors or _group_errors(cfg, layout, scheme, int4_moe_layers)


def _group_errors(cfg: ModelConfig, layout: Layout, scheme: str, int4_moe_layers: int) -> list[str]:
    """A shard must hold whole quantization blocks: split width % block == 0 on the split dimension."""
    errors: dict[str, None] = {}
    for t in tensors(cfg, mtp=True):
        if t.role != "linear" or t.split == "rep":
            continue
        fmt, ways = tensor_format(t, scheme, int4_moe_layers), _ways(t, layout)
        if t.split == "kv":
            dim, ways, block = _kv_heads_per_gpu(cfg, layout.tp) * cfg.head_dim, 1, fmt.block_rows
        else:
            dim, block = (t.cols, fmt.block_cols) if t.split == "row" else (t.rows, fmt.block_rows)
        if dim % ways:
            errors[f"{_short(t)}: width {dim} does not split {ways} ways"] = None
        elif block and (dim // ways) % block:
            what = f"{fmt.name} {'groups' if fmt.block_rows == 1 else 'blocks'} of {block}"
            errors[f"{_short(t)}: {dim} / {ways} = {dim // ways} is not a multiple of the {what}; "
                   "use fewer tensor-parallel ways (each expert is split tp ways inside its EP rank)"] = None
    return list(errors)


def _short(t: Tensor) -> str:
    return f"{t.component} {t.name.rsplit('.', 2)[-2]}"


# ---- per-GPU shards -------------------------------------------------------------------------------
def _kv_heads_per_gpu(cfg: ModelConfig, tp: int) -> int:
    return max(cfg.num_key_value_heads // tp, 1)


def _ways(t: Tensor, layout: Layout) -> int:
    if t.split == "rep":
        return 1
    if t.component == "shared_experts":
        return layout.stage_gpus
    return layout.etp if t.component == "experts" else layout.tp


def shard_bytes(cfg: ModelConfig, t: Tensor, layout: Layout, work: Workload) -> int:
    """Bytes of ``t`` on one GPU of its stage (formats applied to the shard's own shape)."""
    rows, cols, ways = t.rows, t.cols, _ways(t, layout)
    if t.split in ("col", "vocab"):
        rows = math.ceil(rows / ways)
    elif t.split == "row":
        cols = math.ceil(cols / ways)
    elif t.split == "kv":
        rows = _kv_heads_per_gpu(cfg, layout.tp) * cfg.head_dim
    count = math.ceil(t.count / layout.ep) if t.component == "experts" else t.count
    return count * tensor_format(t, work.scheme, work.int4_moe_layers).nbytes(rows, cols)


def stage_of(t: Tensor, cfg: ModelConfig, pp: int) -> int:
    if t.stage == "first":
        return 0
    if t.stage == "last":
        return pp - 1
    return t.layer * pp // cfg.num_hidden_layers


def _stage_layers(cfg: ModelConfig, pp: int, s: int) -> tuple[int, int]:
    ids = [i for i in range(cfg.num_hidden_layers) if i * pp // cfg.num_hidden_layers == s]
    return (ids[0], ids[-1]) if ids else (-1, -1)


@dataclass
class StageWeights:
    """Weights of one GPU of a stage: resident per component, offloaded to host, and read per decode step."""

    gpu: dict[str, int] = field(default_factory=dict)
    host: int = 0
    active_gpu: int = 0
    active_host: int = 0


class Placement:
    """Per-stage weight bytes of one model, scheme and layout; cached because searches reuse them."""

    def __init__(self, cfg: ModelConfig, work: Workload):
        check_scheme(work.scheme)
        self.cfg, self.work = cfg, work
        self.tensors = tensors(cfg, mtp=work.mtp)
        self._weights: dict[Layout, list[StageWeights]] = {}
        self._errors: dict[Layout, list[str]] = {}

    def errors(self, layout: Layout) -> list[str]:
        if layout not in self._errors:
            self._errors[layout] = layout_errors(self.cfg, layout, self.work.scheme, self.work.int4_moe_layers)
        return self._errors[layout]

    def stage_weights(self, layout: Layout) -> list[StageWeights]:
        if layout not in self._weights:
            self._weights[layout] = self._place(layout)
        return self._weights[layout]

    def _place(self, layout: Layout) -> list[StageWeights]:
        cfg, out = self.cfg, [StageWeights() for _ in range(layout.pp)]
        for t in self.tensors:
            st, n = out[stage_of(t, cfg, layout.pp)], shard_bytes(cfg, t, layout, self.work)
            active = _active_bytes(t, cfg, n, self.work.batch)
            if self.work.offload_experts and t.component == "experts":
                st.host, st.active_host = st.host + n, st.active_host + active
            else:
                st.gpu[t.component] = st.gpu.get(t.component, 0) + n
                st.active_gpu += active
        if cfg.tie_word_embeddings and layout.pp > 1:  # the last stage needs its own copy of the table
            out[-1].gpu["lm_head"] = out[0].gpu["embed"]
            out[-1].active_gpu += out[0].gpu["embed"]
            out[0].active_gpu -= out[0].gpu["embed"]  # the first stage only looks rows up
        return out


def _active_bytes(t: Tensor, cfg: ModelConfig, n: int, batch: int) -> int:
    """Bytes of this shard one decode step reads: routed experts by the expected share touched."""
    if t.component == "embed":
        return n if cfg.tie_word_embeddings else 0  # a tied table is read whole as the head
    if t.component == "experts":
        touched = 1 - (1 - cfg.moe_k / cfg.moe_num_experts) ** batch  # uniform routing; k/E for one sequence
        return round(n * touched)
    return n


def stage_memory(place: Placement, layout: Layout, work: Workload | None = None) -> list[StageMemory]:
    """Per-stage memory for ``layout``; ``work`` overrides context/batch of the placement's workload."""
    cfg, work = place.cfg, work or place.work
    seqs = work.batch  # every GPU runs every sequence
    kv_heads = _kv_heads_per_gpu(cfg, layout.tp)
    kv_tok = 2 * kv_heads * cfg.head_dim * KV_DTYPE_BYTES[work.kv_dtype]
    chunk = min(work.prefill_chunk, work.context * seqs)
    shards = Shards(tp=layout.tp, kv_heads=kv_heads, experts=layout.stage_gpus)
    out = []
    for s, w in enumerate(place.stage_weights(layout)):
        first, last = _stage_layers(cfg, layout.pp, s)
        is_last = s == layout.pp - 1
        mtp_layer = int(is_last and work.mtp and cfg.num_nextn_predict_layers > 0)  # its own KV cache
        n_layers = (last - first + 1 if first >= 0 else 0) + mtp_layer
        kv = n_layers * kv_tok * work.context * seqs
        act = activation_bytes(cfg, chunk, shards=shards, logit_rows=seqs if is_last else 0)
        out.append(StageMemory(s, layout.stage_gpus, (first, last), dict(w.gpu), kv, act,
                               overhead_bytes(kv + act), w.host))
    return out


def peak_bytes(stages: list[StageMemory], high: bool = True) -> int:
    return max(st.total[1 if high else 0] for st in stages)


# ---- searches ------------------------------------------------------------------------------------
def candidate_layouts(cfg: ModelConfig, n: int) -> list[Layout]:
    """All (tp, ep, pp) shapes of exactly ``n`` GPUs, valid or not."""
    out = []
    for pp in (p for p in range(1, n + 1) if n % p == 0 and p <= cfg.num_hidden_layers):
        g = n // pp
        out += [Layout(tp=g // ep, ep=ep, pp=pp) for ep in range(1, g + 1) if g % ep == 0]
    return [lay for lay in out if lay.ep == 1 or cfg.is_moe]


def best_layout(place: Placement, n: int) -> tuple[Layout, list[StageMemory]] | None:
    """The valid n-GPU layout with the lowest per-GPU peak (ties: fewer stages, then more tp)."""
    best = None
    for lay in candidate_layouts(place.cfg, n):
        if place.errors(lay):
            continue
        stages = stage_memory(place, lay)
        key = (peak_bytes(stages), lay.pp, -lay.tp)
        if best is None or key < best[0]:
            best = (key, lay, stages)
    return None if best is None else (best[1], best[2])


def min_gpus(place: Placement, budget_bytes: int, max_gpus: int = 64) -> tuple[Layout, list[StageMemory]] | None:
    """Fewest GPUs of ``budget_bytes`` each whose best layout fits with the high overhead estimate.

    ``budget_bytes`` is what one GPU may fill (``Gpu.budget_bytes``: its usable memory times the
    engine's ``gpu_memory_utilization``), here and in :func:`max_context` / :func:`max_sequences`.
    """
    gpu_weights = sum(sum(w.gpu.values()) for w in place.stage_weights(Layout()))
    room = budget_bytes - OVERHEAD_HIGH
    start = max(1, math.ceil(gpu_weights / room)) if room > 0 else max_gpus + 1
    for n in range(start, max_gpus + 1):
        found = best_layout(place, n)
        if found and peak_bytes(found[1]) <= budget_bytes:
            return found
    return None


def _largest(fits, lo: int, hi: int) -> int:
    """Largest x in [lo, hi] with fits(x), given fits is monotone decreasing; lo - 1 if none."""
    if not fits(lo):
        return lo - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    return lo


def max_context(place: Placement, layout: Layout, budget_bytes: int) -> int:
    """Longest context (<= the model's maximum) for the workload's batch that fits; 0 if none."""
    def fits(tokens: int) -> bool:
        return peak_bytes(stage_memory(place, layout, replace(place.work, context=tokens))) <= budget_bytes
    return max(_largest(fits, 1, place.cfg.max_position_embeddings), 0)


def max_sequences(place: Placement, layout: Layout, budget_bytes: int, cap: int = 1 << 20) -> int:
    """Most concurrent sequences of the workload's context that fit; 0 if none."""
    def fits(batch: int) -> bool:
        return peak_bytes(stage_memory(place, layout, replace(place.work, batch=batch))) <= budget_bytes
    return max(_largest(fits, 1, cap), 0)


# ---- decode speed bound --------------------------------------------------------------------------
DEFAULT_HOST_BANDWIDTH_GBS = 100.0  # host RAM read bandwidth for offloaded experts (dual-channel DDR5 ~ 80-100)


@dataclass(frozen=True)
class DecodeBound:
    per_sequence: float  # tokens/s one sequence can reach
    total: float  # tokens/s over the whole batch
    bytes_per_step: int  # bytes the slowest path reads per decode step (summed over stages)

    def to_dict(self) -> dict:
        return {"per_sequence_tok_s": self.per_sequence, "total_tok_s": self.total,
                "bytes_read_per_step": self.bytes_per_step}


def decode_bound(place: Placement, layout: Layout, bandwidth_gbs: float,
                 host_bandwidth_gbs: float = DEFAULT_HOST_BANDWIDTH_GBS) -> DecodeBound:
    """Memory-bandwidth ceiling on decode: each step every GPU reads its active weights and its KV cache.

    Stages run one after another for a token, so their times add; GPUs inside a stage read in parallel.
    Offloaded experts are read from host RAM at ``host_bandwidth_gbs``. Kernels never reach peak
    bandwidth, hence an upper bound.
    """
    seconds, total_bytes = 0.0, 0
    for w, st in zip(place.stage_weights(layout), stage_memory(place, layout)):
        gpu_bytes = w.active_gpu + st.kv_cache
        # all GPUs of a stage share one host, so its offloaded experts are read stage_gpus times over
        host_bytes = w.active_host * layout.stage_gpus
        seconds += gpu_bytes / (bandwidth_gbs * 1e9) + host_bytes / (host_bandwidth_gbs * 1e9)
        total_bytes += gpu_bytes + host_bytes
    per_seq = 1 / seconds
    return DecodeBound(per_seq, per_seq * place.work.batch, total_bytes)
