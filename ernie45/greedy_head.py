"""Exact greedy token choice without reading the whole LM head in its own precision.

The head of a tied ERNIE 4.5 model is the embedding table (V x D: 103,424 x 1,024 on the bench model, more
than half of the bytes a decoded token reads). Greedy decoding only needs the argmax, so:
1. screen: approximate logits a = x . q_r * s_r from an int8 copy of the head (per-row scale
   s_r = max|w_r| / 127, round to nearest, so every weight is off by at most s_r / 2);
2. bound: |exact_r - a_r| <= b_r = s_r / 2 * ||x||_1 (plus fp32 accumulation slack and, for bf16 heads,
   the rounding of the logit itself);
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
    """Argmax of `x @ weight^T` per row, screened through an int8 copy of `weight` [V, D]."""

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
        self.screen = kernels.Weights("int8", self.q, D, self.scale) if kernels.available() else None
        self.full_heads = 0  # rows that fell back to the whole head (diagnostics)

    def approx(self, x: torch.Tensor) -> torch.Tensor:  # [R, D] fp32 -> [R, V]
        if self.screen is not None:
            return kernels.gemv(self.screen, x)
        return F.linear(x, self.q.float()) * self.scale

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x [R, D] (normed hidden, model dtype) -> token ids [R] (int64)."""
        x32 = x.float()
        a = self.approx(x32)  # [R, V]
        bound = self.scale * (0.5 * x32.abs().sum(-1, keepdim=True))  # [R, V]
        bound = bound + FP32_SLACK * (a.abs() + bound)
        if self.weight.dtype != torch.float32:  # the reference rounds each logit to the head dtype
            bound = bound + (a.abs() + bound) * torch.finfo(self.weight.dtype).eps
        out = torch.empty(x.shape[0], dtype=torch.long)
        for r in range(x.shape[0]):
            floor = (a[r] - bound[r]).max()
            cand = torch.nonzero(a[r] + bound[r] >= floor).flatten()  # ascending row ids
            if cand.numel() > MAX_CANDIDATES:
                self.full_heads += 1
                out[r] = torch.argmax(F.linear(x[r], self.weight))
                continue
            exact = F.linear(x[r], self.weight[cand])  # [C] in the head dtype, as the reference rounds
            out[r] = cand[torch.argmax(exact)]
        return out
