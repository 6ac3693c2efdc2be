"""Block pool (allocation, refcounts, prefix cache, LRU eviction), block tables, slots and storage."""

import pytest
import torch

from ernie45.kv_cache import (BlockPool, BlockTable, PagedKVCache, hash_block, hash_blocks, kv_bytes_per_token,
                              num_blocks_for_bytes, slot_mapping)

# ----------------------------------------------------------------------------- hashing


def test_block_hash_is_chained_and_deterministic():
    a = hash_block(None, [1, 2, 3])
    assert a == hash_block(None, [1, 2, 3]) and a != hash_block(None, [1, 2, 4])
    assert hash_block(a, [4, 5, 6]) != hash_block(None, [4, 5, 6])  # same tokens, different prefix


def test_hash_blocks_only_full_blocks_and_extends_known():
    tokens = list(range(10))
    hashes = hash_blocks(tokens, 4)
    assert len(hashes) == 2 and hashes[1] == hash_block(hashes[0], [4, 5, 6, 7])
    assert hash_blocks(tokens, 4, 1) == hashes[:1]
    assert hash_blocks(tokens + [10, 11], 4, known=hashes)[:2] == hashes


# ----------------------------------------------------------------------------- pool

def test_allocate_and_free_with_refcounts():
    pool = BlockPool(4, 2)
    blocks = pool.allocate(3)
    assert len(set(blocks)) == 3 and pool.num_free_blocks == 1
    assert all(pool.ref_count(b) == 1 for b in blocks)
    pool.acquire(blocks[:1])
    pool.free(blocks)
    assert pool.num_free_blocks == 3 and pool.ref_count(blocks[0]) == 1
    pool.free(blocks[:1])
    assert pool.num_free_blocks == 4


def test_overdraw_and_double_free_are_errors():
    pool = BlockPool(2, 4)
    with pytest.raises(ValueError, match="only 2 of 2 are free"):
        pool.allocate(3)
    (block,) = pool.allocate(1)
    pool.free([block])
    with pytest.raises(ValueError, match="freed more often"):
        pool.free([block])


def test_prefix_hit_shares_blocks():
    pool = BlockPool(8, 2)
    hashes = hash_blocks([1, 2, 3, 4, 5, 6], 2)
    blocks = pool.allocate(3)
    for b, h in zip(blocks, hashes):
        assert pool.cache_block(b, h)
    assert pool.match_prefix(hashes) == blocks
    other = hash_blocks([1, 2, 3, 4, 9, 9], 2)
    assert pool.match_prefix(other) == blocks[:2]  # stops at the first miss
    assert pool.match_prefix(hash_blocks([0, 2, 3, 4], 2)) == []
    pool.acquire(blocks[:2])
    assert [pool.ref_count(b) for b in blocks] == [2, 2, 1]


def test_cached_block_survives_free_until_evicted_lru():
    pool = BlockPool(3, 1)
    blocks = pool.allocate(3)
    hashes = [hash_block(None, [t]) for t in range(3)]
    for b, h in zip(blocks, hashes):
        pool.cache_block(b, h)
    pool.free([blocks[2], blocks[0], blocks[1]])  # released in this order
    assert pool.num_free_blocks == 3 and pool.num_cached_blocks == 3
    assert pool.match_prefix(hashes[:1]) == blocks[:1]  # still a hit after free
    pool.acquire([blocks[0]])  # a hit takes the block out of the evictable set
    (new,) = pool.allocate(1)
    assert new == blocks[2]  # least recently released goes first
    assert pool.match_prefix([hashes[2]]) == [] and not pool.is_cached(new)
    assert pool.allocate(1) == [blocks[1]]
    with pytest.raises(ValueError):
        pool.allocate(1)  # blocks[0] is referenced again


def test_allocation_prefers_never_cached_blocks():
    pool = BlockPool(3, 1)
    cached = pool.allocate(1)
    pool.cache_block(cached[0], hash_block(None, [7]))
    pool.free(cached)
    assert cached[0] not in pool.allocate(2)
    assert pool.match_prefix([hash_block(None, [7])]) == cached


