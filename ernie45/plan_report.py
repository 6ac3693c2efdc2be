"""The planner's answer to one question, as a JSON-ready dict (what ``ernie45 plan --json`` and the web
page's ``/api/plan`` return).

Owns: :class:`PlanRequest` (the inputs of the CLI and the page), choosing the layout (explicit
``tp``/``ep``/``pp``; the best layout for ``num_gpus``; the fewest GPUs of the named kind; one GPU),
the fit verdict and the per-GPU-kind recommendations. The arithmetic itself is in :mod:`ernie45.plan`
and :mod:`ernie45.plan_parallel`.

Fit verdict, against each GPU's budget (``usable_bytes x gpu_memory_utilization``, default 0.9 as vLLM;
see :mod:`ernie45.plan_gpus`): ``yes`` when the high overhead estimate fits, ``tight`` when only the low
one does, ``no`` otherwise, ``invalid`` when the layout cannot run (the reasons are in ``layout_errors``).
The fewest GPUs, the maximum context and the maximum sequences are searched against the same budget.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .config import ModelConfig, resolve_config
from .plan import (DEFAULT_PREFILL_CHUNK, KV_DTYPE_BYTES, MIXED_2BIT_INT4_MOE_LAYERS, SCHEMES, Shards,
                   activation_bytes, active_weight_bytes, kv_bytes_per_token, overhead_bytes, param_counts,
                   weight_bytes)
from .plan_gpus import DEFAULT_GPU_MEMORY_UTILIZATION, Gpu, catalogue, check_utilization, find_gpu
from .plan_parallel import (DEFAULT_HOST_BANDWIDTH_GBS, Layout, Placement, Workload, best_layout, decode_bound,
                            max_context, max_sequences, min_gpus, peak_bytes, stage_memory)

MAX_GPUS = 64  # the searches stop here


@dataclass(frozen=True)
class PlanRequest:
    model: str
    quant: str = "bf16"
    context: int = 4096
    batch: int = 1
    kv_dtype: str = "bf16"
    gpu: str | None = None
    num_gpus: int | None = None
    tp: int | None = None
    ep: int | None = None
    pp: int | None = None
    offload_experts: bool = False
    mtp: bool = False
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK
    int4_moe_layers: int = MIXED_2BIT_INT4_MOE_LAYERS
    gpu_memory_utilization: float = DEFAULT_GPU_MEMORY_UTILIZATION
    host_bandwidth_gbs: float = DEFAULT_HOST_BANDWIDTH_GBS
    recommendations: bool = True

    def check(self) -> None:
        """Raise ValueError naming the first bad input (the web page turns it into HTTP 400)."""
        if self.quant not in SCHEMES:
            raise ValueError(f"quant {self.quant!r} is not one of {', '.join(SCHEMES)}")
        if self.kv_dtype not in KV_DTYPE_BYTES:
            raise ValueError(f"kv_dtype {self.kv_dtype!r} is not one of {', '.join(KV_DTYPE_BYTES)}")
        for name in ("context", "batch", "prefill_chunk"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1 (got {getattr(self, name)})")
        for name in ("num_gpus", "tp", "ep", "pp"):
            value = getattr(self, name)
            if value is not None and not 1 <= value <= 4096:
                raise ValueError(f"{name} must be between 1 and 4096 (got {value})")
        check_utilization(self.gpu_memory_utilization)
        if self.int4_moe_layers < 0 or self.host_bandwidth_gbs <= 0:
            raise ValueError("int4_moe_layers must be >= 0 and host_bandwidth_gbs > 0")

    def workload(self) -> Workload:
        return Workload(scheme=self.quant, context=self.context, batch=self.batch, kv_dtype=self.kv_dtype,
                        mtp=self.mtp, offload_experts=self.offload_experts, prefill_chunk=self.prefill_chunk,
                        int4_moe_layers=self.int4_moe_layers)


def explicit_layout(req: PlanRequest) -> Layout | None:
    """The layout the request spells out with tp/ep/pp (num_gpus fills a missing tp: num_gpus / (ep x pp)); None if it does not."""
    if req.tp is None and req.ep is None and req.pp is None:
        return None
    pp, ep = req.pp or 1, req.ep or 1
    if req.num_gpus is None:
        return Layout(tp=req.tp or 1, ep=ep, pp=pp)
    if req.num_gpus % pp:
        raise ValueError(f"num_gpus={req.num_gpus} is not a multiple of pp={pp}")
    stage = req.num_gpus // pp
    layout = Layout(tp=req.tp or max(stage // ep, 1), ep=ep, pp=pp)
    if layout.num_gpus != req.num_gpus:
        raise ValueError(f"tp={layout.tp} ep={ep} pp={pp} uses {layout.num_gpus} GPUs (tp x ep x pp), "
                         f"not num_gpus={req.num_gpus}")
    return layout


def whole_model(cfg: ModelConfig, req: PlanRequest) -> dict:
    """Bytes of the model on one imaginary GPU: the layout-independent totals."""
    weights = weight_bytes(cfg, req.quant, mtp=req.mtp, int4_moe_layers=req.int4_moe_layers)
    host = weights.pop("experts", 0) if req.offload_experts else 0
    kv = kv_bytes_per_token(cfg, req.kv_dtype, mtp=req.mtp) * req.context * req.batch
    act = activation_bytes(cfg, min(req.prefill_chunk, req.context * req.batch), shards=Shards(),
                           logit_rows=req.batch)
    low, high = overhead_bytes(kv + act)
    base = sum(weights.values()) + kv + act
    return {"weights": weights, "weights_total": sum(weights.values()), "host_weights": host,
            "kv_cache": kv, "kv_bytes_per_token": kv_bytes_per_token(cfg, req.kv_dtype, mtp=req.mtp),
            "activations": act, "prefill_chunk": min(req.prefill_chunk, req.context * req.batch),
            "overhead": {"low": low, "high": high}, "total": {"low": base + low, "high": base + high}}


def fit_verdict(stages, budget: int) -> str:
    if peak_bytes(stages, high=True) <= budget:
        return "yes"
    return "tight" if peak_bytes(stages, high=False) <= budget else "no"


def _budget(gpu: Gpu, req: PlanRequest) -> int:
    return gpu.budget_bytes(req.gpu_memory_utilization)


def _gpu_info(gpu: Gpu, req: PlanRequest) -> dict:
    return {**gpu.to_dict(), "gpu_memory_utilization": req.gpu_memory_utilization,
            "budget_bytes": _budget(gpu, req)}


def _capacity_answers(place: Placement, layout: Layout, gpu: Gpu, req: PlanRequest) -> dict:
    budget = _budget(gpu, req)
    bound = decode_bound(place, layout, gpu.bandwidth_gbs, req.host_bandwidth_gbs)
    return {"max_context": max_context(place, layout, budget),
            "max_sequences": max_sequences(place, layout, budget),
            "decode_bound": bound.to_dict()}


def recommendations(place: Placement, req: PlanRequest) -> list[dict]:
    """For every catalogued GPU: the fewest that fit, in which layout, and what that leaves."""
    out = []
    for gpu in catalogue():
        row = {"gpu": gpu.name, "memory_label": gpu.memory_label, "memory_bytes": gpu.memory_bytes,
               "usable_bytes": gpu.usable_bytes, "budget_bytes": _budget(gpu, req),
               "bandwidth_gbs": gpu.bandwidth_gbs, "min_gpus": None}
        found = min_gpus(place, _budget(gpu, req), MAX_GPUS)
        if found:
            layout, stages = found
            row.update(min_gpus=layout.num_gpus, layout=layout.to_dict(), peak_bytes=peak_bytes(stages),
                       **_capacity_answers(place, layout, gpu, req))
        out.append(row)
    return out


def _choose_layout(place: Placement, req: PlanRequest, gpu: Gpu | None) -> tuple[Layout | None, str]:
    layout = explicit_layout(req)
    if layout is not None:
        return layout, "given"
    if req.num_gpus is not None:
        found = best_layout(place, req.num_gpus)
        if found is None:
            raise ValueError(f"no valid tp/ep/pp layout of {req.num_gpus} GPUs for this model and scheme; "
                             "try another count (heads and expert widths must split evenly)")
        return found[0], "best layout for num_gpus"
    if gpu is not None:
        found = min_gpus(place, _budget(gpu, req), MAX_GPUS)
        return (found[0], "fewest GPUs that fit") if found else (None, f"does not fit in {MAX_GPUS} GPUs")
    return Layout(), "one GPU (no GPU named)"


def build_report(req: PlanRequest) -> dict:
    """Everything the CLI table, ``--json`` and the web page show, for one request."""
    req.check()
    cfg = resolve_config(req.model)
    gpu = find_gpu(req.gpu) if req.gpu else None
    place = Placement(cfg, req.workload())
    layout, why = _choose_layout(place, req, gpu)
    report = {"request": asdict(req), "model": _model_info(cfg, req),
              "whole_model": whole_model(cfg, req), "gpu": _gpu_info(gpu, req) if gpu else None,
              "layout": layout.to_dict() if layout else None, "layout_reason": why, "layout_errors": [],
              "per_gpu": [], "host_bytes": 0, "fit": None, "fits": None, "min_gpus": None,
              "max_context": None, "max_sequences": None, "decode_bound": None}
    if layout is not None:
        report.update(_layout_answers(place, layout, gpu, req))
    elif gpu is not None:
        report.update(fit="no", fits=False)
    if gpu is not None:
        found = min_gpus(place, _budget(gpu, req), MAX_GPUS)
        report["min_gpus"] = {"count": found[0].num_gpus, "layout": found[0].to_dict()} if found else None
    report["warnings"] = _warnings(cfg, req)
    report["recommendations"] = recommendations(place, req) if req.recommendations else []
    return report


def _warnings(cfg: ModelConfig, req: PlanRequest) -> list[str]:
    out = []
    if req.context > cfg.max_position_embeddings:
        out.append(f"context {req.context:,} exceeds the model's max_position_embeddings "
                   f"{cfg.max_position_embeddings:,}; the bytes are counted anyway")
    if req.mtp and not cfg.num_nextn_predict_layers:
        out.append("--mtp: this model has no MTP block; nothing added")
    if req.offload_experts and not cfg.is_moe:
        out.append("--offload-experts: this is a dense model; nothing offloaded")
    return out


def _layout_answers(place: Placement, layout: Layout, gpu: Gpu | None, req: PlanRequest) -> dict:
    errors = place.errors(layout)
    stages = stage_memory(place, layout)
    out = {"layout_errors": errors, "per_gpu": [s.to_dict() for s in stages],
           "host_bytes": sum(s.host_weights * s.gpus for s in stages)}
    if gpu is None:
        return out
    verdict = "invalid" if errors else fit_verdict(stages, _budget(gpu, req))
    out.update(fit=verdict, fits=verdict == "yes")
    if not errors:
        out.update(_capacity_answers(place, layout, gpu, req))
    return out


def _model_info(cfg: ModelConfig, req: PlanRequest) -> dict:
    return {"name": req.model, "model_type": cfg.model_type, "params": param_counts(cfg),
            "max_position_embeddings": cfg.max_position_embeddings, "num_hidden_layers": cfg.num_hidden_layers,
            "num_key_value_heads": cfg.num_key_value_heads, "head_dim": cfg.head_dim,
            "active_weight_bytes_per_token": active_weight_bytes(cfg, req.quant, mtp=req.mtp,
                                                                 int4_moe_layers=req.int4_moe_layers)}
