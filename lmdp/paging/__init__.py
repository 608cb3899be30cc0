"""Paged KV cache bookkeeping."""
from .block_allocator import BlockAllocator, OutOfBlocks

__all__ = ['BlockAllocator', 'OutOfBlocks']
