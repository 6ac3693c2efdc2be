"""GPTQ: quantize a weight column by column, pushing each column's rounding error onto the columns not
yet quantized, weighted by the inverse Hessian of the layer's inputs (Frantar et al., 2022).

For a linear y = x W^T with calibration inputs X [M, K], the output error of a quantized W' is
tr((W - W') H (W - W')^T) with H = X^T X [K, K]. Rounding column j leaves an error e_j; the remaining
columns absorb -e_j * Hinv[j, j+1:] / Hinv[j, j], the least-squares optimal correction. We use the
upper Cholesky factor U of H^-1 (so each step is one row of U) and lazy batched updates over blocks
of 128 columns.

Choices:
- Static groups: every group's scale and zero are the round-to-nearest ones (min/max of the original
  weights), fixed *before* the column sweep. With the grid fixed, columns can be processed in
  descending diag(H) order ("act order") while the stored layout keeps groups contiguous. A clipping
  search (shrinking each group's range to minimise its diag(H)-weighted rounding error) was tried and
  dropped: it lowered layer output errors but raised the perplexity of the bench's tiny trained model
  under int2 and mixed-2bit, the clipped large weights mattering on inputs calibration did not cover.
- Damping: H + 1% of its mean diagonal (x10 on a failed Cholesky). Columns that never saw a non-zero
  input get H[j, j] = 1 (they are then plain round-to-nearest).
- MoE experts get one Hessian per expert from the tokens routed to it (gate and up share theirs; down's
  comes from that expert's SwiGLU activations). An expert with fewer than `min_tokens` calibration
  tokens is quantized round-to-nearest: a Hessian of a handful of tokens overfits them.

Shape legend: N out features, K in features, M calibration rows, G groups per row, E experts.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import nn

from ..moe import Experts
from .formats import (QuantFormat, QuantizedWeight, codes_of, encode, expand, minmax_params, quantize_rtn,
                      values_of)

DEFAULT_MIN_TOKENS = 16


class Hessian:
    """Running sum H = sum_m x_m x_m^T [K, K] and the row count. fp32: routed experts need E of these
    per projection at once (300B: 64 x 8192^2), and GPTQ factorises in fp64 anyway."""

    def __init__(self, dim: int):
        self.h = torch.zeros(dim, dim, dtype=torch.float32)
        self.rows = 0

    def add(self, x: torch.Tensor) -> None:  # x [..., K]
        x = x.reshape(-1, x.shape[-1]).float()
        self.h.addmm_(x.T, x)
        self.rows += x.shape[0]


class ExpertHessians:
    """Per-expert Hessians of one `moe.Experts`: `gate_up[e]` [D, D] and `down[e]` [F, F]."""

    def __init__(self, experts: Experts):
        self.experts = experts
        E, F_, D = experts.gate_proj.shape
        self.gate_up = [Hessian(D) for _ in range(E)]
        self.down = [Hessian(F_) for _ in range(E)]

    def add(self, x: torch.Tensor, idx: torch.Tensor) -> None:  # x [T, D], idx [T, K]
        ex = self.experts
        for e in idx.unique().tolist():
            rows = x[(idx == e).any(-1)]  # [n, D] tokens routed to e
            self.gate_up[e].add(rows)
            w_g, w_u = ex.gate_proj[e].to(rows.dtype), ex.up_proj[e].to(rows.dtype)
            self.down[e].add(ex.act(rows @ w_g.T) * (rows @ w_u.T))  # [n, F]


@torch.no_grad()
def collect_hessians(unit: nn.Module, names: Iterable[str], forward: Callable[[], None]) -> dict[str, object]:
    """Run `forward()` once with hooks that accumulate the inputs of the named submodules of `unit`.

    names: nn.Linear or moe.Experts submodule names -> {name: Hessian | ExpertHessians}.
    """
    found, hooks = {}, []
    for name in names:
        m = unit.get_submodule(name)
        if isinstance(m, nn.Linear):
            acc = found[name] = Hessian(m.in_features)
            hooks.append(m.register_forward_pre_hook(lambda _m, args, acc=acc: acc.add(args[0])))
        elif isinstance(m, Experts):
            acc = found[name] = ExpertHessians(m)
            hooks.append(m.register_forward_pre_hook(lambda _m, args, acc=acc: acc.add(args[0], args[2])))
        else:
            raise TypeError(f"{name} is a {type(m).__name__}; GPTQ collects inputs of nn.Linear and Experts only")
    try:
        forward()
    finally:
        for h in hooks:
            h.remove()
    return found


def _inverse_cholesky(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp * mean(diag H) * I)^-1, increasing damping until it factors."""
    eye = torch.eye(h.shape[0], dtype=h.dtype)
    mean = h.diagonal().mean().clamp(min=1e-12)
    for attempt in range(6):
        L, info = torch.linalg.cholesky_ex(h + eye * (damp * 10**attempt) * mean)
        if info == 0:
            return torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)
    raise RuntimeError("the calibration Hessian is not positive definite even with heavy damping; "
                       "give more calibration tokens")


