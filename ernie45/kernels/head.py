"""Calls into head.c: the exact greedy head's integer screen (one row or several), its candidate rows
and their exact logits (ernie45/greedy_head.py builds the head from these; `kernels` re-exports them).

Shapes: N head rows (the vocabulary), K hidden, R activation rows screened together.
"""

from __future__ import annotations

import ctypes

import torch
import torch.nn.functional as F

from . import Weights, _ptr, _require

def head_screen(q: torch.Tensor, scale: torch.Tensor, abs_q: torch.Tensor, xq: torch.Tensor, sx: float,
                l1_half: float, slack: float, out: tuple[torch.Tensor, torch.Tensor] | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Screened logits of an int8 head q [N, K] (scale [N], sum |q| per row abs_q [N]) for the int8
    activation xq [K] (scale sx): (a [N], bound b [N], max(a - b)) as gemv.c's ernie45_head_screen
    defines them (l1_half = ||x||_1 / 2; slack: relative fp32 slack). K % 32 == 0. `out`: reusable a, b
    (a fresh 400 KB buffer per token costs its page faults)."""
    N, K = q.shape
    a, b = out if out is not None else (torch.empty(N), torch.empty(N))
    floor = _require().ernie45_head_screen(_ptr(q), ctypes.c_long(q.stride(0)), _ptr(scale), _ptr(abs_q), _ptr(xq),
                                           ctypes.c_float(sx), ctypes.c_float(l1_half), ctypes.c_float(sx / 2),
                                           ctypes.c_float(slack), K, N, _ptr(a), _ptr(b), torch.get_num_threads())
    return a, b, float(floor)


SCREEN_RMAX = 64  # head.c's SCREEN_RMAX
SCREEN_TILE = 8  # head.c's SCREEN_TILE


def head_screen_rows(q: torch.Tensor, scale: torch.Tensor, abs_q: torch.Tensor, q_sum: torch.Tensor,
                     xq: torch.Tensor, sx: torch.Tensor, l1_half: torch.Tensor, slack: float,
                     out: tuple[torch.Tensor, torch.Tensor] | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """head_screen for R activation rows xq [R, K] (scales sx [R], l1_half [R]) in one pass over the int8
    head (q_sum [N] int32: each head row's sum of codes): (a [R, N], b [R, N], floors [R]), each row
    bit-identical to head_screen on it alone. R <= SCREEN_RMAX. `out`: reusable a, b of at least R * N
    elements."""
    N, K = q.shape
    R = xq.shape[0]
    if R > SCREEN_RMAX:
        raise ValueError(f"head_screen_rows takes at most {SCREEN_RMAX} rows, got {R}")
    a, b = (o.view(-1)[:R * N].view(R, N) for o in out) if out is not None else torch.empty(2, R, N)
    floors = torch.empty(R)
    xq = F.pad(xq, (0, 0, 0, -R % SCREEN_TILE))  # head.c sums whole tiles of rows; zero rows pad the last
    axq = xq.abs()  # |xq| <= 127 fits int8; head.c reads it as unsigned bytes (AVX2 build)
    ux = (xq.to(torch.int16) + 128).to(torch.uint8)  # xq + 128, unsigned (VNNI build)
    sx32, l1 = sx.float().contiguous(), l1_half.float().contiguous()
    half = (sx32 / 2).contiguous()
    _require().ernie45_head_screen_rows(_ptr(q), ctypes.c_long(q.stride(0)), _ptr(scale), _ptr(abs_q), _ptr(q_sum),
                                        _ptr(xq), _ptr(axq), _ptr(ux), _ptr(sx32), _ptr(l1), _ptr(half),
                                        ctypes.c_float(slack), K, N, R, _ptr(a), _ptr(b), _ptr(floors),
                                        torch.get_num_threads())
    return a, b, floors


def head_pick_rows(a: torch.Tensor, b: torch.Tensor, floors: torch.Tensor, w: Weights, x: torch.Tensor,
                   max_candidates: int) -> torch.Tensor:
    """Per row r of a screened batch (a, b [R, N], floors [R] from head_screen_rows): head_candidates and
    head_exact on the fp32/bf16 head w for x[r] (x [R, K]), rows spread over the threads -> token ids [R]
    (int64), -1 where more than max_candidates rows could win."""
    R, N = a.shape
    x = x.float().contiguous()
    tokens = torch.empty(R, dtype=torch.long)
    idx = torch.empty(torch.get_num_threads() * N, dtype=torch.long)
    _require().ernie45_head_pick_rows(_ptr(a), _ptr(b), _ptr(floors.contiguous()), R, N,
                                      ctypes.c_void_p(w.data.data_ptr()), ctypes.c_long(w.view.ld), w.kind, _ptr(x),
                                      x.shape[1], ctypes.c_long(max_candidates), _ptr(idx), _ptr(tokens),
                                      torch.get_num_threads())
    return tokens


def head_candidates(a: torch.Tensor, b: torch.Tensor, floor: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """Ascending row ids n with a[n] + b[n] >= floor (int64), as torch.nonzero would give them; `out`: a
    reusable int64 buffer of a's size."""
    idx = out if out is not None else torch.empty(a.numel(), dtype=torch.long)
    count = _require().ernie45_head_candidates(_ptr(a), _ptr(b), ctypes.c_float(floor), a.numel(), _ptr(idx))
    return idx[:count]


def head_exact(w: Weights, idx: torch.Tensor, x: torch.Tensor) -> int:
    """The first of rows idx (ascending int64) of the fp32/bf16 head w with the largest logit x . w_row,
    logits rounded to bf16 first for a bf16 head; torch.argmax(F.linear(x, w[idx])) up to dot order."""
    x = x.float().contiguous()
    return int(_require().ernie45_head_exact(ctypes.c_void_p(w.data.data_ptr()), ctypes.c_long(w.view.ld), w.kind,
                                             _ptr(idx), ctypes.c_long(idx.numel()), _ptr(x), x.numel(),
                                             torch.get_num_threads()))
