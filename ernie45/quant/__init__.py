"""Weight-only quantization: a stored weight format plus a module swap (STYLE habit 5).

Offline, `ernie45 quantize` (stream.py) turns a checkpoint into packed tensors and records the scheme,
per weight, in config.json's `quantization_config`. At load time `apply_quant_config` swaps the named
`nn.Linear`s and `moe.Experts` of the meta-built model for `QuantLinear` / `QuantExperts` with
parameters of the stored shapes and dtypes; the ordinary strict loader then fills them. The model code
never knows: the quantized modules keep the forward contracts of the modules they replace.

    formats.py  byte layout, pack/unpack, round-to-nearest, dequantize
    gptq.py     the error-minimising method (Hessian-weighted column updates) and input collection
    modules.py  QuantLinear / QuantExperts and their CPU kernel and reference matmul paths
    recipe.py   which weight gets which format (schemes, mixed 2-bit) and the config.json record
    stream.py   layer-by-layer quantization of a checkpoint on disk, with calibration activations
    cli.py      `ernie45 quantize`
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..moe import Experts
from .formats import FORMATS, QuantizedWeight, dequantize, get_format, quantize_rtn
from .gptq import DEFAULT_MIN_TOKENS, gptq_quantize, quantize_experts_gptq
from .modules import QuantExperts, QuantLinear, QuantWeight, set_path
from .recipe import (DEFAULT_INT4_MOE_LAYERS, EXPERT_PROJS, METHODS, SCHEMES, Target, plan, quantization_config,
                     read_config)

__all__ = ["FORMATS", "METHODS", "SCHEMES", "QuantExperts", "QuantLinear", "QuantWeight", "QuantizedWeight",
           "apply_quant_config", "dequantize", "dequantize_model", "quantize_model", "quantize_rtn", "set_path"]


# ---- load time: swap modules by the recorded table -----------------------------------------------
def apply_quant_config(model: nn.Module, qcfg: dict[str, Any]) -> nn.Module:
    """Replace every module named in `qcfg["modules"]` by its quantized form (shapes only; on the
    model's device, usually meta). Raises one error naming every entry that does not fit the model."""
    modules = read_config(dict(qcfg))
    experts: dict[str, dict[str, dict]] = {}
    problems = []
    for name, entry in modules.items():
        parent_name, _, leaf = name.rpartition(".")
        parent = _submodule(model, parent_name)
        child = getattr(parent, leaf, None) if parent is not None else None
        if isinstance(child, nn.Linear) and child.bias is None:
            problems += _check_group(name, entry, child.in_features)
            setattr(parent, leaf, QuantLinear(child.in_features, child.out_features, entry["format"],
                                              entry["group_size"], device=child.weight.device))
        elif isinstance(parent, Experts) and leaf in EXPERT_PROJS:
            experts.setdefault(parent_name, {})[leaf] = entry
        else:
            problems.append(f"{name}: is {type(child).__name__ if child is not None else 'missing'}, not a "
                            "bias-free nn.Linear or a routed-expert projection of this model")
    for parent_name, entries in experts.items():
        problems += _swap_experts(model, parent_name, entries)
    if problems:
        raise ValueError("quantization_config does not fit this model's config:\n  " + "\n  ".join(problems))
    return model


def _submodule(model: nn.Module, name: str) -> nn.Module | None:
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


def _check_group(name: str, entry: dict, in_features: int) -> list[str]:
    fmt, g = get_format(entry["format"]), entry["group_size"]
    if fmt.float8 or g <= 0 or (in_features % g == 0 and g % fmt.per_byte == 0):
        return [] if g > 0 else [f"{name}: group_size {g} must be positive"]
    return [f"{name}: group_size {g} does not divide in_features {in_features} into whole bytes of {fmt.name}"]


def _swap_experts(model: nn.Module, name: str, entries: dict[str, dict]) -> list[str]:
    if set(entries) != set(EXPERT_PROJS):
        return [f"{name}: quantization_config lists {sorted(entries)}; routed experts are quantized all three "
                f"projections ({', '.join(EXPERT_PROJS)}) or none"]
    old = model.get_submodule(name)
    E, F_, D = old.gate_proj.shape
    shapes = {"gate_proj": (F_, D), "up_proj": (F_, D), "down_proj": (D, F_)}
    problems = [p for proj, (_, k) in shapes.items() for p in _check_group(f"{name}.{proj}", entries[proj], k)]
    if not problems:
        q = {proj: QuantWeight(entries[proj]["format"], n, k, entries[proj]["group_size"], (E,),
                               device=old.gate_proj.device) for proj, (n, k) in shapes.items()}
        model.set_submodule(name, QuantExperts(**q, act=old.act, first_expert=getattr(old, "first_expert", 0)))
    return problems


# ---- quantize time -------------------------------------------------------------------------------
def quantize_unit(unit: nn.Module, prefix: str, targets: dict[str, Target], method: str,
                  hessians: dict[str, Any] | None = None,
                  min_tokens: int = DEFAULT_MIN_TOKENS) -> dict[str, dict[str, Any]]:
    """Quantize, in place, the targets inside `unit` (a decoder layer or a ModuleList named `prefix`).

    GPTQ is used where `method == "gptq"` and a Hessian was collected (trunk layers); everything else,
    including the MTP block, is round-to-nearest. Returns {target name: how it was quantized}.
    """
    hessians = hessians or {}
    how = {}
    for name, module in list(unit.named_modules()):
        full = f"{prefix}.{name}" if name else prefix
        if isinstance(module, nn.Linear) and full in targets:
            t, hess = targets[full], hessians.get(name)
            use_gptq = method == "gptq" and hess is not None and hess.rows > 0
            w = module.weight.detach()
            qw = gptq_quantize(w, hess.h, get_format(t.fmt), t.group_size) if use_gptq else \
                quantize_rtn(w, get_format(t.fmt), t.group_size)
            unit.set_submodule(name, QuantLinear.from_quantized(qw))
            how[full] = {"method": "gptq" if use_gptq else "rtn"}
        elif isinstance(module, Experts) and f"{full}.gate_proj" in targets:
            how.update(_quantize_experts(unit, name, full, module, targets, method, hessians.get(name), min_tokens))
    return how


def _quantize_experts(unit, name, full, module, targets, method, hess, min_tokens) -> dict[str, dict]:
    q, how = {}, {}
    for proj in EXPERT_PROJS:
        t, w = targets[f"{full}.{proj}"], getattr(module, proj).detach()  # [E, N, K]
        if method == "gptq" and hess is not None:
            per_expert = hess.down if proj == "down_proj" else hess.gate_up
            qw, rtn = quantize_experts_gptq(w, per_expert, get_format(t.fmt), t.group_size, min_tokens)
            how[t.name] = {"method": "gptq", **({"rtn_experts": rtn} if rtn else {})}
        else:
            qw = quantize_rtn(w, get_format(t.fmt), t.group_size)
            how[t.name] = {"method": "rtn"}
        q[proj] = QuantWeight.from_quantized(qw)
    unit.set_submodule(name, QuantExperts(**q, act=module.act, first_expert=getattr(module, "first_expert", 0)))
    return how


def quantize_model(model: nn.Module, scheme: str, method: str = "rtn", calib_ids: torch.Tensor | None = None,
                   int4_moe_layers: int = DEFAULT_INT4_MOE_LAYERS, min_tokens: int = DEFAULT_MIN_TOKENS,
                   progress: bool = False) -> nn.Module:
    """Quantize a loaded model in place and record the scheme in `model.config` (then `save_checkpoint`).

    calib_ids [S, T] token ids are required for GPTQ; the trunk is run one layer at a time on them.
    """
    from .stream import LayerInputs, model_units, quantize_units

    cfg = model.config
    targets = plan(cfg, scheme, int4_moe_layers)
    calib = None
    if method == "gptq":
        if calib_ids is None:
            raise ValueError("GPTQ needs calibration token ids (calib_ids [S, T])")
        calib = LayerInputs(cfg, calib_ids, model.model.embed_tokens.weight)
    how: dict[str, dict] = {}
    for _, _, done in quantize_units(model_units(model), targets, method, calib, min_tokens, progress):
        how.update(done)
    info = None if calib is None else {"sequences": int(calib_ids.shape[0]), "seq_len": int(calib_ids.shape[1])}
    model.config = cfg.replace(quantization_config=quantization_config(scheme, method, targets, how,
                                                                       int4_moe_layers, info))
    return model


def dequantize_model(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """The float reference of a quantized model: every quantized module back to nn.Linear / Experts
    holding the dequantized weights (in `dtype`, default the embedding dtype). In place."""
    dtype = dtype or model.model.embed_tokens.weight.dtype
    for name, m in list(model.named_modules()):
        if isinstance(m, QuantLinear):
            lin = nn.Linear(m.in_features, m.out_features, bias=False, device="meta")
            lin.weight = nn.Parameter(m.dequantize().to(dtype), requires_grad=False)
            model.set_submodule(name, lin)
        elif isinstance(m, QuantExperts):
            with torch.device("meta"):
                ex = Experts(model.config)
            for proj in EXPERT_PROJS:
                setattr(ex, proj, nn.Parameter(getattr(m, proj).dequantize().to(dtype), requires_grad=False))
            ex.act = m.act
            model.set_submodule(name, ex)
    model.config = model.config.replace(quantization_config=None)
    return model
