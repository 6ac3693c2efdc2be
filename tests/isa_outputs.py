"""Kernel outputs on fixed inputs, for comparing the AVX2 and AVX-512 VNNI builds of gemv.c.

    ERNIE45_KERNEL_ISA=avx2 python tests/isa_outputs.py OUT.safetensors
writes `outputs()` as computed by that build; tests/test_kernels.py compares it with its own build's.
Every integer path is covered: int8 (with a K % 32 == 16 tail), int4 byte-split and packed-bits groups,
int2 byte-split and packed-bits, the one-token expert step, the int8 head screen (one row and several),
and the float kinds' multi-row tiles.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ernie45 import kernels  # noqa: E402
from ernie45.quant.formats import get_format, quantize_rtn  # noqa: E402

CASES = (("int8", None, 208), ("int8", None, 1024), ("int4", 128, 512), ("int4", 64, 256), ("int4", 32, 256),
         ("int2", 64, 256), ("int2", 128, 256))  # (format, group, K)


def _weights(w: torch.Tensor, fmt: str, group: int | None) -> kernels.Weights:
    qw = quantize_rtn(w, get_format(fmt), group)
    return kernels.Weights(fmt, qw.qweight, w.shape[-1], qw.scales, getattr(qw, "zeros", None), qw.group_size)


def outputs() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(11)
    out = {}
    for fmt, group, K in CASES:
        w = torch.randn(67, K, generator=gen)
        x = torch.randn(3, K, generator=gen) * torch.logspace(-3, 1, K)  # wide dynamic range per row
        out[f"gemv_{fmt}_{group}_{K}"] = kernels.gemv(_weights(w, fmt, group), x)
    E, F, D = 6, 128, 256
    for fmt, group in (("int8", None), ("int4", 64), ("int2", 64)):
        gate, up = (_weights(torch.randn(E, F, D, generator=gen) * 0.05, fmt, group) for _ in range(2))
        down = _weights(torch.randn(E, D, F, generator=gen) * 0.05, fmt, group)
        x = torch.randn(D, generator=gen)
        ids, coef = torch.tensor([4, 0, 2]), torch.tensor([0.5, 0.3, 0.2])
        for bf16 in (False, True):
            y = kernels.moe_token(gate, up, down, ids, coef, x, torch.zeros(D), bf16)
            out[f"moe_{fmt}_{int(bf16)}"] = y
    q = torch.randint(-127, 128, (300, 256), generator=gen, dtype=torch.int8)
    xq = torch.randint(-127, 128, (256,), generator=gen, dtype=torch.int8)
    scale = torch.rand(300, generator=gen) / 100
    a, b, floor = kernels.head_screen(q, scale, q.float().abs().sum(1), xq, 0.01, 3.0, 1e-6)
    out["head_a"], out["head_b"], out["head_floor"] = a, b, torch.tensor([floor])
    xr = torch.randint(-127, 128, (11, 256), generator=gen, dtype=torch.int8)  # 11 rows: a tile of 8 and 3
    sx, l1 = torch.rand(11, generator=gen, dtype=torch.float64) / 50, torch.rand(11, generator=gen, dtype=torch.float64)
    a, b, floors = kernels.head_screen_rows(q, scale, q.float().abs().sum(1), q.sum(1, dtype=torch.int32), xr, sx, l1,
                                            1e-6)
    out["head_rows_a"], out["head_rows_b"], out["head_rows_floors"] = a, b, floors
    for dtype in (torch.float32, torch.bfloat16):  # float kinds: 4 x 4 tiles (AVX-512) against 1 x 2 (AVX2)
        w = torch.randn(37, 96, generator=gen).to(dtype)
        for M in (2, 7):
            out[f"gemv_{dtype}_{M}"] = kernels.gemv(kernels.Weights(dtype, w, 96), torch.randn(M, 96, generator=gen))
    return out


if __name__ == "__main__":
    from safetensors.torch import save_file

    save_file(outputs(), sys.argv[1])
