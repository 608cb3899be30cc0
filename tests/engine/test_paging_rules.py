"""The block pool's smaller promises: the order blocks are handed out in, what a shared prefix costs, hit counts."""
import pytest

from lmdp.engine.sequence import SamplingParams, Sequence
from lmdp.paging import BlockAllocator, BlockManager


def seq(tokens, i=0):
    return Sequence(i, list(tokens), len(tokens), SamplingParams(max_new_tokens=1))


def test_blocks_come_in_order_unless_a_shuffle_seed_is_given():
    assert BlockAllocator(5).allocate(5) == [0, 1, 2, 3, 4]
    shuffled = BlockAllocator(16, shuffle_seed=1).allocate(16)
    assert sorted(shuffled) == list(range(16)) and shuffled != list(range(16))
    assert BlockAllocator(16, shuffle_seed=1).allocate(16) == shuffled          # the seed fixes the order
    assert BlockAllocator(16, shuffle_seed=2).allocate(16) != shuffled
    # the block manager hands its seed on
    a = seq(range(64))
    bm = BlockManager(16, 4, shuffle_seed=1)
    assert bm.allocate(a, 64) and a.blocks == shuffled


def test_a_pool_needs_at_least_one_block():
    assert BlockAllocator(1).allocate(1) == [0]
    for n in (0, -3):
        with pytest.raises(ValueError, match=f'num_blocks must be positive, got {n}'):
            BlockAllocator(n)


def test_a_prefix_held_by_another_sequence_costs_no_free_block():
    bm = BlockManager(3, 4, enable_prefix_caching=True)
    a = seq([1, 2, 3, 4, 5, 6, 7, 8, 9])
    assert bm.allocate(a, 9)
    a.num_cached = 9
    bm.register_full_blocks(a)
    # one block left: b shares a's two full blocks and needs just one of its own
    b = seq([1, 2, 3, 4, 5, 6, 7, 8, 10], 1)
    prefix = bm.match_prefix(b)
    assert prefix == a.blocks[:2] and bm.num_free == 0
    assert not bm.can_allocate(b, 9, prefix)
    bm.free(a)                       # a's blocks wait in the cache: two can be revived, one is free to take
    assert bm.num_free == 3 and bm.can_allocate(b, 9, prefix) and bm.allocate(b, 9, prefix)
    assert b.blocks[:2] == prefix and b.num_cached == 8 and bm.num_free == 0


def test_a_prefix_still_in_use_leaves_room_for_the_rest():
    bm = BlockManager(4, 4, enable_prefix_caching=True)
    a = seq([1, 2, 3, 4, 5, 6, 7, 8, 9])
    assert bm.allocate(a, 9)
    a.num_cached = 9
    bm.register_full_blocks(a)
    b = seq([1, 2, 3, 4, 5, 6, 7, 8, 10], 1)
    prefix = bm.match_prefix(b)
    assert bm.num_free == 1 and bm.can_allocate(b, 9, prefix) and bm.allocate(b, 9, prefix)
    assert bm.num_used == 4 and b.blocks[:2] == a.blocks[:2]


def test_hits_add_up_over_requests():
    bm = BlockManager(16, 4, enable_prefix_caching=True)
    a = seq(range(13))
    assert bm.allocate(a, 13)
    a.num_cached = 13
    bm.register_full_blocks(a)
    for i, n in enumerate((13, 6, 9), start=1):    # 3, 1 and 2 full blocks in common with a
        s = seq(list(range(n - 1)) + [99], i)
        assert bm.allocate(s, s.num_tokens, bm.match_prefix(s))
    assert (bm.stats.hit_blocks, bm.stats.hit_tokens) == (6, 24)


def test_prefix_caching_is_off_unless_asked_for():
    bm = BlockManager(8, 4)
    a = seq(range(9))
    assert bm.allocate(a, 9)
    a.num_cached = 9
    bm.register_full_blocks(a)
    assert a.block_hashes == [] and bm.match_prefix(seq(range(9), 1)) == []
    bm.free(a)
    assert bm.num_free == 8 and bm.allocate(seq(range(32), 2), 32)     # nothing was kept for reuse
