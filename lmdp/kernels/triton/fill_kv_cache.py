"""Write this step's K/V `[T, Hk, D]` into the paged cache `[num_blocks, block_size, Hk, D]`.

One program per packed token, moving all its heads of K and V. The token finds its sequence without any host
sync or precomputed index: the number of sequences whose `q_start_loc` is <= the token index, minus one (the
sequences are packed in order, so a zero-length sequence is never the last such one). Tokens past the last
sequence (padding) are left alone. Grid = T, known from the shape: CUDA-graph safe.
"""
import torch
import triton
import triton.language as tl

from ._common import next_pow2


@triton.jit(do_not_specialize=['batch', 'stride_bo'])
def _fill_kv_cache_kernel(
    KStates, VStates, KCache, VCache, QStartLoc, QSeqlens, KVSeqlens, BlockOffsets,
    batch,
    stride_kt, stride_kh, stride_kd,
    stride_vt, stride_vh, stride_vd,
    stride_kcb, stride_kcs, stride_kch, stride_kcd,
    stride_vcb, stride_vcs, stride_vch, stride_vcd,
    stride_bo,
    NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
):
    t = tl.program_id(0)
    offs_b = tl.arange(0, BLOCK_B)
    starts = tl.load(QStartLoc + offs_b, mask=offs_b < batch, other=2147483647)
    b = tl.sum((starts <= t).to(tl.int32), 0) - 1
    if b < 0:
        return
    start = tl.load(QStartLoc + b)
    q_len = tl.load(QSeqlens + b)
    kv_len = tl.load(KVSeqlens + b)
    off = t - start
    if off >= q_len:
        return
    pos = kv_len - q_len + off
    block = tl.load(BlockOffsets + b.to(tl.int64) * stride_bo + pos // PAGE_SIZE).to(tl.int64)
    slot = pos % PAGE_SIZE
    t64 = t.to(tl.int64)

    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    h_mask = offs_h < NUM_KV_HEADS
    k_mask = h_mask[:, None] & (offs_d < HEAD_DIM)[None, :]
    v_mask = h_mask[:, None] & (offs_dv < HEAD_DIM_V)[None, :]
    k = tl.load(KStates + t64 * stride_kt + offs_h[:, None] * stride_kh + offs_d[None, :] * stride_kd, mask=k_mask)
    tl.store(KCache + block * stride_kcb + slot * stride_kcs + offs_h[:, None] * stride_kch
             + offs_d[None, :] * stride_kcd, k.to(KCache.dtype.element_ty), mask=k_mask)
    v = tl.load(VStates + t64 * stride_vt + offs_h[:, None] * stride_vh + offs_dv[None, :] * stride_vd, mask=v_mask)
    tl.store(VCache + block * stride_vcb + slot * stride_vcs + offs_h[:, None] * stride_vch
             + offs_dv[None, :] * stride_vcd, v.to(VCache.dtype.element_ty), mask=v_mask)


def fill_kv_cache(k_states: torch.Tensor, v_states: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  q_start_loc: torch.Tensor, q_seqlens: torch.Tensor, kv_seqlens: torch.Tensor,
                  block_offsets: torch.Tensor) -> None:
    """Scatter k_states/v_states `[T, Hk, D]` into k_cache/v_cache, in place (no host sync)."""
    num_tokens, num_kv_heads, head_dim = k_states.shape
    head_dim_v = v_states.size(-1)
    batch = q_seqlens.numel()
    if num_tokens == 0 or batch == 0:
        return
    block_h = next_pow2(num_kv_heads)
    block_d = next_pow2(head_dim)
    block_dv = next_pow2(head_dim_v)
    elems = block_h * max(block_d, block_dv)
    _fill_kv_cache_kernel[(num_tokens,)](
        k_states, v_states, k_cache, v_cache, q_start_loc, q_seqlens, kv_seqlens, block_offsets,
        batch,
        k_states.stride(0), k_states.stride(1), k_states.stride(2),
        v_states.stride(0), v_states.stride(1), v_states.stride(2),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), k_cache.stride(3),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), v_cache.stride(3),
        block_offsets.stride(0),
        NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim, HEAD_DIM_V=head_dim_v,
        # BLOCK_B: the sequences searched for each token's own; at least 64 so that steps of 2..64 sequences share
        # one compiled variant instead of one per power of two
        BLOCK_B=max(64, next_pow2(batch)), BLOCK_H=block_h, BLOCK_D=block_d, BLOCK_DV=block_dv,
        PAGE_SIZE=k_cache.size(1),
        num_warps=4 if elems <= 4096 else 8,
    )
