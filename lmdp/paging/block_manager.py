"""The block manager: which KV-cache blocks each sequence owns, and prefix caching of full blocks.

A full block is keyed by a hash chained over every token up to its end, so equal keys mean equal prefixes (up to a
64-bit hash collision). A block's reference count is the number of sequences using it. When it drops to zero a
keyed block is not wiped: it waits in an LRU list, still findable by its key, until a fresh block is needed and
no never-keyed block is left. Sequences free their blocks tail first, so the tail of a prompt is evicted before
its head, and the heads that many prompts share stay longest.
"""
from collections import OrderedDict
from collections.abc import Sequence as Seq
from dataclasses import dataclass

from .block_allocator import BlockAllocator, OutOfBlocks


@dataclass
class PrefixCacheStats:
    hit_blocks: int = 0     # blocks sequences took from the cache instead of computing them
    hit_tokens: int = 0


def _chain(parent: int | None, tokens: Seq[int]) -> int:
    return hash((parent, tuple(tokens)))


class BlockManager:
    """Owns the KV pool's block ids; a sequence is anything with `token_ids`, `num_cached`, `blocks` and
    `block_hashes` lists (see `lmdp.engine.sequence.Sequence`)."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = False,
                 shuffle_seed: int | None = None):
        self.num_blocks, self.block_size = num_blocks, block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._allocator = BlockAllocator(num_blocks, shuffle_seed)
        self._ref = [0] * num_blocks
        self._hash_of: dict[int, int] = {}              # block -> key, for keyed blocks
        self._block_of: dict[int, int] = {}             # key -> block
        self._evictable: OrderedDict[int, None] = OrderedDict()   # keyed blocks nobody uses, oldest first
        self.stats = PrefixCacheStats()

    @property
    def num_free(self) -> int:
        """Blocks a sequence could be given now (never-keyed ones and evictable cached ones)."""
        return self._allocator.num_free + len(self._evictable)

    @property
    def num_used(self) -> int:
        """Blocks some sequence holds."""
        return self.num_blocks - self.num_free

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def match_prefix(self, seq) -> list[int]:
        """Cached blocks holding a prefix of `seq.token_ids`. At least one token is left out, so the prefill that
        follows has a last position to take logits from."""
        if not self.enable_prefix_caching:
            return []
        found, key = [], None
        bs = self.block_size
        for i in range((seq.num_tokens - 1) // bs):
            key = _chain(key, seq.token_ids[i * bs:(i + 1) * bs])
            block = self._block_of.get(key)
            if block is None:
                break
            found.append(block)
        return found

    def can_allocate(self, seq, num_tokens: int, prefix: Seq[int] = ()) -> bool:
        """Whether `seq` can hold `num_tokens` tokens, taking the cached blocks `prefix` first."""
        new = self.blocks_for(num_tokens) - len(seq.blocks) - len(prefix)
        revived = sum(1 for b in prefix if self._ref[b] == 0)   # evictable now, taken off that list
        return new <= self.num_free - revived

    def allocate(self, seq, num_tokens: int, prefix: Seq[int] = ()) -> bool:
        """Give `seq` blocks for `num_tokens` tokens (the cached `prefix` blocks first); False, changing nothing,
        when the pool is short."""
        if not self.can_allocate(seq, num_tokens, prefix):
            return False
        if prefix:
            assert not seq.blocks, 'a prefix is only taken by a sequence that holds no blocks'
            for block in prefix:
                if self._ref[block] == 0:
                    del self._evictable[block]
                self._ref[block] += 1
                seq.block_hashes.append(self._hash_of[block])
            seq.blocks.extend(prefix)
            seq.num_cached = len(prefix) * self.block_size
            self.stats.hit_blocks += len(prefix)
            self.stats.hit_tokens += seq.num_cached
        for _ in range(self.blocks_for(num_tokens) - len(seq.blocks)):
            seq.blocks.append(self._fresh_block())
        return True

    def _fresh_block(self) -> int:
        if self._allocator.num_free:
            block = self._allocator.allocate(1)[0]
        elif self._evictable:
            block, _ = self._evictable.popitem(last=False)
            del self._block_of[self._hash_of.pop(block)]
        else:
            raise OutOfBlocks('no free KV-cache block (can_allocate should have been asked first)')
        self._ref[block] = 1
        return block

    def free(self, seq):
        """Drop `seq`'s hold on its blocks; it keeps none and has nothing cached."""
        for block in reversed(seq.blocks):
            self._ref[block] -= 1
            if self._ref[block] == 0:
                if block in self._hash_of:
                    self._evictable[block] = None
                else:
                    self._allocator.free([block])
        seq.blocks.clear()
        seq.block_hashes.clear()
        seq.num_cached = 0

    def register_full_blocks(self, seq):
        """Key each block of `seq` that has become full of cached tokens, so later prompts can share it."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        while len(seq.block_hashes) < seq.num_cached // bs:
            i = len(seq.block_hashes)
            key = _chain(seq.block_hashes[-1] if i else None, seq.token_ids[i * bs:(i + 1) * bs])
            seq.block_hashes.append(key)
            block = seq.blocks[i]
            # an equal block computed by another sequence keeps the key; this one stays private
            if key not in self._block_of and block not in self._hash_of:
                self._block_of[key] = block
                self._hash_of[block] = key
