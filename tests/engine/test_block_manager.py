"""The block manager: allocation, reference counts, prefix matching and LRU eviction of cached blocks."""
from lmdp.engine.sequence import SamplingParams, Sequence
from lmdp.paging import BlockManager


def seq(tokens, i=0):
    return Sequence(i, list(tokens), len(tokens), SamplingParams(max_new_tokens=1))


def compute(bm, s, upto=None):
    """As a step would: hold blocks for the tokens, mark them cached, key the full blocks."""
    upto = s.num_tokens if upto is None else upto
    assert bm.allocate(s, upto)
    s.num_cached = upto
    bm.register_full_blocks(s)


def test_allocate_grows_and_free_returns_everything():
    bm = BlockManager(8, 4)
    a = seq(range(10))
    assert bm.allocate(a, 10) and len(a.blocks) == 3 and bm.num_used == 3
    assert bm.allocate(a, 12) and len(a.blocks) == 3          # still fits
    assert bm.allocate(a, 13) and len(a.blocks) == 4
    assert not bm.can_allocate(seq(range(20), 1), 20)         # 5 needed, 4 free
    before = list(a.blocks)
    assert not bm.allocate(a, 40) and a.blocks == before     # refused without a change
    bm.free(a)
    assert bm.num_used == 0 and a.blocks == [] and a.num_cached == 0


def test_prefix_blocks_are_shared_counted_and_leave_one_token():
    bm = BlockManager(16, 4, enable_prefix_caching=True)
    a = seq([1, 2, 3, 4, 5, 6, 7, 8, 9, 10])
    compute(bm, a)
    assert len(a.block_hashes) == 2                            # two full blocks keyed, the third is partial
    b = seq([1, 2, 3, 4, 5, 6, 7, 8, 99], 1)
    prefix = bm.match_prefix(b)
    assert prefix == a.blocks[:2]
    assert bm.allocate(b, b.num_tokens, prefix) and b.num_cached == 8 and b.blocks[:2] == a.blocks[:2]
    assert bm.num_used == 4                                    # 3 for a, 1 new for b
    whole = seq([1, 2, 3, 4, 5, 6, 7, 8], 2)                   # a full match keeps its last block to compute
    assert bm.match_prefix(whole) == a.blocks[:1]
    other = seq([1, 2, 3, 5, 5, 6, 7, 8, 9], 3)                # differs in block 0: nothing matches
    assert bm.match_prefix(other) == []
    bm.free(a)
    assert bm.num_used == 3                                    # b still holds the shared two
    bm.free(b)
    assert bm.num_used == 0 and bm.stats.hit_blocks == 2


def test_freed_cached_blocks_are_revived_or_evicted_oldest_first():
    bm = BlockManager(4, 4, enable_prefix_caching=True)
    a, b = seq([1, 2, 3, 4, 5]), seq([9, 9, 9, 9, 5], 1)
    compute(bm, a)
    compute(bm, b)
    bm.free(a)
    bm.free(b)
    assert bm.num_free == 4 and bm.num_used == 0
    # revived: a's first block comes back without being computed
    a2 = seq([1, 2, 3, 4, 7], 2)
    assert bm.allocate(a2, 5, bm.match_prefix(a2)) and a2.num_cached == 4
    # a fresh sequence takes the last never-keyed block, then evicts b's keyed one (the only one unused)
    c = seq(range(100, 108), 3)
    assert bm.allocate(c, 8) and not bm.can_allocate(seq([0], 9), 1)
    assert bm.match_prefix(seq([9, 9, 9, 9, 5], 4)) == []
    assert bm.match_prefix(seq([1, 2, 3, 4, 5], 5)) == a2.blocks[:1]
    bm.free(a2)
    bm.free(c)
    assert bm.num_used == 0


def test_equal_blocks_computed_twice_keep_one_key():
    bm = BlockManager(8, 4, enable_prefix_caching=True)
    a, b = seq([1, 2, 3, 4, 5]), seq([1, 2, 3, 4, 6], 1)
    compute(bm, a)
    compute(bm, b)                                             # computed side by side: b's block stays private
    bm.free(b)
    assert bm.num_free == 8 - len(a.blocks)                    # b's private block went straight back
    assert bm.match_prefix(seq([1, 2, 3, 4, 7], 2)) == a.blocks[:1]


def test_eviction_takes_the_least_recently_freed_block():
    bm = BlockManager(2, 4, enable_prefix_caching=True)
    a, b = seq([1, 2, 3, 4]), seq([9, 9, 9, 9], 1)
    compute(bm, a)
    compute(bm, b)
    a_block, b_block = a.blocks[0], b.blocks[0]
    bm.free(a)
    bm.free(b)
    c = seq([5], 2)
    assert bm.allocate(c, 1) and c.blocks == [a_block]         # no plain block is left: a's, freed first, goes
    assert bm.match_prefix(seq([1, 2, 3, 4, 0], 3)) == []
    assert bm.match_prefix(seq([9, 9, 9, 9, 0], 4)) == [b_block]
