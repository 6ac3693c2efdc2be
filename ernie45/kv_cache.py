"""The paged KV cache: block bookkeeping (pool, tables, prefix cache) and the storage tensor.

Owns which physical block holds which sequence's tokens, and how many bytes that costs. The model
never sees blocks: the engine turns a block table and token positions into flat slot indices
(:func:`slot_mapping`), writes K/V there and gathers a sequence's K/V back for attention.

Choices:
- A block holds ``block_size`` consecutive tokens of one sequence; token ``p`` of a sequence lives
  in slot ``table[p // block_size] * block_size + p % block_size`` of the flat slot space.
- Blocks are reference counted: a full block shared through the prefix cache has one reference per
  sequence using it. Only FULL blocks are cached, keyed by a chained hash
  ``sha256(parent_hash || token ids)``, so equal keys mean equal token prefixes (sha256, not
  Python's ``hash``: a collision would silently hand a sequence someone else's K/V).
- A cached block whose last reference goes is kept, evictable, in LRU order; allocation takes
  never-cached free blocks first, then evicts the least recently released cached block.
- Storage is one tensor ``[L, 2, N, S, Hkv, Dh]`` (2 = K, V) so its bytes are exact and one
  block's bytes are contiguous per layer. Slots < 0 are padding: ``write`` skips them.

Shape legend: L layers, N blocks, S block size (tokens), Hkv KV heads, Dh head dim, T tokens.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict, deque
from typing import Iterable, Sequence

import torch

ROOT_HASH = b"ernie45-kv-root"  # parent of a sequence's first block


def hash_block(parent: bytes | None, token_ids: Sequence[int]) -> bytes:
    """Chained hash of one full block: it fixes the block's tokens and every token before it."""
    h = hashlib.sha256(parent if parent is not None else ROOT_HASH)
    h.update(array("q", token_ids).tobytes())
    return h.digest()


def hash_blocks(token_ids: Sequence[int], block_size: int, num_blocks: int | None = None,
                known: Sequence[bytes] = ()) -> list[bytes]:
    """Hashes of the first ``num_blocks`` full blocks (default: all), extending ``known`` ones."""
    count = len(token_ids) // block_size if num_blocks is None else num_blocks
    hashes = list(known[:count])
    for i in range(len(hashes), count):
        hashes.append(hash_block(hashes[-1] if hashes else None, token_ids[i * block_size:(i + 1) * block_size]))
    return hashes


class BlockPool:
    """Free list, reference counts and the prefix cache of ``num_blocks`` blocks (ids 0..N-1)."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"BlockPool needs num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._free: deque[int] = deque(range(num_blocks))  # unreferenced, not cached
        self._evictable: OrderedDict[int, None] = OrderedDict()  # unreferenced, cached; oldest first
        self._refs = [0] * num_blocks
        self._hash_of: dict[int, bytes] = {}
        self._block_of: dict[bytes, int] = {}

    @property
    def num_free_blocks(self) -> int:
        """Blocks an allocation can take now (free plus evictable cached ones)."""
        return len(self._free) + len(self._evictable)

    @property
    def num_cached_blocks(self) -> int:
        return len(self._block_of)

    def ref_count(self, block: int) -> int:
        return self._refs[block]

    def is_cached(self, block: int) -> bool:
        return block in self._hash_of

    def allocate(self, count: int) -> list[int]:
        """``count`` fresh blocks with one reference each; evicts cached blocks if it must."""
        if count > self.num_free_blocks:
            raise ValueError(f"cannot allocate {count} blocks: only {self.num_free_blocks} of "
                             f"{self.num_blocks} are free; check num_free_blocks first")
        blocks = []
        for _ in range(count):
            block = self._free.popleft() if self._free else self._evictable.popitem(last=False)[0]
            self._uncache(block)
            self._refs[block] = 1
            blocks.append(block)
        return blocks

    def acquire(self, blocks: Iterable[int]) -> None:
        """Add a reference to each (cached) block, e.g. on a prefix-cache hit."""
        for block in blocks:
            self._evictable.pop(block, None)
            self._refs[block] += 1

    def free(self, blocks: Iterable[int]) -> None:
        """Drop one reference from each block; pass a table's blocks tail first (they evict first)."""
        for block in blocks:
            if self._refs[block] <= 0:
                raise ValueError(f"block {block} freed more often than it was allocated or acquired")
            self._refs[block] -= 1
            if self._refs[block] == 0:
                if block in self._hash_of:
                    self._evictable[block] = None
                else:
                    self._free.append(block)

    def cache_block(self, block: int, block_hash: bytes) -> bool:
        """Publish a full, computed block under its hash; False if caching is off or it is known."""
        if not self.enable_prefix_caching or block_hash in self._block_of or block in self._hash_of:
            return False
        self._hash_of[block], self._block_of[block_hash] = block_hash, block
        return True

    def match_prefix(self, block_hashes: Sequence[bytes]) -> list[int]:
        """Blocks of the longest cached run of ``block_hashes`` from the start (no references taken)."""
        blocks = []
        for block_hash in block_hashes if self.enable_prefix_caching else ():
            block = self._block_of.get(block_hash)
            if block is None:
                break
            blocks.append(block)
        return blocks

    def _uncache(self, block: int) -> None:
        block_hash = self._hash_of.pop(block, None)
        if block_hash is not None:
            del self._block_of[block_hash]


