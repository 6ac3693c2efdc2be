"""Quantized weight formats: how a `[N out, K in]` weight is stored, packed, quantized and dequantized.

Owns the byte layout every other piece agrees on (the planner in `ernie45/plan.py` counts the same bytes):

| format | `qweight` [.., N, ?]         | `scales`                        | `zeros`       | value                |
|--------|------------------------------|---------------------------------|---------------|----------------------|
| int8   | int8 [N, K]                  | bf16 [N] (one per output row)   | -             | q * s                |
| int4   | uint8 [N, K/2], 2 codes/byte | bf16 [N, K/g], g = 128          | bf16 [N, K/g] | (q - 8) * s + z      |
| int2   | uint8 [N, K/4], 4 codes/byte | bf16 [N, K/g], g = 64           | bf16 [N, K/g] | (q - 2) * s + z      |
| fp8    | float8_e4m3fn [N, K]         | fp32 [ceil(N/128), ceil(K/128)] | -             | q * s (128x128 blocks) |

Choices:
- Output channels are dim 0 and every scale belongs to one row (fp8: one 128-row band), so a row slice of
  the stored tensors *is* the quantization of that row slice: tensor/expert-parallel loading just slices.
- Codes are packed little-end first along the input dim (code j of a byte sits at bits `j*bits`), a
  plain layout no kernel owns; kernels convert at run time (see modules.py).
- int4/int2 are asymmetric with a *float* zero `z` (the centre of the code range), the convention of the
  CPU int4 kernel: w = (q - 2^(b-1)) * s + z. Scales and zeros are rounded to bf16 *before* the codes are
  chosen, so rounding sees the values that are stored.
- Group sizes must divide the input dim (and keep groups byte-aligned). When they do not (tiny models),
  `group_size_for` falls back to the largest divisor below the default; the caller records it.
- Stacked experts are the same format with a leading [E] dim; every function accepts leading dims.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

SCALE_DTYPE = torch.bfloat16


@dataclass(frozen=True)
class QuantFormat:
    name: str
    bits: int
    group_size: int | None  # default columns per scale; None = whole row (per output channel)
    symmetric: bool
    float8: bool = False
    block_rows: int = 1  # rows sharing one scale (fp8: 128)

    @property
    def per_byte(self) -> int:
        return 1 if self.bits == 8 else 8 // self.bits

    @property
    def mid(self) -> int:  # code of the group centre for asymmetric formats
        return 0 if self.symmetric else 1 << (self.bits - 1)

    @property
    def qmax(self) -> int:
        return 127 if self.symmetric else (1 << self.bits) - 1

    def describe(self) -> dict:
        """What config.json records about the format (the layout above, in words)."""
        return {"bits": self.bits, "group_size": self.group_size, "symmetric": self.symmetric,
                "block_rows": self.block_rows, "scale_dtype": "float32" if self.float8 else "bfloat16",
                "value": "q * s" if self.symmetric else f"(q - {self.mid}) * s + z"}


FORMATS: dict[str, QuantFormat] = {
    "int8": QuantFormat("int8", 8, None, symmetric=True),
    "int4": QuantFormat("int4", 4, 128, symmetric=False),
    "int2": QuantFormat("int2", 2, 64, symmetric=False),
    "fp8": QuantFormat("fp8", 8, 128, symmetric=True, float8=True, block_rows=128),
}
FP8_MAX = 448.0  # largest finite float8_e4m3fn


def get_format(name: str) -> QuantFormat:
    if name not in FORMATS:
        raise ValueError(f"unknown quantized format {name!r}; known: {', '.join(FORMATS)}")
    return FORMATS[name]


def group_size_for(fmt: QuantFormat, in_features: int, requested: int | None = None) -> int:
    """Columns per scale for an input dim K: the default (or `requested`) when it divides K, else the
    largest byte-aligned divisor below it. int8 -> K (one group per row); fp8 -> 128 (edge blocks partial)."""
    if fmt.float8:
        return fmt.group_size
    if fmt.group_size is None:
        return in_features
    if in_features % fmt.per_byte:
        raise ValueError(f"{fmt.name} packs {fmt.per_byte} codes per byte, so the input dim must be a multiple "
                         f"of {fmt.per_byte}; got {in_features}. Use int8 or fp8 for this layer")
    want = requested or fmt.group_size
    for g in range(min(want, in_features), 0, -1):
        if in_features % g == 0 and g % fmt.per_byte == 0:
            return g
    raise AssertionError("unreachable: per_byte always divides in_features here")


def stored_shapes(fmt: QuantFormat, lead: tuple[int, ...], N: int, K: int,
                  group: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """name -> (shape, dtype) of the stored tensors of a [*lead, N, K] weight."""
    if fmt.float8:
        blocks = (math.ceil(N / fmt.block_rows), math.ceil(K / group))
        return {"qweight": ((*lead, N, K), torch.float8_e4m3fn), "scales": ((*lead, *blocks), torch.float32)}
    if fmt.symmetric:
        return {"qweight": ((*lead, N, K), torch.int8), "scales": ((*lead, N), SCALE_DTYPE)}
    G = K // group
    return {"qweight": ((*lead, N, K // fmt.per_byte), torch.uint8), "scales": ((*lead, N, G), SCALE_DTYPE),
            "zeros": ((*lead, N, G), SCALE_DTYPE)}


# ---- packing -------------------------------------------------------------------------------------
def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """codes [..., K] in [0, 2^bits) -> uint8 [..., K*bits/8]; code j of each byte at bits j*bits."""
    per = 8 // bits
    c = codes.to(torch.uint8).unflatten(-1, (-1, per))  # [..., K/per, per]
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=codes.device)  # [per]
    return (c << shifts).sum(-1, dtype=torch.uint8)  # disjoint bit ranges: sum == bitwise or


def unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 [..., K*bits/8] -> codes uint8 [..., K]."""
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
    return ((packed[..., None] >> shifts) & ((1 << bits) - 1)).flatten(-2)


