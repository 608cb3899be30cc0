"""Sort the (token, slot) pairs of a step by expert and pad each expert's run to the GEMM's row block: the input
of the grouped GEMMs (see `lmdp.kernels.moe.moe_align`, the reference, for the outputs).

A counting sort, stable within each expert, with no atomics (so it is deterministic and runs the same under the
interpreter). The pairs are cut into chunks of CHUNK:
  1. count: each chunk's pairs per expert;
  2. offsets (one program): expert runs padded to BLOCK_M and laid end to end; where each chunk's pairs of each
     expert start; the expert of every row block; the padding sentinel written everywhere;
  3. scatter: each pair lands at its chunk's start for its expert plus its rank among the chunk's earlier pairs
     of that expert.
Up to FUSED_CHUNKS chunks (decode steps) the three run in one program, one launch. Every grid depends on the
shapes alone, and nothing is read back to the host (CUDA-graph safe).
"""
import torch
import triton
import triton.language as tl

from ..moe import max_padded_pairs
from ._common import next_pow2

CHUNK = 128
FUSED_CHUNKS = 4


@triton.jit
def _chunk_counts(Ids, chunk, num_pairs, CHUNK: tl.constexpr, BLOCK_E: tl.constexpr):
    offs = chunk * CHUNK + tl.arange(0, CHUNK)
    ids = tl.load(Ids + offs, mask=offs < num_pairs, other=-1)
    hits = ids[:, None] == tl.arange(0, BLOCK_E)[None, :]
    return tl.sum(hits.to(tl.int32), axis=0)


@triton.jit
def _scatter_chunk(Ids, SortedPairs, chunk, starts, num_pairs, CHUNK: tl.constexpr, BLOCK_E: tl.constexpr):
    """Place one chunk's pairs; `starts[e]` is where this chunk's first pair of expert e goes."""
    local = tl.arange(0, CHUNK)
    offs = chunk * CHUNK + local
    mask = offs < num_pairs
    ids = tl.load(Ids + offs, mask=mask, other=-1)
    earlier_same = (ids[:, None] == ids[None, :]) & (local[None, :] < local[:, None])
    rank = tl.sum(earlier_same.to(tl.int32), axis=1)
    # starts[ids], gathered from the register vector through a one-hot product
    hits = ids[:, None] == tl.arange(0, BLOCK_E)[None, :]
    start = tl.sum(tl.where(hits, starts[None, :], 0), axis=1)
    tl.store(SortedPairs + start + rank, offs.to(tl.int32), mask=mask)


