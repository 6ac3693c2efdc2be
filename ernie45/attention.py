"""Grouped-query self-attention and the one method through which it talks to a KV cache.

The attention module projects q/k/v, applies interleaved RoPE, and then either computes plain causal
attention (no cache) or hands q/k/v to ``cache.attention(layer_idx, q, k, v, positions)``. The cache
decides where K/V live (contiguous, paged, sharded) and returns the attention output; the model never
knows which. Causality is defined by *positions*, not by array offsets, so any cache layout works.

Numerics follow eager transformers (spec §2.4): scores = (Q K^T) * Dh^-0.5 in the activation dtype,
masked, softmax in fp32, cast back, then @ V. KV head j serves query heads [j*G, (j+1)*G) (G = Nq/Nkv).

Shape legend: B batch, T new tokens, S key positions, Nq/Nkv heads, Dh head_dim, D hidden.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from .config import ModelConfig
from .layers import apply_rope


class AttentionCache(Protocol):
    """What attention needs from a cache: store this step's K/V and attend over everything visible."""

    def attention(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  positions: torch.Tensor) -> torch.Tensor:
        """q [B,T,Nq,Dh], k/v [B,T,Nkv,Dh] (post-RoPE), positions [B,T] -> out [B,T,Nq,Dh]."""
        ...


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor,
           k_pos: torch.Tensor) -> torch.Tensor:
    """Reference GQA attention: query at position p sees keys at positions <= p.

    q [B,T,Nq,Dh], k/v [B,S,Nkv,Dh], q_pos [B,T], k_pos [B,S] -> [B,T,Nq,Dh]
    Keys with a negative position are treated as empty slots and never attended.
    """
    groups = q.shape[2] // k.shape[2]
    k = k.repeat_interleave(groups, dim=2).transpose(1, 2)  # [B, Nq, S, Dh]
    v = v.repeat_interleave(groups, dim=2).transpose(1, 2)  # [B, Nq, S, Dh]
    scores = torch.matmul(q.transpose(1, 2), k.transpose(2, 3)) * q.shape[-1] ** -0.5  # [B, Nq, T, S]
    scores = scores.masked_fill(~_visible(q_pos, k_pos)[:, None], torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(probs, v).transpose(1, 2)  # [B, T, Nq, Dh]


QUERY_BLOCK = 128  # a prefill's queries go in blocks of this many, each against the keys it can see


def attend_gqa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor,
               k_pos: torch.Tensor) -> torch.Tensor:
    """`attend`'s result without copying K/V per query head, with fp32 matmuls on any CPU.

    Query heads are grouped under their KV head ([B, Nkv, G*T, Dh] against [B, Nkv, S, Dh]) instead of
    repeating K/V G times. The two matmuls run on fp32 copies and are rounded back to the activation
    dtype exactly where `attend` rounds (bf16 matmul accumulates in fp32 and rounds its output, and
    CPUs without native bf16 run it several times slower), so the two agree up to summation order.
    More than QUERY_BLOCK queries (a prefill) go in blocks, each against the keys up to the last one any
    of its queries sees: a causal prefill of T tokens then computes about half of the T x T scores it
    would mask. The keys left out are masked for every query of the block, so they change nothing (a
    block where some query sees no key at all keeps every key: `attend` spreads such a row over all S).
    Same shapes and masking rules as `attend`.
    """
    T, S = q.shape[1], k.shape[1]
    if T <= QUERY_BLOCK:
        return _attend_gqa(q, k, v, _visible(q_pos, k_pos))
    out = []
    for t0 in range(0, T, QUERY_BLOCK):
        visible = _visible(q_pos[:, t0:t0 + QUERY_BLOCK], k_pos)  # [B, Tb, S]
        seen = visible.flatten(0, 1).any(0).nonzero()  # [n, 1] keys some query of the block sees
        n = int(seen[-1]) + 1 if len(seen) and bool(visible.any(-1).all()) else S
        out.append(_attend_gqa(q[:, t0:t0 + QUERY_BLOCK], k[:, :n], v[:, :n], visible[..., :n]))
    return torch.cat(out, 1)


def _visible(q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
    """q_pos [B,T], k_pos [B,S] -> [B,T,S]: key positions at most the query's, empty slots (< 0) never."""
    return (k_pos[:, None, :] <= q_pos[:, :, None]) & (k_pos[:, None, :] >= 0)


def _attend_gqa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """attend_gqa for one block of queries: q [B,T,Nq,Dh], k/v [B,S,Nkv,Dh], visible [B,T,S] -> [B,T,Nq,Dh]."""
    B, T, Nq, Dh = q.shape
    Nkv, S = k.shape[2], k.shape[1]
    G, dtype = Nq // Nkv, q.dtype
    qg = q.view(B, T, Nkv, G, Dh).permute(0, 2, 3, 1, 4).reshape(B, Nkv, G * T, Dh)  # rows g-major, then t
    scores = torch.matmul(qg.float(), k.permute(0, 2, 3, 1).float()).to(dtype) * Dh ** -0.5  # [B, Nkv, G*T, S]
    scores = scores.view(B, Nkv, G, T, S).masked_fill(~visible[:, None, None], torch.finfo(dtype).min)
    probs = torch.softmax(scores.view(B, Nkv, G * T, S), dim=-1, dtype=torch.float32).to(dtype)
    out = torch.matmul(probs.float(), v.transpose(1, 2).float()).to(dtype)  # [B, Nkv, G*T, Dh]
    return out.view(B, Nkv, G, T, Dh).permute(0, 3, 1, 2, 4).reshape(B, T, Nq, Dh)


class Attention(nn.Module):
    """q/k/v/o projections without biases; names match `self_attn.{q,k,v,o}_proj` in checkpoints."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.q_dim, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.kv_dim, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.kv_dim, bias=False)
        self.o_proj = nn.Linear(cfg.q_dim, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor,
                cache: AttentionCache | None = None) -> torch.Tensor:
        """x [B,T,D], cos/sin [B,T,Dh], positions [B,T] -> [B,T,D]"""
        B, T, _ = x.shape
        q = apply_rope(self.q_proj(x).view(B, T, self.n_heads, self.head_dim), cos, sin)
        k = apply_rope(self.k_proj(x).view(B, T, self.n_kv, self.head_dim), cos, sin)
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim)
        if cache is None:
            out = attend(q, k, v, positions, positions)
        else:
            out = cache.attention(self.layer_idx, q, k, v, positions)
        return self.o_proj(out.reshape(B, T, self.n_heads * self.head_dim))
