"""The decode kernels (ernie45/kernels: gemv.c, moe.c, head.c) called directly, against torch references."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from ernie45 import kernels
from ernie45.quant.formats import dequantize, get_format, quantize_rtn

# In CI the kernels must build (gcc is installed by .ci/run); elsewhere a missing compiler skips.
needs_kernels = pytest.mark.skipif(not kernels.available() and not os.environ.get("CI"),
                                   reason=f"decode kernels unavailable: {kernels.unavailable_reason()}")

# Integer-kind weights meet int16-rounded activations (each element off by <= 1/32767 of its block's max,
# tested exactly above); through a few fp32 layers that compounds to ~4e-4 of the largest value here
# (an fp32 model; a bf16 model's activations are mostly exact in int16). A wrong code or scale is O(1).
INT16_ACTIVATIONS_TOL = 2 ** -10


@needs_kernels
@pytest.mark.parametrize("M", [1, 3])
@pytest.mark.parametrize("kind", [torch.float32, torch.bfloat16])
def test_gemv_float_kinds(kind, M):
    torch.manual_seed(0)
    w, x = torch.randn(37, 96).to(kind), torch.randn(M, 96)  # 37 rows: blocks of four plus a remainder
    got = kernels.gemv(kernels.Weights(kind, w, 96), x)
    torch.testing.assert_close(got, x @ w.float().T, rtol=1e-5, atol=1e-5)


@needs_kernels
@pytest.mark.parametrize("kind,K", [(torch.float32, 1536), (torch.bfloat16, 1536), ("int8", 1536), ("int8", 208),
                                    ("int4", 1536)])
def test_gemv_rows_do_not_depend_on_batch(kind, K):
    """Several activation rows reuse each converted weight block (float kinds, up to 64 rows) or run in
    tiles of weight rows by activation rows (int4), with the one-row results bit for bit; integer kinds
    take any number of rows (a prefill's)."""
    torch.manual_seed(5)
    w = torch.randn(71, K)  # odd: the last weight row runs alone; K = 208: int8's 16-column tail
    integer = isinstance(kind, str)
    x = torch.randn(70 if integer else 40, K)  # 70 = 17 tiles of 4 + 2 (VNNI), 35 of 2 (AVX2)
    weights = (_quant_weights(quantize_rtn(w, get_format(kind)), K) if integer else
               kernels.Weights(kind, w.to(kind), K))
    alone = torch.cat([kernels.gemv(weights, x[i:i + 1]) for i in range(len(x))])
    for rows in (2, 5, len(x)):  # float kinds: 2 rows one weight row at a time, more in 4 x 4 tiles (AVX-512)
        assert torch.equal(kernels.gemv(weights, x[:rows]), alone[:rows]), rows
    if not integer:
        with pytest.raises(ValueError, match="at most 64"):
            kernels.gemv(weights, torch.randn(65, K))


def _quant_weights(qw, K):
    return kernels.Weights(qw.fmt.name, qw.qweight, K, qw.scales, getattr(qw, "zeros", None), qw.group_size)


def _integer_parts(qw):
    """dequantize(qw) = q_part + offset: the part the integer dot multiplies by rounded activations, and
    the per-group constant (z - mid * s) that meets the exact group sums of x (gemv.c's header)."""
    w = dequantize(qw)
    if qw.fmt.name == "int8":
        return w, torch.zeros_like(w)
    s, z = (p.float().repeat_interleave(qw.group_size, -1) for p in (qw.scales, qw.zeros))
    offset = z - qw.fmt.mid * s
    return w - offset, offset


@needs_kernels
@pytest.mark.parametrize("fmt,group,K", [("int8", None, 256), ("int8", None, 208), ("int4", 128, 256),
                                         ("int4", 32, 256), ("int2", 64, 256), ("int2", 64, 192),
                                         ("int2", 128, 256)])
def test_gemv_quantized_kinds(fmt, group, K):
    """Integer kinds: int16-rounded activations (the torch reference of the rounding), exact integer dots."""
    torch.manual_seed(1)
    w, x = torch.randn(21, K), torch.randn(2, K) * torch.logspace(-3, 1, K)  # wide dynamic range per row
    qw = quantize_rtn(w, get_format(fmt), group)
    weights = _quant_weights(qw, K)
    got = kernels.gemv(weights, x)
    q_part, offset = _integer_parts(qw)
    block = kernels.activation_block(weights)
    xr = kernels.round_activations(x, block)
    fp32_slack = 1e-5 * (xr.abs() @ q_part.abs().T + x.abs() @ offset.abs().T) + 1e-6
    assert ((got - (xr @ q_part.T + x @ offset.T)).abs() <= fp32_slack).all()
    # the rounding's own bound, |x - xr| <= (block max |x|) / 32767, carried to the product
    bmax = torch.cat([x[:, k0:k0 + block].abs().amax(1, keepdim=True).expand(-1, min(block, K - k0))
                      for k0 in range(0, K, block)], 1)  # [2, K]: each column's block max
    assert ((x - xr).abs() <= bmax / 32767).all()
    assert ((got - x @ dequantize(qw).T).abs() <= (bmax / 32767) @ q_part.abs().T + fp32_slack).all()


@needs_kernels
def test_gemv_integer_kinds_are_exact_on_bf16_activations_near_the_block_max():
    """A bf16 value has 8 significant bits: within 2^7 of its block's max it is an int16 multiple of the step."""
    torch.manual_seed(3)
    w = torch.randn(12, 128)
    x = (torch.rand(1, 128) * 1.9 + 0.05).mul(torch.randint(0, 2, (1, 128)) * 2 - 1).to(torch.bfloat16).float()
    for fmt, group in (("int8", None), ("int4", 128), ("int2", 64)):
        qw = quantize_rtn(w, get_format(fmt), group)
        weights = _quant_weights(qw, 128)
        assert torch.equal(kernels.round_activations(x, kernels.activation_block(weights)), x)
        torch.testing.assert_close(kernels.gemv(weights, x), x @ dequantize(qw).T, rtol=1e-5, atol=1e-5)


@needs_kernels
@pytest.mark.parametrize("group", [64, 128, 256])
def test_int4_rows_give_the_same_bits_alone_and_in_pairs(group):
    """Rows go through the int4 kernel in pairs that share the loads of x: row 1 of W is paired with row 0,
    row 1 of W[1:] with row 2, and W's last row (odd count) runs alone; every row must get the same bits."""
    torch.manual_seed(5)
    K = 512
    qw = quantize_rtn(torch.randn(5, K), get_format("int4"), group)
    x = torch.randn(3, K)
    whole = kernels.gemv(_quant_weights(qw, K), x)
    tail = kernels.Weights("int4", qw.qweight[1:], K, qw.scales[1:], qw.zeros[1:], qw.group_size)
    single = [kernels.gemv(kernels.Weights("int4", qw.qweight[n:n + 1], K, qw.scales[n:n + 1],
                                           qw.zeros[n:n + 1], qw.group_size), x) for n in range(5)]
    assert torch.equal(whole[:, 1:], kernels.gemv(tail, x))
    assert torch.equal(whole, torch.cat(single, 1))


def test_packed_groups_that_split_a_16_byte_chunk_take_the_torch_path():
    assert kernels.supports("int4", 256, 32) and not kernels.supports("int4", 256, 16)
    assert kernels.supports("int2", 256, 64) and not kernels.supports("int2", 256, 32)


def _moe_reference(x, gate, up, down, ids, coef):
    """The torch order of moe.Experts.grouped for one token: ascending ids, rounding in x.dtype."""
    out = torch.zeros_like(x)
    for e, c in sorted(zip(ids.tolist(), coef.to(x.dtype))):
        h = F.silu(F.linear(x, gate[e])) * F.linear(x, up[e])
        out = out + F.linear(h, down[e]) * c
    return out


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_moe_token_matches_torch_order(dtype):
    torch.manual_seed(2)
    E, D, Fw = 6, 64, 32
    gate, up, down = (torch.randn(E, Fw, D) * .1).to(dtype), (torch.randn(E, Fw, D) * .1).to(dtype), \
        (torch.randn(E, D, Fw) * .1).to(dtype)
    x = torch.randn(D).to(dtype)
    ids, coef = torch.tensor([1, 4, 5]), torch.tensor([.5, .3, .2]).to(dtype).float()
    y = torch.zeros(D)
    kernels.moe_token(kernels.Weights(dtype, gate, D), kernels.Weights(dtype, up, D), kernels.Weights(dtype, down, Fw),
                      ids, coef, x, y, bf16=dtype == torch.bfloat16)
    ref = _moe_reference(x, gate, up, down, ids, coef)
    if dtype == torch.bfloat16:  # same rounding points: equal up to summation order inside dot products
        assert (y.to(dtype).float() - ref.float()).abs().max() <= 2 ** -7 * ref.float().abs().max()
    else:
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-6)