@triton.jit
def _write_layout(totals, BlockExperts, SortedPairs, NumPadded, num_experts, num_pairs, size,
                  BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_B: tl.constexpr):
    """From the per-expert counts: each expert's padded start, the expert of every row block (-1 past the used
    length), the used length, and the sentinel in every slot of SortedPairs. Returns the starts."""
    experts = tl.arange(0, BLOCK_E)
    padded = tl.where(experts < num_experts, (totals + BLOCK_M - 1) // BLOCK_M * BLOCK_M, 0)
    ends = tl.cumsum(padded, axis=0)
    total = tl.sum(padded, axis=0)
    tl.store(NumPadded, total)
    for s0 in range(0, size, BLOCK_S):
        slots = s0 + tl.arange(0, BLOCK_S)
        tl.store(SortedPairs + slots, tl.full([BLOCK_S], 0, tl.int32) + num_pairs, mask=slots < size)
    for b0 in range(0, size // BLOCK_M, BLOCK_B):
        blocks = b0 + tl.arange(0, BLOCK_B)
        rows = blocks * BLOCK_M
        # the expert whose run holds `rows`: how many runs end at or before it
        expert = tl.sum((ends[None, :] <= rows[:, None]).to(tl.int32), axis=1)
        expert = tl.where(rows < total, expert, -1)
        tl.store(BlockExperts + blocks, expert, mask=rows < size)
    return ends - padded


@triton.jit(do_not_specialize=['num_pairs'])
def _count_kernel(Ids, ChunkCounts, num_pairs, num_experts, CHUNK: tl.constexpr, BLOCK_E: tl.constexpr):
    chunk = tl.program_id(0)
    counts = _chunk_counts(Ids, chunk, num_pairs, CHUNK, BLOCK_E)
    experts = tl.arange(0, BLOCK_E)
    tl.store(ChunkCounts + chunk * num_experts + experts, counts, mask=experts < num_experts)


@triton.jit(do_not_specialize=['num_chunks', 'num_pairs', 'size'])
def _offsets_kernel(ChunkCounts, ChunkStarts, BlockExperts, SortedPairs, NumPadded, num_chunks, num_experts,
                    num_pairs, size, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_E: tl.constexpr,
                    BLOCK_S: tl.constexpr, BLOCK_B: tl.constexpr):
    experts = tl.arange(0, BLOCK_E)
    e_mask = experts < num_experts
    totals = tl.zeros([BLOCK_E], tl.int32)
    for c0 in range(0, num_chunks, BLOCK_C):
        chunks = c0 + tl.arange(0, BLOCK_C)
        mask = (chunks < num_chunks)[:, None] & e_mask[None, :]
        counts = tl.load(ChunkCounts + chunks[:, None] * num_experts + experts[None, :], mask=mask, other=0)
        totals += tl.sum(counts, axis=0)
    running = _write_layout(totals, BlockExperts, SortedPairs, NumPadded, num_experts, num_pairs, size,
                            BLOCK_M, BLOCK_E, BLOCK_S, BLOCK_B)
    for c0 in range(0, num_chunks, BLOCK_C):
        chunks = c0 + tl.arange(0, BLOCK_C)
        mask = (chunks < num_chunks)[:, None] & e_mask[None, :]
        ptrs = chunks[:, None] * num_experts + experts[None, :]
        counts = tl.load(ChunkCounts + ptrs, mask=mask, other=0)
        tl.store(ChunkStarts + ptrs, running[None, :] + tl.cumsum(counts, axis=0) - counts, mask=mask)
        running += tl.sum(counts, axis=0)


@triton.jit(do_not_specialize=['num_pairs'])
def _scatter_kernel(Ids, ChunkStarts, SortedPairs, num_pairs, num_experts, CHUNK: tl.constexpr,
                    BLOCK_E: tl.constexpr):
    chunk = tl.program_id(0)
    experts = tl.arange(0, BLOCK_E)
    starts = tl.load(ChunkStarts + chunk * num_experts + experts, mask=experts < num_experts, other=0)
    _scatter_chunk(Ids, SortedPairs, chunk, starts, num_pairs, CHUNK, BLOCK_E)


@triton.jit(do_not_specialize=['num_chunks', 'num_pairs', 'size'])
def _align_fused_kernel(Ids, BlockExperts, SortedPairs, NumPadded, num_chunks, num_experts, num_pairs, size,
                        BLOCK_M: tl.constexpr, CHUNK: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_S: tl.constexpr,
                        BLOCK_B: tl.constexpr):
    totals = tl.zeros([BLOCK_E], tl.int32)
    for chunk in range(0, num_chunks):
        totals += _chunk_counts(Ids, chunk, num_pairs, CHUNK, BLOCK_E)
    running = _write_layout(totals, BlockExperts, SortedPairs, NumPadded, num_experts, num_pairs, size,
                            BLOCK_M, BLOCK_E, BLOCK_S, BLOCK_B)
    # the sentinel stores above and the pair stores below may hit one address from different threads
    tl.debug_barrier()
    for chunk in range(0, num_chunks):
        _scatter_chunk(Ids, SortedPairs, chunk, running, num_pairs, CHUNK, BLOCK_E)
        running += _chunk_counts(Ids, chunk, num_pairs, CHUNK, BLOCK_E)


def moe_align(topk_ids: torch.Tensor, num_experts: int, block_m: int, fused_chunks: int = FUSED_CHUNKS):
    """`(sorted_pairs, block_experts, num_padded)` as `lmdp.kernels.moe.moe_align` returns them.

    `fused_chunks`: up to this many chunks of pairs, one launch does it all (tests set it to force a path)."""
    ids = topk_ids.reshape(-1)
    if not ids.is_contiguous():
        ids = ids.contiguous()
    num_pairs = ids.numel()
    size = max_padded_pairs(num_pairs, num_experts, block_m)
    device = ids.device
    sorted_pairs = torch.empty(size, dtype=torch.int32, device=device)
    block_experts = torch.empty(size // block_m, dtype=torch.int32, device=device)
    num_padded = torch.empty(1, dtype=torch.int32, device=device)
    num_chunks = triton.cdiv(num_pairs, CHUNK)
    block_e = next_pow2(num_experts)
    # Tiles fixed by the number of experts alone (loops and masks cover any size): one compiled variant per
    # model and BLOCK_M, not one per step size
    block_s = 1024
    block_b = max(1, 4096 // block_e)     # [BLOCK_B, BLOCK_E] tiles
    if num_chunks <= fused_chunks:
        _align_fused_kernel[(1, )](ids, block_experts, sorted_pairs, num_padded, num_chunks, num_experts,
                                   num_pairs, size, BLOCK_M=block_m, CHUNK=CHUNK, BLOCK_E=block_e, BLOCK_S=block_s,
                                   BLOCK_B=block_b, num_warps=4)
        return sorted_pairs, block_experts, num_padded
    chunk_counts = torch.empty(num_chunks, num_experts, dtype=torch.int32, device=device)
    chunk_starts = torch.empty_like(chunk_counts)
    _count_kernel[(num_chunks, )](ids, chunk_counts, num_pairs, num_experts, CHUNK=CHUNK, BLOCK_E=block_e,
                                  num_warps=4)
    block_c = max(1, 4096 // block_e)
    _offsets_kernel[(1, )](chunk_counts, chunk_starts, block_experts, sorted_pairs, num_padded, num_chunks,
                           num_experts, num_pairs, size, BLOCK_M=block_m, BLOCK_C=block_c, BLOCK_E=block_e,
                           BLOCK_S=block_s, BLOCK_B=block_b, num_warps=4)
    _scatter_kernel[(num_chunks, )](ids, chunk_starts, sorted_pairs, num_pairs, num_experts, CHUNK=CHUNK,
                                    BLOCK_E=block_e, num_warps=4)
    return sorted_pairs, block_experts, num_padded
