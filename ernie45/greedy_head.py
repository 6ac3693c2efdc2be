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
        self.full_heads = 0  # rows that fell back to the whole head (diagnostics)

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
        sx = float(x.abs().max()) / 127 or 1.0
        xq = torch.round(x / sx).clamp(-127, 127).to(torch.int8)
        return kernels.head_screen(self.q, self.scale, self.abs_q, xq, sx, l1_half, slack,  # one pass in C
                                   out=self._buffers[:2])

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x [R, D] (normed hidden, model dtype) -> token ids [R] (int64)."""
        x32 = x.float()
        out = torch.empty(x.shape[0], dtype=torch.long)
        for r in range(x.shape[0]):
            a, bound, floor = self.screen(x32[r])  # [V], [V], the lowest value the winner can have
            cand = kernels.head_candidates(a, bound, floor, out=self._buffers[2]) if self.integer \
                else torch.nonzero(a + bound >= floor).flatten()  # ascending row ids
            if cand.numel() > MAX_CANDIDATES:
                self.full_heads += 1
                out[r] = torch.argmax(F.linear(x[r], self.weight))
                continue
            if self.rows is not None:  # the same logits (rounded to the head dtype) in C, no row gather
                out[r] = kernels.head_exact(self.rows, cand, x[r])
                continue
            exact = F.linear(x[r], self.weight[cand])  # [C] in the head dtype, as the reference rounds
            out[r] = cand[torch.argmax(exact)]
        return out
