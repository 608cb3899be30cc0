"""Paged KV cache bookkeeping: the free list and the block manager (with prefix caching) over it."""
from .block_allocator import BlockAllocator, OutOfBlocks
from .block_manager import BlockManager, PrefixCacheStats

__all__ = ['BlockAllocator', 'BlockManager', 'OutOfBlocks', 'PrefixCacheStats']
