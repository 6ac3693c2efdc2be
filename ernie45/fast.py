"""The fast CPU path: a module swap that routes decode-sized matmuls to the kernels in `kernels/`.

`accelerate(model)` changes the class of the model's linear layers, expert stacks and head in place
(`nn.Linear` -> `FastLinear`, `moe.Experts` -> `FastExperts`, `QuantLinear` -> `FastQuantLinear`,
`QuantExperts` -> `FastQuantExperts`): parameters, names, hooks and checkpoints stay exactly as they
were, only `forward` changes, and `reference(model)` swaps back. Each fast class is a subclass of the
module it replaces and is tested against it (tests/test_fast.py).

What runs where (rows = tokens in this call):
- one token on a batch-1 KVCache: the whole trunk in one C call (fast_decode.py), and at temperature 0
  the exact int8-screened argmax instead of the full head (greedy_head.py);
- up to DECODE_ROWS rows (fp32 weights) or KERNEL_MAX_ROWS (bf16/int2; bf16 on CPUs with bf16
  hardware: NATIVE_BF16_KERNEL_ROWS, experts NATIVE_BF16_EXPERT_ROWS), and any number of rows for int8 and int4 (`Weights.tiled`: tiles
  of weight rows x activation rows, as fast as torch's GEMM routes for them): `kernels.gemv` reads
  the weight once in its stored format with fp32 activations (int16-rounded per block for the integer
  formats: kernels/gemv.c's header); the result is cast to the activation dtype, where F.linear rounds;
- routed experts of a decode batch (one token, or at most that many rows per expert) and of an int8/int4
  prefill: one C call for all (token, expert) pairs, ascending expert id, MAX_ROWS rows of an expert at
  a time, with the bf16 reference's rounding points when the model is bf16 — a bf16 model's decode
  equals the reference up to summation order in dot products;
- many rows with bf16 weights (prefill): on CPUs without bf16 hardware an fp32 GEMM on the up-cast
  weight, rounded back to bf16 (their bf16 GEMM is ~5x slower: field-notes); with AVX512_BF16/AMX
  torch's own bf16 GEMM (`native_bf16`).
- anything else: the module's own forward.

Shape legend: M rows, K in, N out, T tokens, P (token, expert) pairs, D hidden, F expert width.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels
from .layers import RMSNorm
from .moe import Experts
from .quant.modules import QuantExperts, QuantLinear, QuantWeight

DECODE_ROWS = 16  # fp32 weights: rows up to which the kernels beat MKL's GEMM
KERNEL_MAX_ROWS = 64  # bf16 weights without bf16 hardware: the kernels' tiles convert each weight once for all rows
# bf16 weights on a CPU with bf16 hardware (`native_bf16`): the kernels hold one weight stream per thread
# up to 4 activation rows (gemv.c's PLAIN_ONE_ROW_M) and beat torch's bf16 GEMM there; from 8 rows torch's
# native bf16 dot products overtake the kernels' fp32 FMAs (`python bench/bf16_rows.py`: bench/results/
# bf16_rows.md). The experts' kernel call for all (token, expert) pairs of a decode batch also saves torch's
# per-expert calls: up to NATIVE_BF16_EXPERT_ROWS rows per expert. (An earlier single limit of 32, tuned on
# prefill, sent a 32-sequence batch's head through the kernels at 2.05x torch's time.)
NATIVE_BF16_KERNEL_ROWS = 4
NATIVE_BF16_EXPERT_ROWS = 16
# int8/int4 weights against bf16 activations on a CPU with bf16 hardware: above this many rows, dequantizing
# the weight to bf16 (torch) and torch's bf16 GEMM beat the integer kernels (`python bench/bf16_rows.py
# --quant int4`, Zen 4: q/k/v-sized int4 weights 0.66-0.83x the kernels' time at 256-512 rows, 1.31x at 128).
QUANT_BF16_GEMM_ROWS = 192
# Smallest weight (N x K elements, per expert) worth a kernel call: below it the ~10-20 us of Python and
# ctypes around a call cost more than torch's own small GEMV (measured on the 8.5 M-param default model).
MIN_KERNEL_ELEMENTS = 1 << 16
GREEDY_HEAD_MIN_ELEMENTS = 1 << 22  # heads from ~16 MB (bf16) up: the int8 screen pays for its RAM


def plain_weights(w: torch.Tensor, min_elements: int | None = None) -> kernels.Weights | None:
    """fp32/bf16 rows [*, N, K] as kernel weights, or None when the kernels cannot take them."""
    small = w.shape[-1] * w.shape[-2] < (MIN_KERNEL_ELEMENTS if min_elements is None else min_elements)
    if not kernels.available() or w.device.type != "cpu" or not kernels.supports(w.dtype, w.shape[-1]) \
            or not w.is_contiguous() or small:
        return None
    return kernels.Weights(w.dtype, w.detach(), w.shape[-1])


def quant_weights(q: QuantWeight, min_elements: int | None = None) -> kernels.Weights | None:
    """A QuantWeight's stored tensors as kernel weights (int8/int4/int2), or None."""
    fmt = q.fmt.name
    small = q.in_features * q.out_features < (MIN_KERNEL_ELEMENTS if min_elements is None else min_elements)
    if not kernels.available() or q.qweight.device.type != "cpu" \
            or not kernels.supports(fmt, q.in_features, q.group_size) or small:
        return None
    zeros = getattr(q, "zeros", None)
    return kernels.Weights(fmt, q.qweight.detach(), q.in_features, q.scales.detach(),
                           None if zeros is None else zeros.detach(), q.group_size)


