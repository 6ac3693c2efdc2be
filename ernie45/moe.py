"""The ERNIE 4.5 MoE block: fp32 router, bias-for-selection, stacked experts, unweighted shared experts.

Routing (spec §2.7), all in fp32 regardless of the model dtype:
    p   = softmax(x W_g^T)                       # [T, E]
    idx = topk(p + e_score_correction_bias, K)   # the bias only *selects*
    w   = gather(p, idx) / max(sum_k, moe_norm_min)   # unbiased, renormalised; then cast to x.dtype
Experts are stored stacked (`experts.gate_proj` [E,F,D] etc.; the checkpoint's per-expert tensors are
stacked by the name table in weights.py). Tokens are grouped by expert so each selected expert runs one
matmul over all its tokens; contributions are summed in ascending expert id, in the activation dtype,
after scaling by w — the order of the transformers reference. The shared experts are one SwiGLU MLP of
width F * n_shared, added without a gate.

Shape legend: T tokens, E experts, K top-k, D hidden, F expert width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .layers import ACTIVATIONS, MLP


class Router(nn.Module):
    """`mlp.gate.weight` [E, D], kept in fp32."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(cfg.moe_num_experts, cfg.hidden_size, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, D] -> probabilities [T, E] fp32
        # Autocast off: under bf16 autocast F.linear would run (and return) bf16, breaking fp32 routing.
        with torch.autocast(x.device.type, enabled=False):
            return torch.softmax(F.linear(x.float(), self.weight.float()), dim=-1)


class MoeStatics(nn.Module):
    """`mlp.moe_statics.e_score_correction_bias` [1, E] fp32: aux-loss-free balancing bias."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.e_score_correction_bias = nn.Parameter(torch.zeros(1, cfg.moe_num_experts, dtype=torch.float32),
                                                    requires_grad=False)


def select_experts(probs: torch.Tensor, bias: torch.Tensor, k: int,
                   norm_min: float) -> tuple[torch.Tensor, torch.Tensor]:
    """probs [T,E] fp32, bias [E] -> (weights [T,K] fp32 renormalised, idx [T,K]); bias selects only."""
    idx = torch.topk(probs + bias.float(), k, dim=-1).indices  # [T, K]
    w = probs.gather(-1, idx)  # [T, K] unbiased
    return w / w.sum(-1, keepdim=True).clamp(min=norm_min), idx


class Experts(nn.Module):
    """E SwiGLU experts stacked: gate_proj/up_proj [E,F,D], down_proj [E,D,F]."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        E, F_, D = cfg.moe_num_experts, cfg.moe_intermediate_size, cfg.hidden_size
        self.gate_proj = nn.Parameter(torch.empty(E, F_, D))
        self.up_proj = nn.Parameter(torch.empty(E, F_, D))
        self.down_proj = nn.Parameter(torch.empty(E, D, F_))
        self.act = ACTIVATIONS[cfg.hidden_act]

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:  # [n, D] -> [n, D]
        return F.linear(self.act(F.linear(x, self.gate_proj[e])) * F.linear(x, self.up_proj[e]), self.down_proj[e])

    def forward(self, x: torch.Tensor, w: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """x [T,D], w [T,K] (x.dtype), idx [T,K] -> sum_k w_k * E_idx_k(x)  [T,D]"""
        token = torch.arange(x.shape[0], device=x.device).repeat_interleave(idx.shape[1])  # [T*K]
        return self.grouped(x, token, idx.flatten(), w.flatten())

    def grouped(self, x: torch.Tensor, token: torch.Tensor, expert: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """Sum over (token, expert, weight) pairs [P] of weight * E_expert(x[token]) -> [T, D].

        Expert ids index this module's stacked tensors. Pairs are grouped by expert (stable sort, so
        ascending token within an expert) and each expert runs once on all of its tokens.
        """
        order = torch.argsort(expert, stable=True)  # [P]
        token, weight = token[order], weight[order]
        counts = torch.bincount(expert, minlength=self.gate_proj.shape[0]).tolist()
        out = torch.zeros_like(x)
        start = 0
        for e, n in enumerate(counts):  # loop over experts that received tokens, never over tokens
            if n:
                rows = slice(start, start + n)
                out.index_add_(0, token[rows], self.expert(e, x[token[rows]]) * weight[rows, None])
                start += n
        return out


class SparseMoeBlock(nn.Module):
    """`mlp` of an MoE layer: `gate`, `moe_statics`, `experts`, optional `shared_experts`."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.k, self.norm_min = cfg.moe_k, cfg.moe_norm_min
        self.gate = Router(cfg)
        self.moe_statics = MoeStatics(cfg)
        self.experts = Experts(cfg)
        self.shared_experts = (MLP(cfg.hidden_size, cfg.shared_intermediate_size, cfg.hidden_act)
                               if cfg.moe_num_shared_experts > 0 else None)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [T,D] -> (probs [T,E] fp32, weights [T,K] in x.dtype, idx [T,K])."""
        probs = self.gate(x)
        w, idx = select_experts(probs, self.moe_statics.e_score_correction_bias[0], self.k, self.norm_min)
        return probs, w.to(x.dtype), idx

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B,T,D] -> [B,T,D]
        flat = x.reshape(-1, x.shape[-1])  # [T, D]
        _, w, idx = self.route(flat)
        out = self.experts(flat, w, idx)
        if self.shared_experts is not None:
            out = out + self.shared_experts(flat)
        return out.view_as(x)
