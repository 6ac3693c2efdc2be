"""Memory arithmetic for the GPU requirements planner: bytes per tensor class from config shapes.

Owns: the per-tensor inventory of an ERNIE 4.5 checkpoint (names and ``[out, in]`` shapes of spec
section 3), the stored byte formats of every weight scheme, and the whole-model byte counts that follow
from them: weights per component, KV cache, prefill activations and the runtime-overhead range.
How those bytes land on several GPUs lives in :mod:`ernie45.plan_parallel`; the report the CLI and the
web page print in :mod:`ernie45.plan_report`.

Choices made here (each is a documented assumption, not a measurement):

* Every number is an exact integer count of bytes derived from the shapes; no rounding to MiB.
* Quantized linears store a packed payload plus one scale (and one zero point when asymmetric) per
  block, as in :data:`FORMATS`. Embeddings, the head and norms keep the model dtype; the router and its
  correction bias stay fp32 under every scheme (spec section 6: nothing quantizes them).
* A tied head is the embedding table and is counted once, as ``embed``.
* MTP weights (spec section 5) count only when the caller says they are loaded.

Shape legend: H hidden, I dense FFN width, Im expert width, E experts, k experts per token, V vocab.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .config import ModelConfig

GiB = 1 << 30


# ---- stored byte formats --------------------------------------------------------------------------
@dataclass(frozen=True)
class WeightFormat:
    """How one ``[rows=out, cols=in]`` weight is stored.

    The payload is ``bits`` per weight, packed per row. Scales (and zero points for asymmetric
    formats) cover blocks of ``block_rows x block_cols`` weights; ``block_cols=None`` means the whole
    row, i.e. one scale per output channel. Partial blocks at an edge still carry a full scale.
    """

    name: str
    bits: int
    block_rows: int = 1
    block_cols: int | None = None
    scale_bytes: int = 0
    zero_bytes: int = 0

    def nbytes(self, rows: int, cols: int) -> int:
        payload = rows * math.ceil(cols * self.bits / 8)
        if not (self.scale_bytes or self.zero_bytes):
            return payload
        return payload + self.num_blocks(rows, cols) * (self.scale_bytes + self.zero_bytes)

    def num_blocks(self, rows: int, cols: int) -> int:
        return math.ceil(rows / self.block_rows) * math.ceil(cols / self.group_cols(cols))

    def group_cols(self, cols: int) -> int:
        """Columns per scale. Row groups (int4/int2) that do not divide ``cols`` fall back, as the quantizer
        does, to the largest divisor below them that is a whole number of packed bytes."""
        if self.block_cols is None:
            return cols
        if self.block_rows != 1 or cols % self.block_cols == 0:
            return self.block_cols  # fp8 blocks: a partial edge block still has a scale
        per_byte = 8 // self.bits
        return next((g for g in range(min(self.block_cols, cols), 0, -1) if cols % g == 0 and g % per_byte == 0),
                    self.block_cols)


# The formats the quantizer writes (kept here, in one place, so both sides agree).
FORMATS: dict[str, WeightFormat] = {
    "fp32": WeightFormat("fp32", 32),
    "bf16": WeightFormat("bf16", 16),
    "fp16": WeightFormat("fp16", 16),
    # e4m3 payload, one fp32 scale per 128x128 block (weights and scales as DeepSeek-V3-style FP8).
    "fp8": WeightFormat("fp8", 8, block_rows=128, block_cols=128, scale_bytes=4),
    # symmetric, one bf16 scale per output row
    "int8": WeightFormat("int8", 8, block_rows=1, block_cols=None, scale_bytes=2),
    # asymmetric, groups along the input dim: bf16 scale + bf16 zero per group
    "int4": WeightFormat("int4", 4, block_rows=1, block_cols=128, scale_bytes=2, zero_bytes=2),
    "int2": WeightFormat("int2", 2, block_rows=1, block_cols=64, scale_bytes=2, zero_bytes=2),
}
SCHEMES = ("bf16", "fp16", "fp8", "int8", "int4", "int2", "mixed-2bit")
KV_DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp8": 1, "int8": 1}
# Baidu's 300B 2-bit release keeps the MoE experts of layers 0-6 at 4 bits; layers 0-2 are dense, so
# that is the first 4 MoE layers (spec section 6, FastDeploy wint2 config).
MIXED_2BIT_INT4_MOE_LAYERS = 4

COMPONENTS = ("embed", "attention", "dense_mlp", "experts", "shared_experts", "router", "norms",
              "lm_head", "mtp")


# ---- the tensor inventory -------------------------------------------------------------------------
@dataclass(frozen=True)
class Tensor:
    """One checkpoint tensor (or ``count`` identical ones, e.g. 64 experts' ``gate_proj``).

    ``role`` decides the precision (``linear`` follows the scheme; ``embedding``/``norm`` keep the model
    dtype; ``fp32`` is the router and its bias). ``split`` says how tensor parallelism cuts it:
    ``col`` (output rows), ``row`` (input columns), ``kv`` (output rows by KV head, replicated once TP
    exceeds the KV heads), ``vocab`` (embedding/head rows) or ``rep`` (every GPU holds all of it).
    ``stage`` is ``first`` (embedding), ``layer`` (decoder layer ``layer``) or ``last`` (final norm,
    head, MTP). ``moe_index`` is the ordinal of the MoE layer for routed experts, else None.
    """

    name: str
    component: str
    role: str
    rows: int
    cols: int
    split: str
    stage: str
    layer: int = -1
    count: int = 1
    moe_index: int | None = None

    @property
    def numel(self) -> int:
        return self.rows * self.cols * self.count


def _attention(prefix: str, cfg: ModelConfig, component: str, stage: str, layer: int) -> list[Tensor]:
    h, q, kv = cfg.hidden_size, cfg.q_dim, cfg.kv_dim
    t = dict(component=component, role="linear", stage=stage, layer=layer)
    return [Tensor(f"{prefix}.self_attn.q_proj.weight", rows=q, cols=h, split="col", **t),
            Tensor(f"{prefix}.self_attn.k_proj.weight", rows=kv, cols=h, split="kv", **t),
            Tensor(f"{prefix}.self_attn.v_proj.weight", rows=kv, cols=h, split="kv", **t),
            Tensor(f"{prefix}.self_attn.o_proj.weight", rows=h, cols=q, split="row", **t)]


def _mlp(prefix: str, hidden: int, width: int, component: str, stage: str, layer: int,
         count: int = 1, moe_index: int | None = None) -> list[Tensor]:
    t = dict(component=component, role="linear", stage=stage, layer=layer, count=count, moe_index=moe_index)
    return [Tensor(f"{prefix}.gate_proj.weight", rows=width, cols=hidden, split="col", **t),
            Tensor(f"{prefix}.up_proj.weight", rows=width, cols=hidden, split="col", **t),
            Tensor(f"{prefix}.down_proj.weight", rows=hidden, cols=width, split="row", **t)]


def _norms(names: list[str], cfg: ModelConfig, component: str, stage: str, layer: int = -1) -> list[Tensor]:
    return [Tensor(n, component, "norm", 1, cfg.hidden_size, "rep", stage, layer) for n in names]


def _decoder_layer(cfg: ModelConfig, i: int, moe_index: int | None) -> list[Tensor]:
    p, h = f"model.layers.{i}", cfg.hidden_size
    out = _norms([f"{p}.input_layernorm.weight", f"{p}.post_attention_layernorm.weight"], cfg, "norms", "layer", i)
    out += _attention(p, cfg, "attention", "layer", i)
    if moe_index is None:
        return out + _mlp(f"{p}.mlp", h, cfg.intermediate_size, "dense_mlp", "layer", i)
    e = cfg.moe_num_experts
    out += [Tensor(f"{p}.mlp.gate.weight", "router", "fp32", e, h, "rep", "layer", i),
            Tensor(f"{p}.mlp.moe_statics.e_score_correction_bias", "router", "fp32", 1, e, "rep", "layer", i)]
    out += _mlp(f"{p}.mlp.experts.*", h, cfg.moe_intermediate_size, "experts", "layer", i, e, moe_index)
    if cfg.moe_num_shared_experts:
        out += _mlp(f"{p}.mlp.shared_experts", h, cfg.shared_intermediate_size, "shared_experts", "layer", i)
    return out


def _mtp_block(cfg: ModelConfig) -> list[Tensor]:
    """Spec section 5: two norms, a 2H->H projection and one dense decoder layer, all ``mtp``."""
    h, p = cfg.hidden_size, "model.mtp_block.0"
    out = _norms(["model.mtp_emb_norm.0.weight", "model.mtp_hidden_norm.0.weight",
                  f"{p}.input_layernorm.weight", f"{p}.post_attention_layernorm.weight"], cfg, "mtp", "last")
    # Replicated: engines keep this small projection whole on every GPU (vLLM builds it as nn.Linear).
    out.append(Tensor("model.mtp_linear_proj.0.weight", "mtp", "linear", h, 2 * h, "rep", "last"))
    out += _attention(p, cfg, "mtp", "last", -1)
    return out + _mlp(f"{p}.mlp", h, cfg.intermediate_size, "mtp", "last", -1)


def tensors(cfg: ModelConfig, *, mtp: bool = False) -> list[Tensor]:
    """Every weight of the checkpoint as :class:`Tensor` rows, in file order (MTP only when ``mtp``)."""
    v, h = cfg.vocab_size, cfg.hidden_size
    out = [Tensor("model.embed_tokens.weight", "embed", "embedding", v, h, "vocab", "first")]
    moe_index = 0
    for i in range(cfg.num_hidden_layers):
        out += _decoder_layer(cfg, i, moe_index if cfg.is_moe_layer(i) else None)
        moe_index += cfg.is_moe_layer(i)
    out += _norms(["model.norm.weight"], cfg, "norms", "last")
    if not cfg.tie_word_embeddings:
        out.append(Tensor("lm_head.weight", "lm_head", "embedding", v, h, "vocab", "last"))
    if mtp and cfg.num_nextn_predict_layers:
        out += _mtp_block(cfg)
    return out


# ---- precision per tensor -------------------------------------------------------------------------
def check_scheme(scheme: str) -> None:
    if scheme not in SCHEMES:
        raise ValueError(f"unknown weight scheme {scheme!r}; choose one of {', '.join(SCHEMES)}")


def tensor_format(t: Tensor, scheme: str, int4_moe_layers: int = MIXED_2BIT_INT4_MOE_LAYERS) -> WeightFormat:
    """The stored format of ``t`` under ``scheme`` (the mixed recipe decides per component and layer)."""
    if t.role == "fp32":
        return FORMATS["fp32"]
    if t.role != "linear":
        return FORMATS["fp16" if scheme == "fp16" else "bf16"]
    if scheme != "mixed-2bit":
        return FORMATS[scheme]
    if t.component == "experts":
        return FORMATS["int4" if t.moe_index is not None and t.moe_index < int4_moe_layers else "int2"]
    return FORMATS["int8"]  # attention, dense FFN, shared experts and the MTP block


def tensor_bytes(t: Tensor, scheme: str, int4_moe_layers: int = MIXED_2BIT_INT4_MOE_LAYERS) -> int:
    return t.count * tensor_format(t, scheme, int4_moe_layers).nbytes(t.rows, t.cols)


# ---- whole-model counts ---------------------------------------------------------------------------
def _by_component(items) -> dict[str, int]:
    out = {c: 0 for c in COMPONENTS}
    for component, n in items:
        out[component] += n
    return {c: n for c, n in out.items() if n}


def param_counts(cfg: ModelConfig) -> dict[str, int]:
    """``total`` (trunk without MTP), ``active`` per token and ``mtp`` parameter counts.

    Active excludes the input-embedding lookup (one row) but counts the head; for a tied model the head
    *is* the table, so it counts once. Routed experts contribute ``k/E`` of their parameters.
    """
    trunk = tensors(cfg)
    total = sum(t.numel for t in trunk)
    active = sum(_active_share(t, cfg, t.numel) for t in trunk)
    mtp = sum(t.numel for t in tensors(cfg, mtp=True)) - total
    return {"total": total, "active": active, "mtp": mtp}


def _active_share(t: Tensor, cfg: ModelConfig, n: int) -> int:
    """How much of ``n`` (params or bytes of ``t``) one decoded token reads."""
    if t.component == "embed" and not cfg.tie_word_embeddings:
        return 0
    if t.component == "experts":
        return n // t.count * cfg.moe_k
    return n


def weight_bytes(cfg: ModelConfig, scheme: str, *, mtp: bool = False,
                 int4_moe_layers: int = MIXED_2BIT_INT4_MOE_LAYERS) -> dict[str, int]:
    """Bytes of the stored weights per component (see :data:`COMPONENTS`) under ``scheme``.

    This is the function a quantizer calls to predict its output size; payload, scales and zero points
    are all included. Components the model does not have are left out.
    """
    check_scheme(scheme)
    return _by_component((t.component, tensor_bytes(t, scheme, int4_moe_layers)) for t in tensors(cfg, mtp=mtp))


def active_weight_bytes(cfg: ModelConfig, scheme: str, *, int4_moe_layers: int = MIXED_2BIT_INT4_MOE_LAYERS,
                        mtp: bool = False) -> int:
    """Weight bytes read to decode one token with batch 1 (the trunk; MTP adds its block when loaded)."""
    check_scheme(scheme)
    return sum(_active_share(t, cfg, tensor_bytes(t, scheme, int4_moe_layers)) for t in tensors(cfg, mtp=mtp))


def kv_bytes_per_token(cfg: ModelConfig, kv_dtype: str = "bf16", *, mtp: bool = False) -> int:
    """``2 x layers x kv_heads x head_dim x bytes``; the MTP block keeps its own cache when loaded."""
    if kv_dtype not in KV_DTYPE_BYTES:
        raise ValueError(f"unknown KV dtype {kv_dtype!r}; choose one of {', '.join(KV_DTYPE_BYTES)}")
    layers = cfg.num_hidden_layers + (1 if mtp and cfg.num_nextn_predict_layers else 0)
    return 2 * layers * cfg.kv_dim * KV_DTYPE_BYTES[kv_dtype]


def kv_cache_bytes(cfg: ModelConfig, tokens: int, batch: int = 1, kv_dtype: str = "bf16", *,
                   mtp: bool = False) -> int:
    """KV cache for ``batch`` sequences of ``tokens`` each (no paging slack; int8 static scales ~KiB, left out)."""
    return kv_bytes_per_token(cfg, kv_dtype, mtp=mtp) * tokens * batch


# ---- activations and overhead ---------------------------------------------------------------------
ACT_BYTES = 2  # activations are bf16
HIDDEN_BUFFERS = 4  # residual stream, normed input, block output, all-reduce/staging buffer
LOGIT_BYTES = 4  # logits are upcast to fp32 for sampling
DEFAULT_PREFILL_CHUNK = 8192  # tokens per prefill step (vLLM's default chunked-prefill budget)


@dataclass(frozen=True)
class Shards:
    """How one GPU's share of the per-token work is cut (all 1 on a single GPU).

    ``tp`` splits attention heads and dense FFN width; ``kv_heads`` is the number of KV heads the GPU
    holds; ``experts`` is how many ways the routed-expert work is split (TP x EP of the stage).
    """

    tp: int = 1
    kv_heads: int = 0
    experts: int = 1


def activation_bytes(cfg: ModelConfig, chunk: int, *, shards: Shards | None = None, logit_rows: int = 0) -> int:
    """Peak transient activations of one forward over a ``chunk``-token prefill step, on one GPU.

    Inference keeps no per-layer activations, so the peak is the hidden-state buffers plus the larger of
    the attention step (q, k, v, attention output; flash attention, no ``T x T`` scores) and the FFN step
    (gate, up and their product; MoE adds the permuted token copies and the fp32 router logits and
    probabilities, and assumes balanced routing over the expert shards). ``logit_rows`` rows of fp32
    logits are added on the GPU that holds the head (one per sequence being sampled).
    """
    a, sh = ACT_BYTES, shards or Shards()
    kv_heads = sh.kv_heads or cfg.num_key_value_heads
    hidden = HIDDEN_BUFFERS * chunk * cfg.hidden_size * a
    attention = chunk * (2 * cfg.q_dim // sh.tp + 2 * kv_heads * cfg.head_dim) * a
    ffn = chunk * 3 * cfg.intermediate_size // sh.tp * a
    if cfg.is_moe:
        pairs = chunk * cfg.moe_k
        routed = pairs * (3 * cfg.moe_intermediate_size + cfg.hidden_size) * a // sh.experts
        shared = chunk * 3 * cfg.shared_intermediate_size // sh.experts * a  # split over all G GPUs
        router = 2 * chunk * cfg.moe_num_experts * 4
        ffn = max(ffn, routed + shared + router)
    return hidden + max(attention, ffn) + logit_rows * cfg.vocab_size * LOGIT_BYTES


# Runtime overhead per GPU as a range: CUDA context and library workspaces at least; CUDA graphs, NCCL
# buffers and allocator caching at most, plus fragmentation of the growing pools (KV, activations).
# Weights get no fragmentation share: they are allocated once, in large blocks, before anything else.
# This is memory the process itself allocates; it is planned *inside* each GPU's budget, which is
# smaller than the card (``gpu_memory_utilization``, ``ernie45.plan_gpus``) for headroom the planner
# cannot see (other processes, fragmentation the caching allocator cannot return, profiling error).
OVERHEAD_LOW = GiB * 3 // 4
OVERHEAD_HIGH = GiB * 3
FRAGMENTATION_HIGH = 0.05


def overhead_bytes(dynamic_bytes: int) -> tuple[int, int]:
    """(low, high) runtime overhead on one GPU; ``dynamic_bytes`` = its KV cache + activations."""
    return OVERHEAD_LOW, OVERHEAD_HIGH + int(FRAGMENTATION_HIGH * dynamic_bytes)
