"""A contiguous KV cache for the reference generate loop (the paged one lives in kv_cache.py).

Each layer owns K/V buffers [B, S_max, Nkv, Dh]. A step writes its K/V at its positions and attends
over every slot written so far; slots never written carry position -1 and are masked out, and slots
past the highest position written are not read at all. Because
visibility is decided by positions, the same object serves prefill, decode and the MTP block
(which uses layer index ``num_hidden_layers``).
"""

from __future__ import annotations

import torch

from .attention import attend_gqa
from .config import ModelConfig


class KVCache:
    """Preallocated per-layer K/V for a batch of B sequences of at most ``max_len`` tokens."""

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu", num_layers: int | None = None):
        n_layers = num_layers if num_layers is not None else cfg.num_hidden_layers + cfg.num_nextn_predict_layers
        shape = (batch, max_len, cfg.num_key_value_heads, cfg.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        # Position held by each slot, per layer (the MTP layer may lag the trunk); -1 = empty.
        self.slot_pos = torch.full((n_layers, batch, max_len), -1, dtype=torch.long, device=device)  # [L, B, S_max]
        self.max_len = max_len
        self.length = 0  # slots [length, max_len) were never written: attention skips them

    def attention(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  positions: torch.Tensor) -> torch.Tensor:
        """Write k/v [B,T,Nkv,Dh] at `positions` [B,T], then attend q over all written slots."""
        top = int(positions.max())
        if top >= self.max_len:
            raise ValueError(f"position {int(positions.max())} is beyond this cache's {self.max_len} slots; "
                             "allocate the cache with max_len >= prompt + new tokens")
        rows = torch.arange(q.shape[0], device=q.device)[:, None]  # [B, 1]
        self.k[layer_idx][rows, positions] = k
        self.v[layer_idx][rows, positions] = v
        self.slot_pos[layer_idx][rows, positions] = positions
        self.length = max(self.length, top + 1)
        n = self.length
        return attend_gqa(q, self.k[layer_idx][:, :n], self.v[layer_idx][:, :n], positions,
                          self.slot_pos[layer_idx][:, :n])