@torch.no_grad()
def gptq_quantize(w: torch.Tensor, h: torch.Tensor, fmt: QuantFormat, group: int, damp: float = 0.01,
                  block: int = 128, act_order: bool = True) -> QuantizedWeight:
    """w [N, K], h [K, K] (sum of x x^T) -> QuantizedWeight with GPTQ-chosen codes (int8/int4/int2)."""
    if fmt.float8:
        raise ValueError("GPTQ is for the integer formats; fp8 is round-to-nearest")
    w = w.float().clone()
    N, K = w.shape
    h = h.double().clone()
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    s, z = minmax_params(w, fmt, group)  # [N, G] static groups: the round-to-nearest grid
    S, Z = expand(s, group), expand(z, group)  # [N, K]
    perm = torch.argsort(h.diagonal(), descending=True) if act_order else torch.arange(K)
    w, S, Z, h = w[:, perm], S[:, perm], Z[:, perm], h[perm][:, perm]
    U = _inverse_cholesky(h, damp).float()  # [K, K] upper
    codes = torch.empty_like(w)
    for b0 in range(0, K, block):
        b1 = min(b0 + block, K)
        wb, errs = w[:, b0:b1].clone(), torch.empty(N, b1 - b0)
        for i in range(b1 - b0):
            j = b0 + i
            c = codes_of(wb[:, i], S[:, j], Z[:, j], fmt)
            codes[:, j] = c
            err = (wb[:, i] - values_of(c, S[:, j], Z[:, j], fmt)) / U[j, j]  # [N]
            wb[:, i:] -= err[:, None] * U[j, j:b1][None, :]
            errs[:, i] = err
        w[:, b1:] -= errs @ U[b0:b1, b1:]
    return encode(codes[:, torch.argsort(perm)], s, z, fmt, group, K)


def quantize_experts_gptq(w: torch.Tensor, hessians: list[Hessian], fmt: QuantFormat, group: int,
                          min_tokens: int = DEFAULT_MIN_TOKENS) -> tuple[QuantizedWeight, list[int]]:
    """Stacked w [E, N, K] with one Hessian per expert -> (stacked QuantizedWeight, experts done by RTN)."""
    parts, rtn = [], []
    for e, hess in enumerate(hessians):
        if hess.rows < min_tokens:
            rtn.append(e)
            parts.append(quantize_rtn(w[e], fmt, group))
        else:
            parts.append(gptq_quantize(w[e], hess.h, fmt, group))
    stacked = {n: torch.stack([getattr(p, n) for p in parts]) for n in parts[0].tensors()}
    return QuantizedWeight(fmt, group, w.shape[-1], **stacked), rtn


def output_error(w: torch.Tensor, w_q: torch.Tensor, h: torch.Tensor) -> float:
    """Relative output error tr(dW H dW^T) / tr(W H W^T) of a quantized weight on inputs with Hessian h."""
    dw, h = (w - w_q).double(), h.double()
    return float(((dw @ h) * dw).sum() / ((w.double() @ h) * w.double()).sum())