def _stacked(fmt, group, E, N, K):
    qs = [quantize_rtn(torch.randn(N, K) * .1, get_format(fmt), group) for _ in range(E)]
    zeros = torch.stack([q.zeros for q in qs]) if qs[0].zeros is not None else None
    w = kernels.Weights(fmt, torch.stack([q.qweight for q in qs]), K, torch.stack([q.scales for q in qs]), zeros,
                        qs[0].group_size)
    return w, torch.stack([dequantize(q) for q in qs])


@needs_kernels
@pytest.mark.parametrize("gate_up,down", [(("int4", 128), ("int2", 64)), (("int8", None), ("int4", 128)),
                                          (("int2", 64), ("int8", None))])
def test_moe_token_with_down_in_another_integer_format(gate_up, down):
    """down prepared from h by the threads that computed it, in its own format (moe.c's fuse)."""
    torch.manual_seed(4)
    E, D, Fw = 5, 128, 128
    (gate, g32), (up, u32), (dn, d32) = _stacked(*gate_up, E, Fw, D), _stacked(*gate_up, E, Fw, D), \
        _stacked(*down, E, D, Fw)
    x = torch.randn(D).to(torch.bfloat16).float()  # bf16 values: the int16 rounding is (nearly) exact
    ids, coef = torch.tensor([0, 2, 4]), torch.tensor([.5, .3, .2])
    y = kernels.moe_token(gate, up, dn, ids, coef, x, torch.zeros(D), bf16=False)
    want = _moe_reference(x, g32, u32, d32, ids, coef)
    assert (y - want).abs().max() <= INT16_ACTIVATIONS_TOL * want.abs().max()
    other_up, _ = _stacked("int8" if gate_up[0] != "int8" else "int4", None if gate_up[0] != "int8" else 128,
                           E, Fw, D)
    with pytest.raises(ValueError, match="share one format"):
        kernels.moe_token(gate, other_up, dn, ids, coef, x, torch.zeros(D), bf16=False)


