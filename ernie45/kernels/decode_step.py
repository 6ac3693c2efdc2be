"""Calls into decode.c: the one-call batch-1 decode step (with or without the greedy head), the paged
decode attention of a serving step, and the one-row RMSNorm (`kernels` re-exports them).

Shapes: D hidden, N query rows, Nq/Nkv heads, Dh head dim.
"""

from __future__ import annotations

import ctypes

import torch

from . import DECODE_PHASES, _ptr, _require


class ModelT(ctypes.Structure):  # decode.c's model_t
    _fields_ = [("D", ctypes.c_int), ("Nq", ctypes.c_int), ("Nkv", ctypes.c_int), ("Dh", ctypes.c_int),
                ("layers", ctypes.c_int), ("bf16", ctypes.c_int), ("max_f", ctypes.c_int), ("max_h", ctypes.c_int),
                ("eps", ctypes.c_float), ("norm_min", ctypes.c_float), ("scale", ctypes.c_float)]


def decode(model_t, layers, x: torch.Tensor, pos: int, cos: torch.Tensor, sin: torch.Tensor,
           scratch: torch.Tensor, prof: torch.Tensor | None = None) -> None:
    """One token through every layer described by `layers` (fast_decode.py builds them); x [D] in place.

    prof: float64 [len(DECODE_PHASES)] or None; when given, each phase's wall seconds (summed over layers,
    as thread 0 sees them between barriers) are added to it."""
    if prof is not None and (prof.dtype != torch.float64 or prof.numel() != len(DECODE_PHASES)):
        raise ValueError(f"prof must be float64 [{len(DECODE_PHASES)}] (kernels.DECODE_PHASES)")
    _require().ernie45_decode(model_t, layers, _ptr(x), int(pos), _ptr(cos), _ptr(sin), _ptr(scratch),
                              torch.get_num_threads(), None if prof is None else _ptr(prof))


def greedy_step(model_t, layers, x: torch.Tensor, pos: int, cos: torch.Tensor, sin: torch.Tensor,
                scratch: torch.Tensor, prof: torch.Tensor | None, norm_weight: torch.Tensor, xn: torch.Tensor,
                xq: torch.Tensor, head, slack: float, max_candidates: int) -> int:
    """`decode`, then the final RMSNorm into xn [D] (fp32) and the exact greedy head `head` (a
    greedy_head.GreedyHead with C rows; xq [D] int8 scratch) in the same call: the token id, or -1 when
    more than max_candidates rows could win (run the full head on xn then)."""
    V = head.q.shape[0]
    a, b, idx = head._buffers
    return int(_require().ernie45_greedy_step(
        model_t, layers, _ptr(x), int(pos), _ptr(cos), _ptr(sin), _ptr(scratch), torch.get_num_threads(),
        None if prof is None else _ptr(prof), _ptr(norm_weight), _ptr(xn), _ptr(xq), _ptr(head.q),
        ctypes.c_long(head.q.stride(0)), _ptr(head.scale), _ptr(head.abs_q), V, ctypes.c_float(slack),
        ctypes.c_void_p(head.rows.data.data_ptr()), ctypes.c_long(head.rows.view.ld), head.rows.kind, _ptr(a), _ptr(b),
        _ptr(idx), ctypes.c_long(max_candidates)))


def paged_attention(k_rows: torch.Tensor, v_rows: torch.Tensor, tables: torch.Tensor, block_size: int,
                    seq: torch.Tensor, pos: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """One query token per row attending its sequence's positions 0..pos through a paged K/V pool:
    q [N, Nq, Dh] (fp32 or bf16), one layer's k_rows/v_rows [slots, Nkv, Dh] in q's dtype (this step's K/V
    already written), tables [R, MB] block ids per sequence, seq [N] each row's sequence, pos [N] its
    position -> [N, Nq, Dh] in q's dtype: attention.attend_gqa's result up to summation order (the math
    of the one-call decode step, decode.c: attend_head). Dh % 8 == 0."""
    N, Nq, Dh = q.shape
    Nkv = k_rows.shape[1]
    bf16 = q.dtype == torch.bfloat16
    if q.dtype not in (torch.float32, torch.bfloat16) or k_rows.dtype != q.dtype or v_rows.dtype != q.dtype:
        raise ValueError(f"paged_attention takes fp32 or bf16 q and K/V of the same dtype, got {q.dtype}, "
                         f"{k_rows.dtype}, {v_rows.dtype}")
    m = ModelT(0, Nq, Nkv, Dh, 0, int(bf16), 0, 0, 0.0, 0.0, Dh ** -0.5)
    q32, out = q.float().contiguous(), torch.empty(N, Nq * Dh)
    tables, seq, pos = (t.to(torch.long).contiguous() for t in (tables, seq, pos))
    threads = torch.get_num_threads()
    max_pos = int(pos.max())
    sc = torch.empty(threads * (max_pos + 1))
    _require().ernie45_paged_attention(ctypes.byref(m), _ptr(k_rows), _ptr(v_rows), _ptr(tables), tables.shape[1],
                                       block_size, _ptr(seq), _ptr(pos), N, _ptr(q32), _ptr(out), _ptr(sc), max_pos,
                                       threads)
    return out.view(N, Nq, Dh).to(q.dtype)


def rms_norm(weight: torch.Tensor, x: torch.Tensor, eps: float) -> torch.Tensor:
    """layers.RMSNorm of one row x [D] with weight [D] (both fp32 or both bf16) -> [D] in that dtype."""
    bf16 = weight.dtype == torch.bfloat16
    x32 = x.float().contiguous()
    out = torch.empty(x32.numel())
    _require().ernie45_rms_norm(_ptr(weight), _ptr(x32), x32.numel(), ctypes.c_float(eps), int(bf16), _ptr(out))
    return out.to(weight.dtype)
