from __future__ import annotations

import math

import torch

from ernie45.layers import RMSNorm, apply_rope, rope_cos_sin, rope_inv_freq


def test_rope_rotates_adjacent_pairs():
    d, theta, pos = 8, 10000.0, 3
    x = torch.arange(1.0, 9.0).view(1, 1, 1, d)
    cos, sin = rope_cos_sin(torch.tensor([[pos]]), rope_inv_freq(d, theta))
    out = apply_rope(x, cos, sin)[0, 0, 0]
    for i in range(d // 2):
        a = pos * theta ** (-2 * i / d)
        x0, x1 = x[0, 0, 0, 2 * i].item(), x[0, 0, 0, 2 * i + 1].item()
        assert math.isclose(out[2 * i].item(), x0 * math.cos(a) - x1 * math.sin(a), rel_tol=1e-5, abs_tol=1e-5)
        assert math.isclose(out[2 * i + 1].item(), x1 * math.cos(a) + x0 * math.sin(a), rel_tol=1e-5, abs_tol=1e-5)


def test_rope_position_zero_is_identity_and_bf16_roundtrip():
    x = torch.randn(2, 3, 4, 16).bfloat16()
    cos, sin = rope_cos_sin(torch.zeros(2, 3, dtype=torch.long), rope_inv_freq(16, 500000.0))
    out = apply_rope(x, cos, sin)
    assert out.dtype == torch.bfloat16 and torch.equal(out, x)


def test_rmsnorm_fp32_variance_cast_before_weight():
    norm = RMSNorm(4, 1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    norm = norm.bfloat16()
    x = torch.tensor([[1.0, -2.0, 3.0, 0.5]]).bfloat16()
    x32 = x.float()
    expected = norm.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-5)).bfloat16()
    assert torch.equal(norm(x), expected)
