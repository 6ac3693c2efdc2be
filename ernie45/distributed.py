"""Tensor and expert parallelism applied to a plain model from a declarative plan (torch.distributed).

The model never knows it is sharded. `ParallelPlan.prepare` rewrites the meta-built model in place:
- attention heads split over the TP group (q/k/v column slices, o_proj row slice); when TP exceeds the
  KV heads, each KV head is replicated on TP/Nkv ranks;
- dense MLPs (and the MTP block's) and the shared experts split column/row over the TP group;
- routed experts: each EP rank owns a contiguous range of E/EP experts, each expert's width split over TP;
- the shared experts' width split over all TP x EP ranks;
- the embedding table and the head split by vocabulary rows over the TP group (ceil(V/TP) rows each):
  a lookup is masked and all-reduced, the head's logits all-gathered;
- quantized weights (QuantLinear, QuantExperts) split the same ways: their stored qweight/scales/zeros are
  sliced, never re-quantized (`quant/shard.py`); a cut that would split a quantization group or fp8
  block is refused with the weight, its width and the group named;
- one all-reduce per block, added as a forward hook: attention and dense MLP over the TP group, an MoE
  block over the world (partials of every routed (expert, width-slice) owner and of the shared experts).
Activations are replicated on every rank (all ranks run the same tokens), so "tokens reach their
experts and come back" is the world all-reduce. The router and the norms are replicated.
`source_slice` tells the loader which rows/columns of each checkpoint tensor this rank reads.

Ranks are laid out ep-major: rank = ep_rank * tp + tp_rank.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from .config import ModelConfig
from .layers import MLP
from .model import Ernie45ForCausalLM
from .moe import Experts, SparseMoeBlock
from .quant.modules import QuantExperts, QuantWeight
from .quant.shard import resize, split_problem


class DistributedError(RuntimeError):
    """A collective or rendezvous failed: a peer died, or did not arrive in time."""


def check_plan(cfg: ModelConfig, tp: int, ep: int) -> None:
    """Raise ValueError naming each divisibility the shapes do not allow for this TP x EP.

    A quantized checkpoint's group/block divisibility depends on each weight's recorded format and group,
    so `ParallelPlan.prepare` checks it while it cuts the weights (and names every one that does not fit).
    """
    errors = []
    nq, nkv = cfg.num_attention_heads, cfg.num_key_value_heads
    if tp < 1 or ep < 1:
        errors.append(f"tp={tp} and ep={ep} must be >= 1")
    elif nq % tp:
        errors.append(f"attention heads {nq} are not divisible by tp={tp}")
    elif nkv % tp and tp % nkv:
        errors.append(f"KV heads {nkv} and tp={tp}: one must divide the other to split or replicate KV heads")
    if tp >= 1 and cfg.intermediate_size % tp:
        errors.append(f"dense MLP width {cfg.intermediate_size} is not divisible by tp={tp}")
    if cfg.is_moe and tp >= 1 and ep >= 1 and cfg.shared_intermediate_size % (tp * ep):
        errors.append(f"shared-expert width {cfg.shared_intermediate_size} is not divisible by tp x ep = {tp * ep}")
    if cfg.is_moe and tp >= 1 and ep >= 1:
        if cfg.moe_num_experts % ep:
            errors.append(f"{cfg.moe_num_experts} experts cannot be split evenly over ep={ep} ranks")
        if cfg.moe_intermediate_size % tp:
            errors.append(f"expert width {cfg.moe_intermediate_size} is not divisible by tp={tp}")
    elif ep > 1:
        errors.append(f"ep={ep} needs an MoE model; {cfg.model_type} has no experts")
    if errors:
        raise ValueError("this tensor/expert-parallel plan does not fit the model: " + "; ".join(errors))


@dataclass
class ParallelPlan:
    """TP x EP layout of one rank; `groups` are torch.distributed process groups (None in a single process)."""

    tp: int = 1
    ep: int = 1
    rank: int = 0
    tp_group: object = None
    world_group: object = None
    _slices: dict[str, tuple[int, int, int]] = field(default_factory=dict, repr=False)
    _problems: list[str] = field(default_factory=list, repr=False)  # quantization groups a cut would split

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp

    @property
    def ep_rank(self) -> int:
        return self.rank // self.tp

    # ---- LoadTransform ----------------------------------------------------------------------------
    def source_slice(self, native: str) -> tuple[int, int, int] | None:
        return self._slices.get(native)

    def prepare(self, model: Ernie45ForCausalLM) -> None:
        cfg = model.config
        check_plan(cfg, self.tp, self.ep)
        self._slices, self._problems = {}, []  # a plan may load several checkpoints
        self._shard_vocab(model, cfg)
        for prefix, layer in _decoder_layers(model):
            self._shard_attention(f"{prefix}.self_attn", layer.self_attn, cfg)
            if isinstance(layer.mlp, SparseMoeBlock):
                self._shard_moe(f"{prefix}.mlp", layer.mlp, cfg)
            else:
                self._shard_mlp(f"{prefix}.mlp", layer.mlp)
                self._all_reduce_after(layer.mlp, self.tp_group)
        if self._problems:
            raise ValueError("this tensor/expert-parallel plan does not fit the quantized checkpoint (each rank "
                             "must hold whole quantization groups/blocks as stored, since they are never "
                             "re-quantized; use fewer ways): " + "; ".join(self._problems))
        nkv = max(cfg.num_key_value_heads // self.tp, 1)
        model.config = cfg.replace(num_attention_heads=cfg.num_attention_heads // self.tp, num_key_value_heads=nkv)

    # ---- module rewrites (meta device) ------------------------------------------------------------
    def _split(self, name: str, module: nn.Module, leaf: str, dim: int, start: int, stop: int) -> None:
        old = getattr(module, leaf)
        shape = list(old.shape)
        shape[dim] = stop - start
        setattr(module, leaf, nn.Parameter(torch.empty(shape, dtype=old.dtype, device="meta"), requires_grad=False))
        self._slices[f"{name}.{leaf}"] = (dim - (1 if old.dim() == 3 else 0), start, stop)

    def _split_linear(self, name: str, linear: nn.Module, dim: int, start: int, stop: int,
                      ways: int | None = None) -> None:
        """Output rows (dim 0) or input columns (dim 1) [start, stop) of an nn.Linear or a QuantLinear."""
        if isinstance(linear, QuantWeight):
            self._split_quant(name, linear, dim, start, stop, ways)
        else:
            self._split(name, linear, "weight", dim, start, stop)

    def _split_quant(self, name: str, q: QuantWeight, dim: int, start: int, stop: int, ways: int | None = None,
                     experts: int | None = None) -> None:
        ways = ways or self.tp
        problem = split_problem(q, name, dim, start, stop, ways, "tp" if ways == self.tp else "tp x ep")
        if problem:
            self._problems.append(problem)
            return
        for leaf, cut in resize(q, dim, start, stop, experts).items():
            self._slices[f"{name}.{leaf}"] = cut

    def _part(self, total: int, ways: int | None = None, rank: int | None = None) -> tuple[int, int]:
        ways, rank = ways or self.tp, self.tp_rank if rank is None else rank
        size = total // ways
        return rank * size, (rank + 1) * size

    def _shard_vocab(self, model: Ernie45ForCausalLM, cfg: ModelConfig) -> None:
        if self.tp == 1:
            return
        rows = -(-cfg.vocab_size // self.tp)  # ceil: the last rank may hold fewer real rows
        start, stop = min(self.tp_rank * rows, cfg.vocab_size), min((self.tp_rank + 1) * rows, cfg.vocab_size)
        embed = model.model.embed_tokens = VocabParallelEmbedding(start, stop, model.model.embed_tokens, self.tp_group)
        self._split("model.embed_tokens", embed, "weight", 0, start, stop)
        if model.lm_head is not None:
            self._split("lm_head", model.lm_head, "weight", 0, start, stop)
        model.project = lambda x: _gather_vocab(torch.nn.functional.linear(x, model.head_weight()), rows,
                                               cfg.vocab_size, self.tp_group)

    def _shard_attention(self, name: str, attn: nn.Module, cfg: ModelConfig) -> None:
        dh, nq, nkv = cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
        q0, q1 = self._part(nq * dh)
        kv_local = max(nkv // self.tp, 1)
        kv0 = (self.tp_rank * nkv // self.tp) * dh
        self._split_linear(f"{name}.q_proj", attn.q_proj, 0, q0, q1)
        self._split_linear(f"{name}.k_proj", attn.k_proj, 0, kv0, kv0 + kv_local * dh)
        self._split_linear(f"{name}.v_proj", attn.v_proj, 0, kv0, kv0 + kv_local * dh)
        self._split_linear(f"{name}.o_proj", attn.o_proj, 1, q0, q1)
        attn.n_heads, attn.n_kv = nq // self.tp, kv_local
        self._all_reduce_after(attn.o_proj, self.tp_group)

    def _shard_mlp(self, name: str, mlp: MLP, ways: int | None = None, rank: int | None = None) -> None:
        a, b = self._part(mlp.gate_proj.out_features, ways, rank)
        self._split_linear(f"{name}.gate_proj", mlp.gate_proj, 0, a, b, ways)
        self._split_linear(f"{name}.up_proj", mlp.up_proj, 0, a, b, ways)
        self._split_linear(f"{name}.down_proj", mlp.down_proj, 1, a, b, ways)

    def _shard_moe(self, name: str, block: SparseMoeBlock, cfg: ModelConfig) -> None:
        n_local = cfg.moe_num_experts // self.ep
        a, b = self._part(cfg.moe_intermediate_size)
        if isinstance(block.experts, QuantExperts):
            old = block.experts
            for proj, dim in (("gate_proj", 0), ("up_proj", 0), ("down_proj", 1)):
                self._split_quant(f"{name}.experts.{proj}", getattr(old, proj), dim, a, b, experts=n_local)
            block.experts = LocalQuantExperts(old.gate_proj, old.up_proj, old.down_proj, old.act,
                                              self.ep_rank * n_local)
        else:
            dtype = block.experts.gate_proj.dtype
            with torch.device("meta"):
                block.experts = LocalExperts(cfg.replace(moe_num_experts=n_local), self.ep_rank * n_local).to(dtype)
            for leaf, dim in (("gate_proj", 1), ("up_proj", 1), ("down_proj", 2)):
                self._split(f"{name}.experts", block.experts, leaf, dim, a, b)
        if block.shared_experts is not None:
            self._shard_mlp(f"{name}.shared_experts", block.shared_experts, ways=self.tp * self.ep, rank=self.rank)
        self._all_reduce_after(block, self.world_group)

    def _all_reduce_after(self, module: nn.Module, group) -> None:
        if group is not None and dist.get_world_size(group) > 1:
            module.register_forward_hook(lambda _m, _i, out: all_reduce(out, group))


class LocalExperts(Experts):
    """The routed experts one EP rank owns: global ids [first_expert, first_expert + E_local)."""

    def __init__(self, cfg_local: ModelConfig, first_expert: int):
        super().__init__(cfg_local)
        self.first_expert = first_expert

    def forward(self, x: torch.Tensor, w: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """x [T,D], w [T,K], idx [T,K] global ids -> this rank's partial sum [T,D]"""
        return local_grouped(self, self.gate_proj.shape[0], x, w, idx)


