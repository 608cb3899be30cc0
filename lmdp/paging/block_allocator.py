"""A free list over the physical blocks of the KV cache."""
import random


class OutOfBlocks(RuntimeError):
    """The KV cache has fewer free blocks than a request needs."""


class BlockAllocator:
    """Hands out block ids. `shuffle_seed` hands them out in a shuffled order, so tests can prove that nothing
    relies on a sequence's blocks being contiguous."""

    def __init__(self, num_blocks: int, shuffle_seed: int | None = None):
        if num_blocks <= 0:
            raise ValueError(f'num_blocks must be positive, got {num_blocks}')
        self.num_blocks = num_blocks
        free = list(range(num_blocks))
        if shuffle_seed is not None:
            random.Random(shuffle_seed).shuffle(free)
        self._free = free[::-1]   # pop() from the end hands out free[0] first

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise OutOfBlocks(f'need {n} KV-cache blocks, {len(self._free)} free of {self.num_blocks}')
        return [self._free.pop() for _ in range(n)]

    def free(self, blocks: list[int]):
        self._free.extend(reversed(blocks))
