"""Grouped-query attention (attention.attend_gqa) against the reference `attend`."""

from __future__ import annotations

import pytest
import torch

from ernie45.attention import attend, attend_gqa

# ---- attention ------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attend_gqa_matches_reference(dtype):
    torch.manual_seed(3)
    B, T, S, Nq, Nkv, Dh = 2, 3, 7, 8, 2, 16
    q, k, v = torch.randn(B, T, Nq, Dh).to(dtype), torch.randn(B, S, Nkv, Dh).to(dtype), torch.randn(B, S, Nkv, Dh).to(dtype)
    q_pos = torch.tensor([[4, 5, 6], [2, 3, -1]])
    k_pos = torch.tensor([[0, 1, 2, 3, 4, 5, 6], [0, 1, 2, 3, -1, -1, -1]])
    want, got = attend(q, k, v, q_pos, k_pos), attend_gqa(q, k, v, q_pos, k_pos)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(got[:, :2].float(), want[:, :2].float(), **tol)
    torch.testing.assert_close(got[0].float(), want[0].float(), **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attend_gqa_in_query_blocks_matches_reference(dtype, monkeypatch):
    """Queries in blocks of QUERY_BLOCK, each against the keys it can see: a causal prefill, a row that
    sees a later key than its neighbours, and a block with a query that sees nothing (keeps every key)."""
    from ernie45 import attention

    monkeypatch.setattr(attention, "QUERY_BLOCK", 4)
    torch.manual_seed(4)
    B, T, Nq, Nkv, Dh = 2, 11, 4, 2, 8
    q, k, v = (torch.randn(B, T, n, Dh).to(dtype) for n in (Nq, Nkv, Nkv))
    pos = torch.arange(T).repeat(B, 1)
    q_pos = pos.clone()
    q_pos[0, 1] = 9  # block 0 of row 0 sees keys up to 9
    q_pos[1, 6] = -1  # block 1 of row 1 has a query that sees no key
    want, got = attend(q, k, v, q_pos, pos), attention.attend_gqa(q, k, v, q_pos, pos)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(got.float(), want.float(), **tol)
    whole = attention._attend_gqa(q, k, v, attention._visible(q_pos, pos))  # one block: the same numbers up to summation order
    torch.testing.assert_close(got.float(), whole.float(), rtol=1e-6 if dtype == torch.float32 else 1e-2, atol=1e-6)
