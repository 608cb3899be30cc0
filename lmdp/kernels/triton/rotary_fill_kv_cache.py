"""Rotary on q/k in place and the rotated k plus v written into the paged cache, in one launch.

Batch-1 decode is bound by kernel launches, not by bytes: rotary followed by the cache fill costs two launches
per layer for a few KiB of data. Fusing them also saves re-reading k from memory for the fill.

Grid `(T, 2)`: program (t, 0) rotates all query heads of token t; program (t, 1) rotates all its key heads,
writes them back into k (so k after the call is what the unfused rotary leaves) and stores the full key head
(rotated channels 0..R, pass-through channels R..D) and the value head into the token's cache slot. Every
token is rotated, as the reference does; only the cache write depends on the batch layout. A token finds its
sequence with no host sync (like `fill_kv_cache`): the number of sequences whose `q_start_loc` is <= t, minus
one. Tokens past the last sequence (padding) get no cache write. The grid depends on T alone, so the launch
can be captured in a CUDA graph. Math in float32; q/k are stored in their dtype, the cache in its own (the
rotated k is rounded to k's dtype first, exactly as the unfused path rounds it).
"""
import torch
import triton
import triton.language as tl

from ..rotary_fill_kv_cache import check_rotary_fill_shapes
from ._common import next_pow2, pdl_launch, pdl_wait
from .rotary import cos_sin_row


