"""Which weight gets which format: the schemes, the mixed 2-bit recipe, and the record in config.json.

Schemes (the planner in ernie45/plan.py counts the same bytes for the same names):
- `int8`, `int4`, `int2`, `fp8`: every linear weight of the decoder (attention, dense FFN, shared and
  routed experts, the MTP block and its input projection) in that format.
- `mixed-2bit`, modelled on Baidu's 300B 2-bit release (spec section 6): attention, dense FFN, shared
  experts and the MTP block in int8; routed experts of the first `int4_moe_layers` MoE layers (default 4:
  the 300B keeps layers 0-6, i.e. its first 4 MoE layers, at 4 bits) in int4; all other routed experts int2.
What never changes precision: embeddings, the head, norms, the router and its correction bias.

The record (`quantization_config` in config.json) lists every quantized weight by module name with its
format, group size and method, so a checkpoint reloads from its own config without this recipe:
routed experts appear per projection (`model.layers.3.mlp.experts.gate_proj`), everything else as the
nn.Linear's name. Group sizes that had to fall back (input dim not divisible) show up there too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..config import ModelConfig
from .formats import FORMATS, get_format, group_size_for

SCHEMES = ("int8", "int4", "int2", "mixed-2bit", "fp8")
METHODS = ("rtn", "gptq")
QUANT_METHOD = "ernie45"  # `quant_method` key: other loaders (transformers) refuse it by name
FORMAT_VERSION = 1
DEFAULT_INT4_MOE_LAYERS = 4
EXPERT_PROJS = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Target:
    """One quantized weight: an nn.Linear (`experts == 0`) or one projection of E stacked experts."""

    name: str
    role: str  # attention | dense_mlp | shared_experts | experts | mtp
    out_features: int
    in_features: int
    fmt: str
    group_size: int
    experts: int = 0

    def record(self, how: dict[str, Any]) -> dict[str, Any]:
        """The config.json entry; `how` = {"method": ...} plus e.g. experts that fell back to RTN."""
        return {"format": self.fmt, "group_size": self.group_size, **how}


def check_scheme(scheme: str, method: str = "rtn") -> None:
    if scheme not in SCHEMES:
        raise ValueError(f"unknown quantization scheme {scheme!r}; choose one of {', '.join(SCHEMES)}")
    if method not in METHODS:
        raise ValueError(f"unknown quantization method {method!r}; choose one of {', '.join(METHODS)}")
    if scheme == "fp8" and method != "rtn":
        raise ValueError("fp8 is round-to-nearest only (its block scales leave nothing for GPTQ to fix); "
                         "use --method rtn")


def _linears(cfg: ModelConfig) -> list[tuple[str, str, int, int, int, int | None]]:
    """(name, role, out, in, experts, moe_index) of every quantizable weight, in checkpoint order."""
    D, F, E = cfg.hidden_size, cfg.moe_intermediate_size, cfg.moe_num_experts

    def attention(p: str, role: str):
        return [(f"{p}.self_attn.q_proj", role, cfg.q_dim, D, 0, None),
                (f"{p}.self_attn.k_proj", role, cfg.kv_dim, D, 0, None),
                (f"{p}.self_attn.v_proj", role, cfg.kv_dim, D, 0, None),
                (f"{p}.self_attn.o_proj", role, D, cfg.q_dim, 0, None)]

    def mlp(p: str, role: str, width: int, experts: int = 0, moe_index: int | None = None):
        return [(f"{p}.gate_proj", role, width, D, experts, moe_index),
                (f"{p}.up_proj", role, width, D, experts, moe_index),
                (f"{p}.down_proj", role, D, width, experts, moe_index)]

    out, moe_index = [], 0
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}"
        out += attention(p, "attention")
        if not cfg.is_moe_layer(i):
            out += mlp(f"{p}.mlp", "dense_mlp", cfg.intermediate_size)
            continue
        out += mlp(f"{p}.mlp.experts", "experts", F, E, moe_index)
        if cfg.moe_num_shared_experts:
            out += mlp(f"{p}.mlp.shared_experts", "shared_experts", cfg.shared_intermediate_size)
        moe_index += 1
    for j in range(cfg.num_nextn_predict_layers):
        out.append((f"model.mtp_linear_proj.{j}", "mtp", D, 2 * D, 0, None))
        out += attention(f"model.mtp_block.{j}", "mtp")
        out += mlp(f"model.mtp_block.{j}.mlp", "mtp", cfg.intermediate_size)
    return out


def format_for(scheme: str, role: str, moe_index: int | None, int4_moe_layers: int) -> str:
    """The format of one weight under `scheme` (only mixed-2bit looks at the role)."""
    if scheme != "mixed-2bit":
        return scheme
    if role != "experts":
        return "int8"
    return "int4" if moe_index is not None and moe_index < int4_moe_layers else "int2"


def plan(cfg: ModelConfig, scheme: str, int4_moe_layers: int = DEFAULT_INT4_MOE_LAYERS) -> dict[str, Target]:
    """name -> Target for every weight the scheme quantizes (group sizes already resolved)."""
    check_scheme(scheme)
    targets = {}
    for name, role, n_out, n_in, experts, moe_index in _linears(cfg):
        fmt = format_for(scheme, role, moe_index, int4_moe_layers)
        group = group_size_for(FORMATS[fmt], n_in)
        targets[name] = Target(name, role, n_out, n_in, fmt, group, experts)
    return targets


def group_fallbacks(targets: dict[str, Target]) -> list[str]:
    """Human-readable lines for every weight whose group size is not its format's default."""
    out = []
    for t in targets.values():
        want = get_format(t.fmt).group_size
        if want is not None and not get_format(t.fmt).float8 and t.group_size != want:
            out.append(f"{t.name}: {t.fmt} group {t.group_size} "
                       f"(input dim {t.in_features} is not a multiple of {want})")
    return out


