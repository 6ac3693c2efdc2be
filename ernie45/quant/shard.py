"""Tensor/expert-parallel slices of stored quantized weights: which bytes of each tensor a rank reads.

A rank holds a block of a weight `[N out, K in]`: output rows [a, b) (column-parallel: q/k/v, gate/up)
or input columns [a, b) (row-parallel: o_proj, down_proj), and for routed experts a contiguous range of
experts (the loader picks their per-expert names; see `weights.sources_of`). Its stored tensors are
plain slices of the checkpoint's, read through the mmap and never re-quantized:

| format | output rows [a, b)                     | input columns [a, b)                                  |
|--------|----------------------------------------|-------------------------------------------------------|
| int8   | qweight, scales rows a:b               | qweight columns a:b; scales whole (one per output row) |
| int4/2 | qweight, scales, zeros rows a:b        | qweight bytes a*bits/8 : b*bits/8; scales, zeros groups a/g : b/g |
| fp8    | qweight rows a:b; scales row blocks a/128 : ceil(b/128) | qweight columns a:b; scales column blocks a/128 : ceil(b/128) |

So a cut must fall on a scale boundary: input columns on a group (int4 128, int2 64, or the fallback
group recorded in config.json), fp8 rows and columns on its 128 x 128 blocks. A block may end at the
weight's own edge (fp8's partial edge block). Output rows of int8/int4/int2 may be cut anywhere.
`split_problem` names a cut that breaks this; `resize` turns a meta QuantWeight into its slice.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .formats import stored_shapes
from .modules import QuantWeight

Cut = tuple[int, int, int]  # (dim, start, stop) of one stored [N, ?] tensor (per expert when stacked)


def unit(q: QuantWeight, dim: int) -> tuple[int, str]:
    """The granularity a cut along `dim` (0 output rows, 1 input columns) must respect, and its name."""
    fmt = q.fmt
    if fmt.float8:
        return (fmt.block_rows, "block rows") if dim == 0 else (q.group_size, "block columns")
    if dim == 1 and not fmt.symmetric:
        return q.group_size, "group"
    return 1, "row" if dim == 0 else "column"


def split_problem(q: QuantWeight, name: str, dim: int, start: int, stop: int, ways: int, how: str) -> str | None:
    """Why cutting [start, stop) along `dim` of `q` would split a scale, or None when it does not.

    `ways`/`how` only word the message ("tp", "tp x ep"): `down_proj input 1536 / tp 4 = 384 ...`.
    """
    full = q.out_features if dim == 0 else q.in_features
    step, what = unit(q, dim)
    if start % step == 0 and ((stop - start) % step == 0 or stop == full):
        return None
    side = "output" if dim == 0 else "input"
    if full // ways != stop - start:  # KV heads replicated over more TP ranks than there are heads
        return f"{name} output rows [{start}, {stop}) of {full} do not start and end on {q.fmt.name} {what} {step}"
    return f"{name} {side} {full} / {how} {ways} = {stop - start} is not a multiple of {q.fmt.name} {what} {step}"


def cuts(q: QuantWeight, dim: int, start: int, stop: int) -> dict[str, Cut]:
    """leaf -> the slice of its stored checkpoint tensor; a leaf left out is read whole (int8 scales)."""
    fmt = q.fmt
    if fmt.float8:
        step = unit(q, dim)[0]
        return {"qweight": (dim, start, stop), "scales": (dim, start // step, math.ceil(stop / step))}
    if fmt.symmetric:  # int8: scales [N], one per output row
        return {"qweight": (dim, start, stop), **({"scales": (0, start, stop)} if dim == 0 else {})}
    if dim == 0:
        return {leaf: (0, start, stop) for leaf in ("qweight", "scales", "zeros")}
    g, per = q.group_size, fmt.per_byte
    return {"qweight": (1, start // per, stop // per), "scales": (1, start // g, stop // g),
            "zeros": (1, start // g, stop // g)}


def resize(q: QuantWeight, dim: int, start: int, stop: int, experts: int | None = None) -> dict[str, Cut]:
    """Make meta `q` its slice [start, stop) along `dim` (and `experts` stacked experts, if given), in place.

    Updates out/in features (int8's group is its row width), replaces the stored Parameters by empty
    ones of the local shapes and drops any kernel cache. Returns the loader's cuts (see `cuts`); each is
    checked against the local shape, so a mistake fails here rather than broadcasting in `copy_`.
    """
    plan = cuts(q, dim, start, stop)
    lead = (experts,) if experts is not None else q.lead
    n, k = (stop - start, q.in_features) if dim == 0 else (q.out_features, stop - start)
    old = {leaf: tuple(getattr(q, leaf).shape[len(q.lead):]) for leaf in plan.keys() | {"scales"}}
    q.lead, q.out_features, q.in_features = lead, n, k
    if q.fmt.group_size is None:
        q.group_size = k
    for leaf, (shape, dtype) in stored_shapes(q.fmt, lead, n, k, q.group_size).items():
        want = list(old[leaf])
        if leaf in plan:
            d, a, b = plan[leaf]
            want[d] = b - a
        if list(shape[len(lead):]) != want:
            raise AssertionError(f"{leaf}: local shape {list(shape[len(lead):])} but the checkpoint slice is {want}")
        device = getattr(q, leaf).device
        setattr(q, leaf, nn.Parameter(torch.empty(shape, dtype=dtype, device=device), requires_grad=False))
    q.drop_kernel_cache()
    return plan
