"""Rows of selected experts without a host round trip: y[p] = W[ids[p]] x[p], for CUDA graphs.

A decode step on a GPU is launch- and sync-bound unless it is captured once in a CUDA graph and replayed;
a graph cannot branch on which experts the router picked, so the expert matmuls must take the expert ids
as a device tensor. `expert_rows` does that for stacked bf16/fp32 weights [E, N, K] and for the int4
format of quant/formats.py (codes [E, N, K/2], scales/zeros [E, N, K/g]) without dequantizing a whole
expert: a Triton kernel where Triton runs (CUDA, or its CPU interpreter under `TRITON_INTERPRET=1`), and
a torch gather of the selected experts elsewhere (`expert_rows_reference`, also the kernel's test oracle).

Numerics are the reference modules': an int4 weight is dequantized as z + (q - 8) * s in fp32 (exact
product, one rounding), rounded to the activation dtype like `QuantWeight.matmul`'s reference route, and
every product is accumulated in fp32 with the output rounded once to x's dtype, as a bf16 GEMM does.

Shapes: P (token, expert) pairs, E experts, N out features, K in features, G = K / group.
"""

from __future__ import annotations

import os

import torch

try:  # optional: the GPU image has it; CPU installs need not
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the environment
    triton = None


def triton_usable(device: torch.device) -> bool:
    """Whether the Triton kernel can run on tensors of `device` here."""
    if triton is None:
        return False
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def expert_rows_reference(x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor, scales: torch.Tensor | None = None,
                          zeros: torch.Tensor | None = None, group: int = 0) -> torch.Tensor:
    """x [P, K], ids [P] -> [P, N] in x.dtype, by gathering the P selected experts (a copy of each)."""
    if scales is None:
        sel = w[ids].to(x.dtype)  # [P, N, K]
    else:  # the stored format's own dequantize on the gathered experts (fp32), rounded to x's dtype
        from ..quant.formats import QuantizedWeight, dequantize, get_format

        K = x.shape[-1]
        sel = dequantize(QuantizedWeight(get_format("int4"), group, K, w[ids], scales[ids], zeros[ids])).to(x.dtype)
    return torch.einsum("pnk,pk->pn", sel.float(), x.float()).to(x.dtype)


if triton is not None:

    @triton.jit
    def _round_bf16(w):
        """fp32 -> the nearest bf16 (ties to even), still fp32: bit arithmetic, so every backend (Triton's
        CPU interpreter truncates in .to(bfloat16)) rounds as torch does. Finite values only."""
        u = w.to(tl.uint32, bitcast=True)
        u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
        return u.to(tl.float32, bitcast=True)

    @triton.jit
    def _rows_kernel(x_ptr, w_ptr, s_ptr, z_ptr, ids_ptr, y_ptr, N, stride_we, stride_wn, stride_se, stride_sn,
                     K: tl.constexpr, INT4: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ROUND_BF16: tl.constexpr):
        """One program: BLOCK_N output rows of pair p. INT4: BLOCK_K = the group (one scale per row).
        K is a compile-time constant (a model has two or three in-feature sizes: few compilations)."""
        p = tl.program_id(0)
        rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        live = rows < N
        e = tl.load(ids_ptr + p).to(tl.int64)
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            xk = tl.load(x_ptr + p * K + k0 + tl.arange(0, BLOCK_K)).to(tl.float32)
            if INT4:
                cols = k0 // 2 + tl.arange(0, BLOCK_K // 2)
                b = tl.load(w_ptr + e * stride_we + rows[:, None] * stride_wn + cols[None, :], mask=live[:, None],
                            other=0)
                q = tl.join(b & 15, b >> 4).reshape(BLOCK_N, BLOCK_K).to(tl.float32)  # low nibble first
                g = k0 // BLOCK_K
                s = tl.load(s_ptr + e * stride_se + rows * stride_sn + g, mask=live, other=0).to(tl.float32)
                z = tl.load(z_ptr + e * stride_se + rows * stride_sn + g, mask=live, other=0).to(tl.float32)
                w = (q - 8.0) * s[:, None] + z[:, None]
                if ROUND_BF16:
                    w = _round_bf16(w)
            else:
                cols = k0 + tl.arange(0, BLOCK_K)
                w = tl.load(w_ptr + e * stride_we + rows[:, None] * stride_wn + cols[None, :], mask=live[:, None],
                            other=0).to(tl.float32)
                if ROUND_BF16:  # fp32 weights meet bf16 activations as the reference's w.to(x.dtype)
                    w = _round_bf16(w)
            acc += tl.sum(w * xk[None, :], axis=1)
        tl.store(y_ptr + p * N + rows, acc, mask=live)  # fp32; rounded by torch (nearest even) after


def expert_rows(x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor, scales: torch.Tensor | None = None,
                zeros: torch.Tensor | None = None, group: int = 0, block_n: int = 32) -> torch.Tensor:
    """y [P, N] = W[ids[p]] @ x[p] for x [P, K] and ids [P] (device int tensor: no host sync).

    w: float [E, N, K], or int4 codes uint8 [E, N, K/2] with scales/zeros [E, N, K/group]. The Triton
    kernel needs K % 64 == 0 (float) or K % group == 0 with group a power of two (int4); other shapes
    and devices take `expert_rows_reference`.
    """
    int4 = scales is not None
    P, K = x.shape
    N = w.shape[1]
    block_k = group if int4 else 64
    if not triton_usable(x.device) or K % block_k or block_k & (block_k - 1):
        return expert_rows_reference(x, ids, w, scales, zeros, group)
    x = x.contiguous()
    y = torch.empty(P, N, dtype=torch.float32, device=x.device)
    s = scales if int4 else w  # unused pointers when not int4
    z = zeros if int4 else w
    grid = (P, triton.cdiv(N, block_n))
    _rows_kernel[grid](x, w, s, z, ids.contiguous(), y, N, w.stride(0), w.stride(1), s.stride(0) if int4 else 0,
                       s.stride(1) if int4 else 0, K=K, INT4=int4, BLOCK_N=block_n, BLOCK_K=block_k,
                       ROUND_BF16=x.dtype == torch.bfloat16)
    return y.to(x.dtype)