def test_duplicate_content_is_cached_once():
    pool = BlockPool(2, 1)
    a, b = pool.allocate(2)
    h = hash_block(None, [5])
    assert pool.cache_block(a, h) and not pool.cache_block(b, h)
    pool.free([a, b])
    assert pool.match_prefix([h]) == [a] and not pool.is_cached(b)


def test_prefix_caching_can_be_disabled():
    pool = BlockPool(2, 1, enable_prefix_caching=False)
    (a,) = pool.allocate(1)
    h = hash_block(None, [5])
    assert not pool.cache_block(a, h) and pool.match_prefix([h]) == []


# ----------------------------------------------------------------------------- tables and slots

def test_block_table_growth_and_release_tail_first():
    pool = BlockPool(4, 4)
    table = BlockTable(4)
    assert table.blocks_needed(1) == 1 and table.blocks_needed(9) == 3
    table.blocks.extend(pool.allocate(table.blocks_needed(9)))
    assert table.capacity == 12 and table.blocks_needed(12) == 0 and table.blocks_needed(13) == 1
    for i, b in enumerate(table.blocks):
        pool.cache_block(b, hash_block(None, [i]))
    first, _, last = table.blocks
    table.release(pool)
    assert len(table) == 0 and pool.num_free_blocks == 4
    pool.allocate(1)  # the never-used block
    assert pool.allocate(1) == [last]  # the tail is evicted before the shared-prefix head
    assert pool.is_cached(first)


def test_slot_mapping():
    table = BlockTable(4, [7, 2])
    assert slot_mapping(table, [0, 3, 4, 6]).tolist() == [28, 31, 8, 10]
    assert slot_mapping([7, 2], torch.tensor([5]), block_size=4).tolist() == [9]
    with pytest.raises(ValueError, match="beyond the table's 8 slots"):
        slot_mapping(table, [8])
    with pytest.raises(ValueError, match="needs block_size"):
        slot_mapping([7, 2], [0])


# ----------------------------------------------------------------------------- storage

def test_byte_accounting():
    assert kv_bytes_per_token(3, 2, 8, torch.bfloat16) == 3 * 2 * 2 * 8 * 2
    cache = PagedKVCache(3, 5, 4, 2, 8, dtype=torch.float32, device="meta")
    assert cache.bytes_per_block == 4 * kv_bytes_per_token(3, 2, 8, torch.float32)
    assert cache.bytes_total == 5 * cache.bytes_per_block
    assert cache.kv.shape == (3, 2, 5, 4, 2, 8)
    assert num_blocks_for_bytes(cache.bytes_total + cache.bytes_per_block - 1, 4, 3, 2, 8, torch.float32) == 5


def test_write_then_gather_roundtrip():
    cache = PagedKVCache(2, 6, 4, 2, 3, dtype=torch.float32)
    table = BlockTable(4, [5, 0, 3])
    k, v = torch.randn(10, 2, 3), torch.randn(10, 2, 3)  # [T, Hkv, Dh]
    cache.write(1, slot_mapping(table, range(6)), k[:6], v[:6])  # a prefill chunk ...
    cache.write(1, slot_mapping(table, range(6, 10)), k[6:], v[6:])  # ... then the rest
    got_k, got_v = cache.gather(1, table, 10)
    assert torch.equal(got_k, k) and torch.equal(got_v, v)
    assert torch.count_nonzero(cache.kv[0]) == 0  # other layer untouched
    assert torch.equal(cache.kv[1, 0, 5, 2], k[2])


def test_write_skips_padding_slots():
    cache = PagedKVCache(1, 2, 2, 1, 1, dtype=torch.float32)
    k = torch.tensor([1.0, 2.0, 3.0]).view(3, 1, 1)
    cache.write(0, torch.tensor([1, -1, 2]), k, -k)
    assert cache.kv[0, 0].flatten().tolist() == [0.0, 1.0, 3.0, 0.0]
    assert cache.kv[0, 1].flatten().tolist() == [0.0, -1.0, -3.0, 0.0]