class BlockTable:
    """One sequence's blocks, in token order."""

    def __init__(self, block_size: int, blocks: Iterable[int] = ()):
        self.block_size = block_size
        self.blocks: list[int] = list(blocks)

    def __len__(self) -> int:
        return len(self.blocks)

    @property
    def capacity(self) -> int:
        """Tokens the table can hold."""
        return len(self.blocks) * self.block_size

    def blocks_needed(self, num_tokens: int) -> int:
        """Blocks to add so that ``num_tokens`` tokens fit."""
        return max(0, -(-num_tokens // self.block_size) - len(self.blocks))

    def release(self, pool: BlockPool) -> None:
        """Give every block back to ``pool``, tail first, and empty the table."""
        pool.free(reversed(self.blocks))
        self.blocks = []


def slot_mapping(block_table: BlockTable | Sequence[int], positions: torch.Tensor | Sequence[int],
                 block_size: int | None = None) -> torch.Tensor:
    """Flat slot index [T] of each token position [T] of one sequence."""
    if isinstance(block_table, BlockTable):
        block_size, block_table = block_table.block_size, block_table.blocks
    if block_size is None:
        raise ValueError("slot_mapping needs block_size when given a plain list of block ids")
    pos = torch.as_tensor(positions, dtype=torch.long)  # [T]
    table = torch.as_tensor(list(block_table), dtype=torch.long, device=pos.device)  # [num blocks]
    if pos.numel() and int(pos.max()) >= table.numel() * block_size:
        raise ValueError(f"position {int(pos.max())} is beyond the table's {table.numel() * block_size} slots; "
                         "allocate blocks before writing")
    return table[pos // block_size] * block_size + pos % block_size


def kv_bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    """Bytes of K and V that one token occupies across all layers."""
    return num_layers * 2 * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


def num_blocks_for_bytes(budget_bytes: int, block_size: int, num_layers: int, num_kv_heads: int,
                         head_dim: int, dtype: torch.dtype) -> int:
    """How many blocks fit in ``budget_bytes`` (for the planner and the engine's sizing)."""
    return budget_bytes // (block_size * kv_bytes_per_token(num_layers, num_kv_heads, head_dim, dtype))


class PagedKVCache:
    """K/V storage ``[L, 2, N, S, Hkv, Dh]``; ``device="meta"`` gives the sizes without memory."""

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype = torch.bfloat16, device: torch.device | str = "cpu"):
        self.num_layers, self.num_blocks, self.block_size = num_layers, num_blocks, block_size
        self.num_kv_heads, self.head_dim, self.dtype = num_kv_heads, head_dim, dtype
        shape = (num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim)
        self.kv = torch.zeros(shape, dtype=dtype, device=device)  # [L, 2, N, S, Hkv, Dh]

    @property
    def bytes_per_block(self) -> int:
        return self.block_size * kv_bytes_per_token(self.num_layers, self.num_kv_heads, self.head_dim, self.dtype)

    @property
    def bytes_total(self) -> int:
        return self.num_blocks * self.bytes_per_block

    def _slots_view(self, layer: int) -> torch.Tensor:
        return self.kv[layer].view(2, self.num_blocks * self.block_size, self.num_kv_heads, self.head_dim)

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store k, v [T, Hkv, Dh] at flat ``slots`` [T]; slots < 0 (padding) are skipped."""
        flat = self._slots_view(layer)  # [2, N*S, Hkv, Dh]
        slots = slots.to(flat.device, torch.long)
        keep = slots >= 0  # [T]
        flat[0].index_copy_(0, slots[keep], k[keep].to(self.dtype))
        flat[1].index_copy_(0, slots[keep], v[keep].to(self.dtype))

    def gather(self, layer: int, block_table: BlockTable | Sequence[int], length: int
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """The first ``length`` tokens' K and V of one sequence, each [length, Hkv, Dh] (a copy)."""
        flat = self._slots_view(layer)
        slots = slot_mapping(block_table, torch.arange(length, device=flat.device), self.block_size)
        return flat[0][slots], flat[1][slots]
