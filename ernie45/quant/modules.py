"""Quantized modules that drop in for `nn.Linear` and `moe.Experts`, and the matmul paths behind them.

`QuantWeight` holds the stored tensors of one weight [N, K] or of E stacked expert weights [E, N, K]
(`qweight`, `scales`, `zeros`: formats.py) as frozen Parameters, so the loader fills them like any
weight. `QuantLinear` is a QuantWeight with nn.Linear's forward; `QuantExperts` holds three stacked
QuantWeights named like `moe.Experts`' parameters (`gate_proj`, `up_proj`, `down_proj`), so the
checkpoint names are `...experts.{e}.gate_proj.qweight` through the one name table in weights.py.

Matmul paths (`QuantWeight.path`: "auto" or "reference"); no path ever dequantizes more than the one
weight (one expert) it is multiplying:
- reference: dequantize to fp32, cast to the activation dtype, `F.linear`. Exactly what an nn.Linear
  holding the dequantized weight computes; every other path is tested against it. Used off CPU (CUDA).
- auto on CPU, up to KERNEL_MAX_ROWS rows (decode, short prefill): the weight-only kernels
  `_weight_int8pack_mm` / `_weight_int4pack_mm_for_cpu` with bf16 activations (field-notes: faster than
  an fp32 GEMV at one row, and 3-13x slower when fed fp32). fp32 inputs are rounded to bf16 for the
  kernel and the result cast back: far below the weights' own quantization error. The row limits are
  where dequantize + fp32 GEMM catches up (bench/quant_quality.py section C, a 4096 x 4096 weight):
  per row the kernels cost up to twice an fp32 GEMM, while dequantizing the weight costs tens to
  hundreds of rows of fp32 GEMM. The crossover moved with the machine's load (int8: 64-256 rows;
  int4/int2: about 256), and near it the two routes are within about 25% of each other.
  int2 weights use the int4 kernel too: a 2-bit code q2 widened to q4 = q2 + 6 gives the same value,
  (q4 - 8) * s + z = (q2 - 2) * s + z, with the same scales, zeros and group.
- auto on CPU, many rows (prefill), fp8 weights, and shapes the kernels refuse: dequantize this weight
  to fp32 and run an fp32 GEMM (bf16 GEMM has no hardware support here and is ~5x slower).
The int4 kernel wants its own tile layout; it is built from the plain stored codes the first time a
weight (an expert) is multiplied and kept as a run-time cache of 0.5 byte/weight, so on CPU an int4 or
int2 weight that has run costs 1 or 0.75 byte/weight of RAM (`drop_kernel_cache` frees it). The stored
Parameters never change layout, so saving a model that has run always writes the plain format.

Shape legend: M rows (tokens), N out features, K in features, E experts, G groups per row.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .formats import QuantizedWeight, dequantize, get_format, group_size_for, stored_shapes, unpack

# Rows up to which the bf16 weight-only kernels beat dequantize + fp32 GEMM (measured, module docstring).
KERNEL_MAX_ROWS = {"int8": 128, "int4": 256}
INT8_KERNEL_K_ALIGN = 16  # in features _weight_int8pack_mm takes safely on every CPU seen (see kernel())
INT4_KERNEL_GROUPS = (32, 64, 128, 256)  # group sizes _weight_int4pack_mm_for_cpu accepts
PATHS = ("auto", "reference")


class QuantWeight(nn.Module):
    """Stored quantized weight(s) [*lead, N, K] (lead = () or (E,)) and `matmul` over one of them."""

    def __init__(self, fmt: str, out_features: int, in_features: int, group_size: int | None = None,
                 lead: tuple[int, ...] = (), device: torch.device | str | None = None):
        super().__init__()
        self.fmt = get_format(fmt)
        self.out_features, self.in_features = out_features, in_features
        self.group_size = group_size or group_size_for(self.fmt, in_features)
        self.lead = tuple(lead)
        for name, (shape, dtype) in stored_shapes(self.fmt, self.lead, out_features, in_features,
                                                  self.group_size).items():
            self.register_parameter(name, nn.Parameter(torch.empty(shape, dtype=dtype, device=device),
                                                       requires_grad=False))
        self.path = "auto"
        self._int4_cache: dict[int | None, tuple] = {}

    @classmethod
    def from_quantized(cls, qw: QuantizedWeight, **kwargs) -> "QuantWeight":
        lead = tuple(qw.qweight.shape[:-2])
        module = cls(qw.fmt.name, qw.out_features, qw.in_features, qw.group_size, lead=lead, device="meta", **kwargs)
        for name, t in qw.tensors().items():
            setattr(module, name, nn.Parameter(t.contiguous(), requires_grad=False))
        return module

    def extra_repr(self) -> str:
        return (f"{self.fmt.name}, lead={list(self.lead)}, out={self.out_features}, in={self.in_features}, "
                f"group={self.group_size}, path={self.path}")

    # ---- views ---------------------------------------------------------------------------------
    def quantized(self, index: int | None = None) -> QuantizedWeight:
        """The stored tensors (of expert `index` when stacked) as a QuantizedWeight of views."""
        t = {n: getattr(self, n) for n in ("qweight", "scales", "zeros") if hasattr(self, n)}
        if index is not None:
            t = {n: v[index] for n, v in t.items()}
        return QuantizedWeight(self.fmt, self.group_size, self.in_features, **{n: v.detach() for n, v in t.items()})

    def dequantize(self, index: int | None = None) -> torch.Tensor:  # fp32 [N, K] (or [*lead, N, K])
        return dequantize(self.quantized(index))

    # ---- matmul --------------------------------------------------------------------------------
    def kernel(self) -> str | None:
        """The CPU weight-only kernel this weight can use, if any (shape rules of the aten kernels)."""
        K, N, g = self.in_features, self.out_features, self.group_size
        # The int8 kernel crashes (SIGSEGV) for K not a multiple of 8 (Zen 1), and on AVX-512 CPUs (Zen 4)
        # for K not a multiple of 16 with more than one row: INT8_KERNEL_K_ALIGN covers both.
        if self.fmt.name == "int8" and K % INT8_KERNEL_K_ALIGN == 0:
            return "int8"
        if self.fmt.name in ("int4", "int2") and N % 16 == 0 and g in INT4_KERNEL_GROUPS and K % g == 0:
            return "int4"  # int2 codes are widened to int4 codes (module docstring)
        return None

    def route(self, x: torch.Tensor) -> str:
        if self.path == "reference" or x.device.type != "cpu":
            return "reference"
        kernel = self.kernel()
        return kernel if kernel and x.shape[0] <= KERNEL_MAX_ROWS[kernel] else "fp32"

    def matmul(self, x: torch.Tensor, index: int | None = None, route: str | None = None) -> torch.Tensor:
        """x [M, K] @ W[index]^T -> [M, N] in x.dtype."""
        route = route or self.route(x)
        if route == "int8":
            qw = self.quantized(index)
            # .to(bf16): a no-op unless someone ran model.to(float32), which casts the stored scales too
            return torch.ops.aten._weight_int8pack_mm(x.to(torch.bfloat16).contiguous(), qw.qweight,
                                                      qw.scales.to(torch.bfloat16)).to(x.dtype)
        if route == "int4":
            packed, scale_zero = self._int4_pack(index)
            return torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16).contiguous(), packed,
                                                              self.group_size, scale_zero).to(x.dtype)
        w = self.dequantize(index)  # [N, K] fp32: only this weight, only for this call
        if route == "fp32":
            return F.linear(x.float(), w).to(x.dtype)
        return F.linear(x, w.to(x.dtype))

    def _int4_pack(self, index: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(kernel-layout codes, scale_zero [G, N, 2] bf16), cached until the Parameters are replaced."""
        key = (self.qweight.data_ptr(), self.scales.data_ptr(), self.zeros.data_ptr())
        hit = self._int4_cache.get(index)
        if hit is None or hit[0] != key:
            qw = self.quantized(index)
            codes = unpack(qw.qweight, self.fmt.bits).to(torch.int32) + (8 - self.fmt.mid)  # [N, K] in 0..15
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
            scale_zero = torch.stack([qw.scales, qw.zeros], dim=-1).transpose(0, 1).to(torch.bfloat16).contiguous()
            hit = self._int4_cache[index] = (key, packed, scale_zero)
        return hit[1], hit[2]

    def drop_kernel_cache(self) -> None:
        self._int4_cache.clear()