def _storage_key(*tensors: torch.Tensor) -> tuple:
    return tuple((t.data_ptr(), t.dtype) for t in tensors)  # a new load, .to() or shard moves the storage


def _cached(module: nn.Module, key: str, tensors: tuple, make):
    cache = module.__dict__.setdefault("_kernel_weights", {})
    probe = _storage_key(*tensors)
    hit = cache.get(key)
    if hit is None or hit[0] != probe:
        hit = cache[key] = (probe, make())
    return hit[1]


NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def native_bf16() -> bool:
    """Whether torch's bf16 GEMM runs on bf16 hardware here (AVX512_BF16 or AMX-BF16 in /proc/cpuinfo).

    Without it a bf16 GEMM is several times slower than an fp32 GEMM on up-cast weights (field-notes, Zen 1:
    ~5x); with it (the Zen 4 machine) the bf16 GEMM was faster: transformers' bf16 prefill 610 tok/s against
    its fp32 576 (bench/results/speed.md at commit be6df7e). `ERNIE45_BF16_GEMM=native|fp32` overrides the
    detection."""
    forced = os.environ.get("ERNIE45_BF16_GEMM")
    if forced in ("native", "fp32"):
        return forced == "native"
    return any(f in kernels.cpu_flags() for f in NATIVE_BF16_FLAGS)


def prefill_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [M, K] @ w^T: bf16 weights on a CPU without bf16 hardware go through an fp32 GEMM, else F.linear."""
    if w.dtype == torch.bfloat16 and w.device.type == "cpu" and not native_bf16():
        return F.linear(x.float(), w.float()).to(x.dtype)
    return F.linear(x, w)


def kernel_rows(weights: kernels.Weights, experts: bool = False) -> int | float:
    """Rows up to which a kernel call beats the GEMM route for these weights (int8/int4: any number);
    `experts`: rows per expert of one call for all the pairs of a batch (`kernels.moe_tokens`)."""
    if weights.tiled:
        return float("inf")
    if weights.kind == kernels.KINDS[torch.float32]:
        return DECODE_ROWS
    if weights.kind == kernels.KINDS[torch.bfloat16] and native_bf16():
        return NATIVE_BF16_EXPERT_ROWS if experts else NATIVE_BF16_KERNEL_ROWS
    return KERNEL_MAX_ROWS


def kernel_linear(x: torch.Tensor, weights: kernels.Weights | None, fallback) -> torch.Tensor:
    """x [..., K] -> [..., N] in x.dtype via the GEMV kernel when few rows, else `fallback(x2d)`."""
    flat = x.reshape(-1, x.shape[-1])
    if weights is not None and flat.shape[0] <= kernel_rows(weights) and x.device.type == "cpu":
        out = kernels.gemv(weights, flat).to(x.dtype)
    else:
        out = fallback(flat)
    return out.unflatten(0, x.shape[:-1])


class FastLinear(nn.Linear):
    """nn.Linear (bias-free) with kernel decode and fp32 prefill for bf16 weights."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bias is not None:
            return super().forward(x)
        weights = _cached(self, "w", (self.weight,), lambda: plain_weights(self.weight))
        if weights is None and (self.weight.dtype != torch.bfloat16 or x.numel() <= DECODE_ROWS * x.shape[-1]):
            return F.linear(x, self.weight)  # nothing to gain: skip the wrappers (small or fp32 weights)
        return kernel_linear(x, weights, lambda flat: prefill_linear(flat, self.weight))