# ---- the quantized tensor ------------------------------------------------------------------------
@dataclass
class QuantizedWeight:
    """The stored tensors of one (or E stacked) quantized weight(s) plus what is needed to read them."""

    fmt: QuantFormat
    group_size: int
    in_features: int
    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None = None

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"qweight": self.qweight, "scales": self.scales}
        return out if self.zeros is None else {**out, "zeros": self.zeros}

    @property
    def out_features(self) -> int:
        return self.qweight.shape[-2]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())


def slice_rows(qw: QuantizedWeight, start: int, stop: int) -> QuantizedWeight:
    """Output rows [start, stop) of a stored weight (fp8: on 128-row block boundaries)."""
    if qw.fmt.float8:
        b = qw.fmt.block_rows
        if start % b or (stop % b and stop != qw.out_features):
            raise ValueError(f"fp8 weights slice on {b}-row blocks; rows [{start}, {stop}) cut a block")
        scales = qw.scales[..., start // b:math.ceil(stop / b), :]
    else:
        scales = qw.scales[..., start:stop] if qw.fmt.symmetric else qw.scales[..., start:stop, :]
    zeros = None if qw.zeros is None else qw.zeros[..., start:stop, :]
    return QuantizedWeight(qw.fmt, qw.group_size, qw.in_features, qw.qweight[..., start:stop, :], scales, zeros)


# ---- group parameters, codes, values -------------------------------------------------------------
def minmax_params(w: torch.Tensor, fmt: QuantFormat, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Round-to-nearest scale/zero per group from the group's range (absmax when symmetric).

    w [..., N, K] fp32 -> (s, z) fp32 [..., N, G] holding bf16-representable values (z = 0 if symmetric).
    """
    g = w.unflatten(-1, (-1, group))  # [..., N, G, group]
    if fmt.symmetric:
        s = g.abs().amax(-1) / fmt.qmax
        return s.to(SCALE_DTYPE).float(), torch.zeros_like(s)
    lo, hi = g.amin(-1), g.amax(-1)
    s = ((hi - lo) / fmt.qmax).to(SCALE_DTYPE).float()
    z = (lo + fmt.mid * s).to(SCALE_DTYPE).float()  # the value of code `mid`: codes 0..qmax span [lo, hi]
    return s, z


def expand(p: torch.Tensor, group: int) -> torch.Tensor:
    """Per-group [..., N, G] -> per-weight [..., N, G*group]."""
    return p.repeat_interleave(group, dim=-1)


def codes_of(w: torch.Tensor, s: torch.Tensor, z: torch.Tensor, fmt: QuantFormat) -> torch.Tensor:
    """Round to the nearest code; s, z broadcast against w. Returns fp32 codes (integers)."""
    safe = torch.where(s == 0, torch.ones_like(s), s)  # an all-equal group: any code, z carries the value
    return torch.clamp(torch.round((w - z) / safe) + fmt.mid, -fmt.qmax if fmt.symmetric else 0, fmt.qmax)


def values_of(codes: torch.Tensor, s: torch.Tensor, z: torch.Tensor, fmt: QuantFormat) -> torch.Tensor:
    return (codes - fmt.mid) * s + z


def encode(codes: torch.Tensor, s: torch.Tensor, z: torch.Tensor, fmt: QuantFormat, group: int,
           in_features: int) -> QuantizedWeight:
    """Integer codes [..., N, K] and per-group s, z [..., N, G] -> the stored tensors."""
    if fmt.symmetric:
        return QuantizedWeight(fmt, group, in_features, codes.to(torch.int8), s[..., 0].to(SCALE_DTYPE))
    return QuantizedWeight(fmt, group, in_features, pack(codes, fmt.bits), s.to(SCALE_DTYPE), z.to(SCALE_DTYPE))


def quantize_rtn(w: torch.Tensor, fmt: QuantFormat, group: int | None = None) -> QuantizedWeight:
    """Round-to-nearest with min-max (int4/int2), absmax (int8) or block-absmax (fp8) scales.

    w [..., N, K] (any float dtype) -> QuantizedWeight.
    """
    w = w.float()
    K = w.shape[-1]
    group = group or group_size_for(fmt, K)
    if fmt.float8:
        return _quantize_fp8(w, fmt, group)
    s, z = minmax_params(w, fmt, group)
    codes = codes_of(w, expand(s, group), expand(z, group), fmt)
    return encode(codes, s, z, fmt, group, K)


def dequantize(qw: QuantizedWeight) -> torch.Tensor:
    """Stored tensors -> fp32 weight [..., N, K]."""
    fmt, g = qw.fmt, qw.group_size
    if fmt.float8:
        N, K = qw.qweight.shape[-2:]
        R = fmt.block_rows
        if N % R == 0 and K % g == 0:  # whole blocks: broadcast the block scales, no [N, K] scale tensor
            blocks = qw.qweight.float().unflatten(-1, (-1, g)).unflatten(-3, (-1, R))  # [..., Nb, R, Kb, g]
            return (blocks * qw.scales[..., :, None, :, None]).flatten(-4, -3).flatten(-2)
        s = qw.scales.repeat_interleave(R, -2).repeat_interleave(g, -1)[..., :N, :K]
        return qw.qweight.float() * s
    if fmt.symmetric:
        return torch.mul(qw.qweight, qw.scales.float()[..., None])
    centred = (unpack(qw.qweight, fmt.bits).view(torch.int8) - fmt.mid).unflatten(-1, (-1, g))  # [..., N, G, g]
    # z + (q - mid) * s in one fused pass: the product is exact, so the value is rounded once.
    return torch.addcmul(qw.zeros.float()[..., None], centred, qw.scales.float()[..., None]).flatten(-2)


def _quantize_fp8(w: torch.Tensor, fmt: QuantFormat, block: int) -> QuantizedWeight:
    """e4m3 with one fp32 scale per 128x128 block (edge blocks partial). w [..., N, K] fp32."""
    N, K = w.shape[-2:]
    R = fmt.block_rows
    padded = torch.nn.functional.pad(w, (0, -K % block, 0, -N % R))  # zeros never raise an absmax
    blocks = padded.unflatten(-1, (-1, block)).unflatten(-3, (-1, R))  # [..., Nb, R, Kb, block]
    s = blocks.abs().amax(dim=(-3, -1)) / FP8_MAX  # [..., Nb, Kb]
    safe = torch.where(s == 0, torch.ones_like(s), s)
    full = safe.repeat_interleave(R, -2).repeat_interleave(block, -1)[..., :N, :K]
    q = (w / full).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return QuantizedWeight(fmt, block, K, q, s)