@needs_kernels
@pytest.mark.parametrize("bf16", [False, True])
def test_one_token_and_batch_expert_kernels_agree_bit_for_bit(bf16):
    """moe_token (down rows of <= 512 columns four at a time) and moe_tokens (tiles of two weight rows) run
    the same integer dots, the same silu and the same sums in expert order: the same bits for each token,
    whether a token is alone or in a batch (and that batch's scatter adds whole rows)."""
    torch.manual_seed(6)
    E, D, Fw = 6, 256, 256  # down: 256 rows of 256 columns (quads); groups of 64 (the byte-split int4 path)
    gate, up, down = (_stacked("int4", 64, E, Fw, D)[0], _stacked("int4", 64, E, Fw, D)[0],
                      _stacked("int4", 64, E, D, Fw)[0])
    x = torch.randn(3, D)
    picks = [torch.tensor([0, 2, 5]), torch.tensor([1, 2, 4]), torch.tensor([0, 3, 5])]
    coef = torch.rand(3, 3)
    alone = torch.stack([kernels.moe_token(gate, up, down, picks[t], coef[t], x[t], torch.zeros(D), bf16)
                         for t in range(3)])
    ids, tok = torch.cat(picks), torch.arange(3).repeat_interleave(3)
    order = torch.argsort(ids, stable=True)
    batch = kernels.moe_tokens(gate, up, down, ids[order], tok[order], coef.flatten()[order], x, bf16)
    assert torch.equal(batch, alone)
    twice = torch.tensor([0, 0, 1]), torch.tensor([1, 1, 0])  # token 1 through expert 0 twice
    with pytest.raises(ValueError, match="appears twice"):
        kernels.moe_tokens(gate, up, down, *twice, torch.ones(3), x, bf16)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_head_exact_step_is_the_first_maximum_over_many_candidates(dtype):
    """Threads take ascending slices of the candidates; a tie across slices keeps the earlier row."""
    torch.manual_seed(18)
    w = torch.randn(500, 64).to(dtype)
    w[10] *= 3
    w[90], w[400] = w[10], w[10]  # three equal rows, the largest logits for x along them
    x = w[10].float()
    idx = torch.arange(0, 500, 2)  # 250 ascending candidates (parallel slices), 10, 90 and 400 among them
    got = kernels.head_exact(kernels.Weights(dtype, w, 64), idx, x)
    want = idx[torch.argmax(F.linear(x.to(dtype), w[idx]))]
    assert got == int(want) == 10