class FastQuantLinear(QuantLinear):
    """QuantLinear whose matmuls read the stored codes with the kernels (int16-rounded activations), except
    a bf16 prefill on a CPU with bf16 hardware: above QUANT_BF16_GEMM_ROWS rows the reference route
    (this weight dequantized to bf16, torch's bf16 GEMM) is faster than the integer kernels."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.dtype == torch.bfloat16 and x.numel() > QUANT_BF16_GEMM_ROWS * x.shape[-1] and x.device.type == "cpu"
                and native_bf16()):
            return self.matmul(x.reshape(-1, x.shape[-1]), route="reference").unflatten(0, x.shape[:-1])
        weights = _cached(self, "w", (self.qweight, self.scales), lambda: quant_weights(self))
        return kernel_linear(x, weights, lambda flat: self.matmul(flat))


class _FastGrouped:
    """`grouped` for stacked experts: one kernel call for the pairs of a decode step. Subclasses give
    `_stack()`: the (gate, up, down) kernel weights, None where the kernels cannot take one."""

    def grouped(self, x: torch.Tensor, token: torch.Tensor, expert: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """Sum over pairs [P] of weight * E_expert(x[token]) -> [T, D]; `Experts.grouped`'s contract."""
        stack = self._stack()
        if None in stack or x.device.type != "cpu" or not kernels.same_layout(stack[0], stack[1]):
            return super().grouped(x, token, expert, weight)
        gate, up, down = stack
        if x.shape[0] == 1:  # one token: every selected expert in one kernel call, ascending expert id
            order = torch.argsort(expert)
            y = torch.zeros(x.shape[-1])
            kernels.moe_token(gate, up, down, expert[order], weight[order].float(), x[0], y,
                              bf16=x.dtype == torch.bfloat16)
            return y.to(x.dtype)[None]
        order = torch.argsort(expert, stable=True)  # by expert, ascending token within: the reference order
        expert = expert[order]
        # decode batches; every prefill of int4 experts (moe_tokens takes MAX_ROWS of an expert at a time)
        if expert.numel() and int(torch.bincount(expert).max()) <= min(kernel_rows(w, experts=True) for w in stack):
            out = kernels.moe_tokens(gate, up, down, expert, token[order], weight[order].float(), x,
                                     bf16=x.dtype == torch.bfloat16)
            return out.to(x.dtype)
        return super().grouped(x, token[order], expert, weight[order])


class FastExperts(_FastGrouped, Experts):
    """moe.Experts with the kernel paths; per-expert matmuls of many rows run as fp32 GEMMs for bf16."""

    def _stack(self):
        params = (self.gate_proj, self.up_proj, self.down_proj)
        return _cached(self, "stack", params, lambda: tuple(plain_weights(p) for p in params))

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:  # [n, D] -> [n, D]
        gate, up, down = self._stack()
        if gate is None or up is None or down is None:
            if x.dtype == torch.bfloat16 and x.shape[0] > DECODE_ROWS:  # fp32 GEMMs for a bf16 prefill
                h = self.act(prefill_linear(x, self.gate_proj[e])) * prefill_linear(x, self.up_proj[e])
                return prefill_linear(h, self.down_proj[e])
            return super().expert(e, x)
        g = kernel_linear(x, None if gate is None else _row(gate, e), lambda f: prefill_linear(f, self.gate_proj[e]))
        u = kernel_linear(x, None if up is None else _row(up, e), lambda f: prefill_linear(f, self.up_proj[e]))
        h = self.act(g) * u
        return kernel_linear(h, None if down is None else _row(down, e), lambda f: prefill_linear(f, self.down_proj[e]))


