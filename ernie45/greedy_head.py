"""Exact greedy token choice without reading the whole LM head in its own precision.

The head of a tied ERNIE 4.5 model is the embedding table (V x D: 103,424 x 1,024 on the bench model, more
than half of the bytes a decoded token reads). Greedy decoding only needs the argmax, so:
1. screen: approximate logits from an int8 copy of the head (per-row scale s_r = max|w_r| / 127, round
   to nearest, so every weight is off by at most s_r / 2). With the kernels, x is rounded to int8 too
   (x ~ sx * xq, off by at most sx / 2 per element) and a_r = s_r * sx * (q_r . xq) is an exact integer
   dot product (AVX2 maddubs: a quarter of the work of converting weights to float);
2. bound: |exact_r - a_r| <= b_r = s_r / 2 * ||x||_1 + s_r * sx / 2 * sum_k |q_rk| (the second term only
   when x was rounded), plus fp32 slack and, for bf16 heads, the rounding of the logit itself;
3. every row that can still be the maximum (a_r + b_r >= max(a - b)) is recomputed exactly, in the
   head's dtype, and the first maximal index among them wins — torch.argmax's tie rule over all rows.
The answer is the reference argmax (up to summation order inside a dot product); with more candidates
than MAX_CANDIDATES the full head runs instead. Costs V*D bytes of RAM for the int8 copy.

Shape legend: R rows to decode, V vocab, D hidden.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import kernels

MAX_CANDIDATES = 4096
FP32_SLACK = 1e-4  # relative slack for fp32 accumulation over D terms in the screen


class GreedyHead:
    """Argmax of `x @ weight^T` per row, screened through an int8 copy of `weight` [V, D].

    Reuses its screen buffers from call to call: one caller at a time (generation is single-threaded)."""

    def __init__(self, weight: torch.Tensor, chunk: int = 8192):
        self.weight = weight
        V, D = weight.shape
        self.q = torch.empty(V, D, dtype=torch.int8)
        self.scale = torch.empty(V)
        for start in range(0, V, chunk):  # chunks: never an fp32 copy of the whole head
            w = weight[start:start + chunk].float()
            s = (w.abs().amax(1) / 127).clamp(min=torch.finfo(torch.float32).tiny)
            self.q[start:start + chunk] = torch.round(w / s[:, None]).to(torch.int8)
            self.scale[start:start + chunk] = s
        self.integer = kernels.available() and D % 32 == 0
        exact_in_c = self.integer and weight.dtype in (torch.float32, torch.bfloat16) and weight.is_contiguous() \
            and weight.device.type == "cpu"
        self.rows = kernels.Weights(weight.dtype, weight.detach(), D) if exact_in_c else None  # no copy
        self._buffers = (torch.empty(V), torch.empty(V), torch.empty(V, dtype=torch.long)) if self.integer else None
        self.abs_q = self.q.abs().sum(1, dtype=torch.int32).float()  # [V] sum_k |q_rk|
        self.q_sum = self.q.sum(1, dtype=torch.int32)  # [V] sum_k q_rk (screen_rows' unsigned offset)
        self.full_heads = 0  # rows that fell back to the whole head (diagnostics)
        self._row_buffers: tuple[torch.Tensor, torch.Tensor] | None = None  # a, b of screen_rows

    @property
    def slack(self) -> float:
        """Relative slack of the bound: fp32 accumulation and, for a bf16 head, the reference's rounding of
        each logit."""
        return FP32_SLACK + (torch.finfo(self.weight.dtype).eps if self.weight.dtype != torch.float32 else 0.0)

    @property
    def in_c(self) -> bool:
        """Screen, candidates and exact rows all run in C (fast_decode's one-call greedy step can use it)."""
        return self.integer and self.rows is not None

    def screen(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
        """x [D] fp32 -> (approximate logits a [V], their error bound b [V], max(a - b)).

        b includes the fp32 slack and, for a bf16 head, the reference's rounding of each logit."""
        slack = self.slack
        l1_half = 0.5 * float(x.abs().sum())
        if not self.integer:
            a = F.linear(x, self.q.float()) * self.scale
            bound = self.scale * l1_half
            bound = bound + slack * (a.abs() + bound)
            return a, bound, float((a - bound).max())
        xq, sx = _round_int8(x)
        return kernels.head_screen(self.q, self.scale, self.abs_q, xq, sx, l1_half, slack,  # one pass in C
                                   out=self._buffers[:2])

    def screen_rows(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [R, D] fp32 (R <= kernels.SCREEN_RMAX, integer screen only) -> (a [R, V], b [R, V], floors [R]):
        `screen` of every row, reading the int8 head once for all of them."""
        R, V = x.shape[0], self.q.shape[0]
        rounded = [_round_int8(row) for row in x]  # row by row: the very values `screen` would use
        xq = torch.stack([q for q, _ in rounded])
        sx = torch.tensor([s for _, s in rounded], dtype=torch.float64)
        l1_half = torch.tensor([0.5 * float(row.abs().sum()) for row in x], dtype=torch.float64)
        if self._row_buffers is None or self._row_buffers[0].numel() < R * V:
            self._row_buffers = (torch.empty(R * V), torch.empty(R * V))
        return kernels.head_screen_rows(self.q, self.scale, self.abs_q, self.q_sum, xq, sx, l1_half, self.slack,
                                        out=self._row_buffers)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x [R, D] (normed hidden, model dtype) -> token ids [R] (int64). Several rows with the integer
        screen share one pass over the int8 head (a serving batch's greedy rows)."""
        x32 = x.float()
        out = torch.empty(x.shape[0], dtype=torch.long)
        if self.integer and x.shape[0] > 1:
            for start in range(0, x.shape[0], kernels.SCREEN_RMAX):
                rows = slice(start, start + kernels.SCREEN_RMAX)
                a, bound, floors = self.screen_rows(x32[rows])
                if self.rows is not None:  # candidates and exact rows in C, the rows spread over the threads
                    out[rows] = kernels.head_pick_rows(a, bound, floors, self.rows, x[rows], MAX_CANDIDATES)
                    for i in (out[rows] < 0).nonzero().flatten().tolist():  # too many could win
                        out[start + i] = self.full(x[start + i])
                    continue
                for i in range(a.shape[0]):
                    out[start + i] = self._pick(x[start + i], a[i], bound[i], float(floors[i]))
            return out
        for r in range(x.shape[0]):
            a, bound, floor = self.screen(x32[r])  # [V], [V], the lowest value the winner can have
            out[r] = self._pick(x[r], a, bound, floor)
        return out

    def _pick(self, x: torch.Tensor, a: torch.Tensor, bound: torch.Tensor, floor: float) -> int:
        """The winning row for one x [D] (model dtype) from its screen: the candidates' exact logits."""
        cand = kernels.head_candidates(a, bound, floor, out=self._buffers[2]) if self.integer \
            else torch.nonzero(a + bound >= floor).flatten()  # ascending row ids
        if cand.numel() > MAX_CANDIDATES:
            return self.full(x)
        if self.rows is not None:  # the same logits (rounded to the head dtype) in C, no row gather
            return kernels.head_exact(self.rows, cand, x)
        exact = F.linear(x, self.weight[cand])  # [C] in the head dtype, as the reference rounds
        return int(cand[torch.argmax(exact)])

    def full(self, x: torch.Tensor) -> int:
        """The whole head's argmax for x [D], where too many rows could win the screen."""
        self.full_heads += 1
        return int(torch.argmax(F.linear(x, self.weight)))


def _round_int8(x: torch.Tensor) -> tuple[torch.Tensor, float]:
    """x [D] fp32 -> (xq [D] int8, sx): x ~ sx * xq, |xq| <= 127, round to nearest (sx 1.0 for x = 0)."""
    sx = float(x.abs().max()) / 127 or 1.0
    return torch.round(x / sx).clamp(-127, 127).to(torch.int8), sx