def quantization_config(scheme: str, method: str, targets: dict[str, Target], how: dict[str, dict],
                        int4_moe_layers: int, calibration: dict | None = None) -> dict[str, Any]:
    """The `quantization_config` written to config.json; `how[name]` says how each target was quantized."""
    used = sorted({t.fmt for t in targets.values()})
    record: dict[str, Any] = {"quant_method": QUANT_METHOD, "format_version": FORMAT_VERSION, "scheme": scheme,
                              "method": method, "formats": {f: FORMATS[f].describe() for f in used}}
    if scheme == "mixed-2bit":
        record["int4_moe_layers"] = int4_moe_layers
    if calibration:
        record["calibration"] = calibration
    missing = sorted(set(targets) - set(how))
    if missing:
        raise RuntimeError(f"{len(missing)} planned weight(s) were never quantized, e.g. {missing[:3]}; "
                           "the model does not have the modules its config implies")
    record["modules"] = {n: t.record(how[n]) for n, t in targets.items()}
    return record


def read_config(qcfg: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Validate a recorded quantization_config and return its `modules` table."""
    if qcfg.get("quant_method") != QUANT_METHOD:
        raise ValueError(f"quantization_config.quant_method is {qcfg.get('quant_method')!r}; ernie45 reads only "
                         f"checkpoints written by `ernie45 quantize` ({QUANT_METHOD!r})")
    if qcfg.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"quantization_config.format_version {qcfg.get('format_version')!r} is not {FORMAT_VERSION}; "
                         "re-quantize the checkpoint with this version of ernie45")
    modules = qcfg.get("modules")
    if not isinstance(modules, dict) or not modules:
        raise ValueError("quantization_config has no 'modules' table naming the quantized weights")
    for name, entry in modules.items():
        ok = isinstance(entry, dict) and entry.get("format") in FORMATS and isinstance(entry.get("group_size"), int)
        if not ok:
            raise ValueError(f"quantization_config.modules[{name!r}] = {entry!r}: need a format "
                             f"({', '.join(FORMATS)}) and an integer group_size")
    return modules
