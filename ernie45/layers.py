"""Stateless numerics shared by every ERNIE 4.5 layer: RMSNorm, interleaved RoPE, the SwiGLU MLP.

Precision choices follow the transformers reference exactly (spec §2.3, §2.5):
- RMSNorm computes the variance in fp32, casts the normalised value back to the input dtype and only
  then multiplies by the weight (so bf16 results match eager transformers bit for bit).
- RoPE is *interleaved*: it rotates adjacent pairs (2i, 2i+1) of the whole head, with angles and the
  rotation in fp32. The `-PT` q/k weights are not permuted, so NeoX-style "rotate_half" would be wrong.

Shape legend: B batch, T tokens, N heads, Dh head_dim, D hidden, F MLP width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu, "relu": F.relu}


class RMSNorm(nn.Module):
    """y = w * cast(x * rsqrt(mean(x^2) + eps)); the parameter is named ``weight`` as in checkpoints."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


def rope_inv_freq(head_dim: int, theta: float) -> torch.Tensor:
    """inv_freq_i = theta^(-2i/Dh) in fp32, i = 0..Dh/2-1.  # [Dh/2]"""
    # Explicit CPU: under a meta-device build, meta arithmetic would import torch._dynamo (seconds).
    exponent = torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim
    return 1.0 / (theta ** exponent)


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 cos/sin per position, each pair's angle repeated twice for the interleaved layout.

    positions: [B, T] int -> cos, sin: [B, T, Dh]
    """
    angles = positions.float()[..., None] * inv_freq.to(positions.device)  # [B, T, Dh/2]
    angles = angles.repeat_interleave(2, dim=-1)  # [B, T, Dh]: (a0, a0, a1, a1, ...)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs: (x0, x1) -> (x0 cos - x1 sin, x1 cos + x0 sin), in fp32.

    x: [B, T, N, Dh]; cos/sin: [B, T, Dh] -> [B, T, N, Dh] in x's dtype
    """
    x32 = x.float()
    pairs = x32.unflatten(-1, (-1, 2))  # [B, T, N, Dh/2, 2]
    rotated = torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)  # [B, T, N, Dh]
    out = x32 * cos[:, :, None, :] + rotated * sin[:, :, None, :]
    return out.to(x.dtype)


class MLP(nn.Module):
    """SwiGLU: down(act(gate(x)) * up(x)); names match the checkpoint (`gate_proj`, `up_proj`, `down_proj`)."""

    def __init__(self, hidden: int, width: int, act: str = "silu"):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, width, bias=False)
        self.up_proj = nn.Linear(hidden, width, bias=False)
        self.down_proj = nn.Linear(width, hidden, bias=False)
        self.act = ACTIVATIONS[act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., D] -> [..., D]
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))