@needs_kernels
@pytest.mark.parametrize("R,K", [(11, 288), (64, 256), (1, 96)])
def test_head_screen_rows_give_each_row_the_one_row_screen(R, K):
    """One pass over the int8 head for R rows (tiles of 8, padded; 8-row blocks of the head transposed into
    place, N = 301 leaves a tail of 5; K % 64 == 32 a half vector): every a, b and floor bit for bit."""
    gen = torch.Generator().manual_seed(21)
    q = torch.randint(-127, 128, (301, K), generator=gen, dtype=torch.int8)
    scale, abs_q, q_sum = torch.rand(301, generator=gen) / 100, q.float().abs().sum(1), q.sum(1, dtype=torch.int32)
    xq = torch.randint(-127, 128, (R, K), generator=gen, dtype=torch.int8)
    sx, l1 = torch.rand(R, generator=gen, dtype=torch.float64) / 50, torch.rand(R, generator=gen, dtype=torch.float64)
    a, b, floors = kernels.head_screen_rows(q, scale, abs_q, q_sum, xq, sx, l1, 1e-5)
    for r in range(R):
        a1, b1, floor = kernels.head_screen(q, scale, abs_q, xq[r], float(sx[r]), float(l1[r]), 1e-5)
        assert torch.equal(a[r], a1) and torch.equal(b[r], b1) and float(floors[r]) == floor, r
    with pytest.raises(ValueError, match="at most 64"):
        kernels.head_screen_rows(q, scale, abs_q, q_sum, torch.zeros(65, K, dtype=torch.int8), torch.ones(65),
                                 torch.ones(65), 1e-5)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_head_pick_rows_is_candidates_then_exact_per_row(dtype):
    """Rows spread over the threads give each row what head_candidates + head_exact give it alone, and -1
    where a row has more candidates than allowed."""
    gen = torch.Generator().manual_seed(23)
    R, N, K = 9, 301, 64
    w = torch.randn(N, K, generator=gen).to(dtype)
    x = torch.randn(R, K, generator=gen)
    a, b = torch.randn(R, N, generator=gen), torch.rand(R, N, generator=gen) * 3
    floors = (a - b).amax(1)
    weights = kernels.Weights(dtype, w, K)
    counts = [int(kernels.head_candidates(a[r], b[r], float(floors[r])).numel()) for r in range(R)]
    limit = sorted(counts)[R // 2]  # about half the rows over it
    got = kernels.head_pick_rows(a, b, floors, weights, x, limit)
    for r in range(R):
        cand = kernels.head_candidates(a[r], b[r], float(floors[r]))
        want = kernels.head_exact(weights, cand, x[r]) if cand.numel() <= limit else -1
        assert int(got[r]) == want, r
    assert (got == -1).any() and (got >= 0).any()


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_paged_attention_is_the_gathered_attention(dtype):
    """One decode row per sequence over scattered blocks of a paged pool (block size 4, contexts of 1 to 13
    positions, GQA 4/2) against attend_gqa on each sequence's gathered keys."""
    from ernie45.attention import attend_gqa

    gen = torch.Generator().manual_seed(4)
    Nq, Nkv, Dh, bs, blocks = 4, 2, 16, 4, 24
    k_rows = torch.randn(blocks * bs, Nkv, Dh, generator=gen).to(dtype)
    v_rows = torch.randn(blocks * bs, Nkv, Dh, generator=gen).to(dtype)
    lens = [1, 13, 4, 7]
    perm = torch.randperm(blocks, generator=gen)
    tables = torch.zeros(len(lens), 4, dtype=torch.long)
    used = 0
    for r, n in enumerate(lens):
        nb = -(-n // bs)
        tables[r, :nb] = perm[used:used + nb]
        used += nb
    seq, pos = torch.tensor([2, 0, 3, 1]), torch.tensor([lens[2] - 1, lens[0] - 1, lens[3] - 1, lens[1] - 1])
    q = torch.randn(4, Nq, Dh, generator=gen).to(dtype)
    got = kernels.paged_attention(k_rows, v_rows, tables, bs, seq, pos, q)
    for n in range(4):
        r, p = int(seq[n]), int(pos[n])
        slots = tables[r, torch.arange(p + 1) // bs] * bs + torch.arange(p + 1) % bs
        want = attend_gqa(q[n][None, None], k_rows[slots][None], v_rows[slots][None], pos[n].view(1, 1),
                          torch.arange(p + 1)[None])[0, 0]
        # summation order (and expf against torch's exp) only: fp32 to ~1e-6, bf16 to one rounding step
        tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2 ** -7, atol=2 ** -7)
        torch.testing.assert_close(got[n], want, **tol)
    with pytest.raises(ValueError, match="same dtype"):
        kernels.paged_attention(k_rows.float(), v_rows.float(), tables, bs, seq, pos, q.bfloat16())


@needs_kernels
@pytest.mark.skipif(kernels.isa() == "avx2", reason="this CPU has no AVX-512 VNNI: only the AVX2 build runs here")
def test_avx512_vnni_and_avx2_builds_agree_bit_for_bit(tmp_path):
    """The VNNI dot products sum the same integers in the same int32 lanes as the AVX2 ones (gemv.c)."""
    import subprocess
    import sys
    from pathlib import Path

    from safetensors.torch import load_file

    import isa_outputs

    path, script = tmp_path / "avx2.safetensors", Path(__file__).with_name("isa_outputs.py")
    env = {**os.environ, "ERNIE45_KERNEL_ISA": "avx2"}
    subprocess.run([sys.executable, str(script), str(path)], env=env, check=True, timeout=300)
    avx2, here = load_file(path), isa_outputs.outputs()
    assert avx2.keys() == here.keys()
    for name, t in here.items():
        assert torch.equal(t, avx2[name]), name


def test_kernel_isa_override_is_checked(monkeypatch):
    monkeypatch.setenv("ERNIE45_KERNEL_ISA", "sse9")
    with pytest.raises(ValueError, match="choose one of avx2, avx512vnni"):
        kernels.isa()
    monkeypatch.setenv("ERNIE45_KERNEL_ISA", "avx2")
    if {"avx2", "fma"} <= kernels.cpu_flags():
        assert kernels.isa() == "avx2"