class FastQuantExperts(_FastGrouped, QuantExperts):
    """QuantExperts with the single-token kernel path."""

    def _stack(self):
        qs = (self.gate_proj, self.up_proj, self.down_proj)
        return _cached(self, "stack", tuple(q.qweight for q in qs), lambda: tuple(quant_weights(q) for q in qs))


def _row(stack: kernels.Weights, e: int) -> kernels.Weights:
    """Expert e of stacked kernel weights as a 2-D Weights (views, no copy)."""
    sub = stack.scales[e] if stack.scales is not None else None
    zeros = stack.zeros[e] if stack.zeros is not None else None
    kind = next(k for k, v in kernels.KINDS.items() if v == stack.kind)
    return kernels.Weights(kind, stack.data[e], stack.in_features, sub, zeros, stack.group)


class FastRMSNorm(RMSNorm):
    """RMSNorm whose one-row calls (the final norm of a decode step) run in C: ~8 torch calls -> 1."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if (x.numel() == x.shape[-1] == w.numel() and x.dtype == w.dtype and w.dtype in (torch.float32, torch.bfloat16)
                and x.device.type == "cpu" and not torch.is_grad_enabled() and kernels.available()):
            return kernels.rms_norm(w.detach(), x, self.eps).view(x.shape)
        return super().forward(x)


SWAPS = {nn.Linear: FastLinear, Experts: FastExperts, QuantLinear: FastQuantLinear, QuantExperts: FastQuantExperts,
         RMSNorm: FastRMSNorm}
REVERSE = {v: k for k, v in SWAPS.items()}


def accelerate(model: nn.Module, greedy_head: bool = True, decode_step: bool = True) -> nn.Module:
    """Swap in the fast classes (exact types only: parallel subclasses keep their own forward).

    Without kernels (no AVX2/FMA or no compiler) only the fp32-prefill rule for bf16 weights applies.
    With `greedy_head` and a head of at least GREEDY_HEAD_MIN_ELEMENTS, `model.greedy_head` is set to an
    exact int8-screened argmax (greedy_head.py) that temperature-0 generation uses instead of full logits.
    With `decode_step`, one-token steps on a batch-1 KVCache run all layers in one C call (fast_decode.py);
    `model.fast_decode_unavailable` says why not when the model does not qualify.
    """
    for m in model.modules():
        fast = SWAPS.get(type(m))
        if fast is not None:
            m.__class__ = fast
    head = getattr(model, "head_weight", None)
    if head is not None and "project" not in model.__dict__:  # a parallel plan's head stays its own
        project = lambda x: _project(model, x)  # noqa: E731
        project.fast = True
        model.project = project
        w = model.head_weight()
        if greedy_head and kernels.available() and w.numel() >= GREEDY_HEAD_MIN_ELEMENTS and w.device.type == "cpu":
            from .greedy_head import GreedyHead

            if getattr(model.__dict__.get("greedy_head"), "weight", None) is not w:
                model.greedy_head = GreedyHead(w)
    if decode_step and hasattr(model, "model"):
        from .fast_decode import install

        model.fast_decode_unavailable = install(model)  # None when installed
    return model


def is_accelerated(model: nn.Module) -> bool:
    """Whether `accelerate` swapped this model onto the fast path (and `reference` has not undone it)."""
    return bool(getattr(model.__dict__.get("project"), "fast", False))


def _project(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    w = model.head_weight()
    weights = _cached(model, "head", (w,), lambda: plain_weights(w))
    return kernel_linear(x, weights, lambda flat: prefill_linear(flat, w))


def reference(model: nn.Module) -> nn.Module:
    """Undo `accelerate`: the plain modules and head again."""
    for m in model.modules():
        plain = REVERSE.get(type(m))
        if plain is not None:
            m.__class__ = plain
            m.__dict__.pop("_kernel_weights", None)
    if getattr(model.__dict__.get("project"), "fast", False):
        del model.project
    model.__dict__.pop("greedy_head", None)
    model.__dict__.pop("fast_decode_unavailable", None)
    if hasattr(model, "model"):
        from .fast_decode import uninstall

        uninstall(model)
    model.__dict__.pop("_kernel_weights", None)
    return model