@triton.jit
def _rotate_in_place(X, t, c1, s1, c2, s2, stride_xt, stride_xh, stride_xd,
                     NUM_HEADS: tl.constexpr, HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
    """Neox rotate_half of the first 2*HALF channels of every head of token t of X; returns the rotated halves
    (already rounded to X's dtype) for the caller to reuse."""
    offs_h = tl.arange(0, BLOCK_H)
    offs_r = tl.arange(0, BLOCK_HALF)
    mask = (offs_h < NUM_HEADS)[:, None] & (offs_r < HALF)[None, :]
    p1 = X + t * stride_xt + offs_h[:, None] * stride_xh + offs_r[None, :] * stride_xd
    p2 = p1 + HALF * stride_xd
    # both halves are loaded before either is stored: in place is safe
    x1 = tl.load(p1, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(p2, mask=mask, other=0.0).to(tl.float32)
    y1 = (x1 * c1[None, :] - x2 * s1[None, :]).to(X.dtype.element_ty)
    y2 = (x2 * c2[None, :] + x1 * s2[None, :]).to(X.dtype.element_ty)
    tl.store(p1, y1, mask=mask)
    tl.store(p2, y2, mask=mask)
    return y1, y2


@triton.jit(do_not_specialize=['batch', 'stride_bob'])
def _rotary_fill_kv_cache_kernel(
    Q, K, V, Cos, Sin, KCache, VCache, QStartLoc, QSeqlens, KVSeqlens, BlockOffsets,
    batch,
    stride_qt, stride_qh, stride_qd,
    stride_kt, stride_kh, stride_kd,
    stride_vt, stride_vh, stride_vd,
    stride_ct, stride_cd, stride_st, stride_sd,
    stride_kcb, stride_kcs, stride_kch, stride_kcd,
    stride_vcb, stride_vcs, stride_vch, stride_vcd,
    stride_sl, stride_ql, stride_kvl, stride_bob, stride_bod,
    NUM_Q_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    ROT_DIM: tl.constexpr, PAGE_SIZE: tl.constexpr,
    BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_REST: tl.constexpr,
    BLOCK_DV: tl.constexpr, BLOCK_B: tl.constexpr, HAS_REST: tl.constexpr, USE_PDL: tl.constexpr,
):
    if USE_PDL:
        pdl_wait()     # everything it reads (q/k/v, cos/sin, the step's metadata) some kernel of the step wrote
    t = tl.program_id(0).to(tl.int64)
    HALF: tl.constexpr = ROT_DIM // 2
    # the token's cos/sin row, loaded once for all of its heads
    c1, s1, c2, s2 = cos_sin_row(Cos, Sin, t, stride_ct, stride_cd, stride_st, stride_sd, HALF, BLOCK_HALF)

    if tl.program_id(1) == 0:
        _rotate_in_place(Q, t, c1, s1, c2, s2, stride_qt, stride_qh, stride_qd,
                         NUM_Q_HEADS, HALF, BLOCK_HQ, BLOCK_HALF)
    else:
        y1, y2 = _rotate_in_place(K, t, c1, s1, c2, s2, stride_kt, stride_kh, stride_kd,
                                  NUM_KV_HEADS, HALF, BLOCK_HK, BLOCK_HALF)

        # The token's sequence b and position. Sequences are packed in order, so a zero-length one is never the
        # last whose start is <= t. `real` is false for padding (b < 0 only when batch == 0, else off >= q_len).
        offs_b = tl.arange(0, BLOCK_B)
        starts = tl.load(QStartLoc + offs_b * stride_sl, mask=offs_b < batch, other=2147483647)
        b = tl.sum((starts <= t).to(tl.int32), 0) - 1
        has_seq = b >= 0
        b = tl.maximum(b, 0).to(tl.int64)
        start = tl.load(QStartLoc + b * stride_sl, mask=has_seq, other=0)
        q_len = tl.load(QSeqlens + b * stride_ql, mask=has_seq, other=0)
        kv_len = tl.load(KVSeqlens + b * stride_kvl, mask=has_seq, other=0)
        off = t - start
        real = has_seq & (off < q_len)
        pos = tl.where(real, kv_len - q_len + off, 0)
        block = tl.load(BlockOffsets + b * stride_bob + (pos // PAGE_SIZE) * stride_bod, mask=real,
                        other=0).to(tl.int64)
        slot = pos % PAGE_SIZE

        # A padding token writes no head: folded into the head mask rather than an early return (which the
        # rotation above must not skip), and as a head count rather than `mask & real` because the interpreter
        # of Triton 3.9 turns a 0-d boolean broadcast in `&` into an int32 mask that tl.store rejects.
        offs_h = tl.arange(0, BLOCK_HK)
        h_mask = offs_h < tl.where(real, NUM_KV_HEADS, 0)
        kc = KCache + block * stride_kcb + slot * stride_kcs + offs_h[:, None] * stride_kch
        offs_r = tl.arange(0, BLOCK_HALF)
        rot_mask = h_mask[:, None] & (offs_r < HALF)[None, :]
        tl.store(kc + offs_r[None, :] * stride_kcd, y1.to(KCache.dtype.element_ty), mask=rot_mask)
        tl.store(kc + (offs_r[None, :] + HALF) * stride_kcd, y2.to(KCache.dtype.element_ty), mask=rot_mask)
        if HAS_REST:
            # channels R..D pass through rotary untouched: straight from k to the cache
            offs_p = ROT_DIM + tl.arange(0, BLOCK_REST)
            p_mask = h_mask[:, None] & (offs_p < HEAD_DIM)[None, :]
            rest = tl.load(K + t * stride_kt + offs_h[:, None] * stride_kh + offs_p[None, :] * stride_kd,
                           mask=p_mask)
            tl.store(kc + offs_p[None, :] * stride_kcd, rest.to(KCache.dtype.element_ty), mask=p_mask)

        offs_dv = tl.arange(0, BLOCK_DV)
        v_mask = h_mask[:, None] & (offs_dv < HEAD_DIM_V)[None, :]
        val = tl.load(V + t * stride_vt + offs_h[:, None] * stride_vh + offs_dv[None, :] * stride_vd, mask=v_mask)
        tl.store(VCache + block * stride_vcb + slot * stride_vcs + offs_h[:, None] * stride_vch
                 + offs_dv[None, :] * stride_vcd, val.to(VCache.dtype.element_ty), mask=v_mask)


def rotary_fill_kv_cache(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                         k_cache: torch.Tensor, v_cache: torch.Tensor, q_start_loc: torch.Tensor,
                         q_seqlens: torch.Tensor, kv_seqlens: torch.Tensor, block_offsets: torch.Tensor) -> None:
    """Same contract as `lmdp.kernels.rotary_fill_kv_cache.rotary_fill_kv_cache` (q, k rotated in place; k, v
    into the cache), in one launch and without a host sync. Any strides everywhere."""
    check_rotary_fill_shapes(q, k, v, cos, sin, k_cache, v_cache, q_start_loc, q_seqlens, kv_seqlens,
                             block_offsets)
    num_tokens, num_q_heads, head_dim = q.shape
    num_kv_heads, head_dim_v = k.size(1), v.size(-1)
    rot_dim = cos.size(-1)
    batch = q_seqlens.numel()
    if num_tokens == 0:
        return
    block_hq = next_pow2(num_q_heads)
    block_half = max(1, next_pow2(rot_dim // 2))
    _rotary_fill_kv_cache_kernel[(num_tokens, 2)](
        q, k, v, cos, sin, k_cache, v_cache, q_start_loc, q_seqlens, kv_seqlens, block_offsets,
        batch,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        cos.stride(0), cos.stride(1), sin.stride(0), sin.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), k_cache.stride(3),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), v_cache.stride(3),
        q_start_loc.stride(0), q_seqlens.stride(0), kv_seqlens.stride(0),
        block_offsets.stride(0), block_offsets.stride(1),
        NUM_Q_HEADS=num_q_heads, NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim, HEAD_DIM_V=head_dim_v,
        ROT_DIM=rot_dim, PAGE_SIZE=k_cache.size(1),
        BLOCK_HQ=block_hq, BLOCK_HK=next_pow2(num_kv_heads), BLOCK_HALF=block_half,
        BLOCK_REST=next_pow2(max(head_dim - rot_dim, 1)), BLOCK_DV=next_pow2(head_dim_v),
        # BLOCK_B: the sequences searched for each token's own; at least 64 so that steps of 2..64 sequences share
        # one compiled variant instead of one per power of two
        BLOCK_B=max(64, next_pow2(batch)), HAS_REST=rot_dim < head_dim,
        # the query program is the larger one: Hq heads x R/2 channels, twice
        num_warps=4 if block_hq * block_half <= 2048 else 8, **pdl_launch(q.device),
    )