class LocalQuantExperts(QuantExperts):
    """The quantized routed experts one EP rank owns (stacked QuantWeights already cut to E_local)."""

    def forward(self, x: torch.Tensor, w: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """x [T,D], w [T,K], idx [T,K] global ids -> this rank's partial sum [T,D]"""
        return local_grouped(self, self.num_experts, x, w, idx)


def local_grouped(experts: nn.Module, n_local: int, x: torch.Tensor, w: torch.Tensor,
                  idx: torch.Tensor) -> torch.Tensor:
    """Run the (token, expert) pairs whose global expert id is in [first_expert, first_expert + n_local)."""
    local = (idx - experts.first_expert).flatten()  # [T*K]
    mine = (local >= 0) & (local < n_local)
    token = torch.arange(x.shape[0], device=x.device).repeat_interleave(idx.shape[1])
    return experts.grouped(x, token[mine], local[mine], w.flatten()[mine])


class VocabParallelEmbedding(nn.Embedding):
    """Rows [start, stop) of the table; other ids look up zeros here and arrive by the TP all-reduce."""

    def __init__(self, start: int, stop: int, full: nn.Embedding, group):
        nn.Module.__init__(self)
        self.weight, self.start, self.stop, self.group = full.weight, start, stop, group
        self.padding_idx, self.max_norm, self.sparse = None, None, False

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # [B,T] -> [B,T,D]
        mine = (ids >= self.start) & (ids < self.stop)
        out = nn.functional.embedding(torch.where(mine, ids - self.start, 0), self.weight)
        return all_reduce(out.masked_fill(~mine[..., None], 0), self.group)


def _gather_vocab(local: torch.Tensor, rows: int, vocab: int, group) -> torch.Tensor:
    """Local logits [B,T,<=rows] of each TP rank -> full logits [B,T,V] on every rank."""
    pad = rows - local.shape[-1]
    local = torch.nn.functional.pad(local, (0, pad)).contiguous() if pad else local.contiguous()
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    try:
        dist.all_gather(parts, local, group=group)
    except Exception as e:
        raise DistributedError(f"rank {dist.get_rank()}: all_gather of logits failed ({e}). Another rank probably "
                               "died or timed out; see its log. Ending this rank too.") from e
    return torch.cat(parts, dim=-1)[..., :vocab]


def _decoder_layers(model: Ernie45ForCausalLM):
    for i, layer in enumerate(model.model.layers):
        yield f"model.layers.{i}", layer
    for i, layer in enumerate(model.model.mtp_block):
        yield f"model.mtp_block.{i}", layer


def all_reduce(t: torch.Tensor, group) -> torch.Tensor:
    try:
        dist.all_reduce(t, group=group)
    except Exception as e:  # gloo/NCCL raise assorted types when a peer vanishes
        raise DistributedError(f"rank {dist.get_rank()}: all_reduce failed ({e}). Another rank probably died or "
                               "timed out; see its log. Ending this rank too.") from e
    return t


def init_parallel(tp: int, ep: int, timeout_s: float = 300.0) -> ParallelPlan:
    """Join the torchrun job (env:// rendezvous) and build this rank's plan; gloo on CPU, NCCL on CUDA."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world != tp * ep:
        raise ValueError(f"launched with {world} process(es) but --tp {tp} x --ep {ep} = {tp * ep}; start it with "
                         f"`torchrun --nproc-per-node {tp * ep} -m ernie45 ...` (or fix --tp/--ep)")
    if world == 1:
        return ParallelPlan()
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    try:
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    except Exception as e:
        raise DistributedError(f"rendezvous at {os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')} "
                               f"failed or timed out after {timeout_s:g} s waiting for {world} processes ({e})") from e
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    rank = dist.get_rank()
    tp_groups = [dist.new_group(list(range(e * tp, (e + 1) * tp))) for e in range(ep)]
    return ParallelPlan(tp, ep, rank, tp_groups[rank // tp], dist.group.WORLD)


def shutdown(code: int = 0) -> None:
    """Leave the job: wait for every rank, tear the process groups down, and exit with `code` at once.

    Python's own teardown may destroy gloo's process-group objects (still referenced by the sharded
    model's hooks) while their threads run, which aborts the process ("terminate called without an
    active exception") and makes torchrun report a failure after the work succeeded; so the process
    ends with os._exit once output is flushed.
    """
    try:
        if dist.is_initialized():
            try:
                dist.barrier()
            finally:
                dist.destroy_process_group()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def report_failure(e: BaseException) -> int:
    """Say why this rank stops, then exit 1 at once (see `shutdown` for why not a normal return)."""
    rank = os.environ.get("RANK", "0")
    print(f"ernie45: rank {rank}: distributed job failed: {e}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(1)