class QuantLinear(QuantWeight):
    """Drop-in for a bias-free `nn.Linear(in_features, out_features)`: x [..., K] -> [..., N]."""

    def __init__(self, in_features: int, out_features: int, fmt: str, group_size: int | None = None,
                 lead: tuple[int, ...] = (), device: torch.device | str | None = None):
        if lead:
            raise ValueError("QuantLinear holds one weight; stacked weights belong in QuantExperts")
        super().__init__(fmt, out_features, in_features, group_size, (), device)

    @classmethod
    def from_quantized(cls, qw: QuantizedWeight, **kwargs) -> "QuantLinear":
        module = cls(qw.in_features, qw.out_features, qw.fmt.name, qw.group_size, device="meta")
        for name, t in qw.tensors().items():
            setattr(module, name, nn.Parameter(t.contiguous(), requires_grad=False))
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.matmul(x.reshape(-1, x.shape[-1])).unflatten(0, x.shape[:-1])


class QuantExperts(nn.Module):
    """Drop-in for `moe.Experts`: E SwiGLU experts whose three projections are stacked QuantWeights."""

    PROJS = ("gate_proj", "up_proj", "down_proj")

    def __init__(self, gate_proj: QuantWeight, up_proj: QuantWeight, down_proj: QuantWeight, act,
                 first_expert: int = 0):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = gate_proj, up_proj, down_proj
        self.act = act
        self.first_expert = first_expert  # global id of local expert 0 (expert parallelism)
        self.num_experts = gate_proj.lead[0]

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:  # [n, D] -> [n, D]
        h = self.act(self.gate_proj.matmul(x, e)) * self.up_proj.matmul(x, e)  # [n, F]
        return self.down_proj.matmul(h, e)

    def forward(self, x: torch.Tensor, w: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """x [T,D], w [T,K] (x.dtype), idx [T,K] -> sum_k w_k * E_idx_k(x)  [T,D]"""
        token = torch.arange(x.shape[0], device=x.device).repeat_interleave(idx.shape[1])  # [T*K]
        return self.grouped(x, token, idx.flatten(), w.flatten())

    def grouped(self, x: torch.Tensor, token: torch.Tensor, expert: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """Sum over (token, expert, weight) pairs [P] of weight * E_expert(x[token]) -> [T, D].

        `moe.Experts.grouped`'s contract and order (stable sort by expert, ascending expert, index_add),
        so the reference path matches a float module holding the dequantized experts exactly.
        """
        order = torch.argsort(expert, stable=True)  # [P]
        token, weight = token[order], weight[order]
        counts = torch.bincount(expert, minlength=self.num_experts).tolist()
        out = torch.zeros_like(x)
        start = 0
        for e, n in enumerate(counts):
            if n:
                rows = slice(start, start + n)
                out.index_add_(0, token[rows], self.expert(e, x[token[rows]]) * weight[rows, None])
                start += n
        return out


def set_path(model: nn.Module, path: str) -> nn.Module:
    """Choose the matmul path of every quantized weight in `model` ("auto" or "reference")."""
    if path not in PATHS:
        raise ValueError(f"unknown quantized matmul path {path!r}; choose one of {PATHS}")
    for m in model.modules():
        if isinstance(m, QuantWeight):
            m.path = path
    return model
