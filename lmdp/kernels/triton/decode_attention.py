"""Decode attention (one query token per sequence) over the paged KV cache: flash-decoding.

Grid `(Hk * head_blocks, batch, num_splits)`. Each program takes the query heads of one KV group (padded to a
tile of >= 16 rows so the scores are a tensor-core `tl.dot`) and one split of the sequence's keys, so every K/V
element is read from memory once per group. The split boundaries are computed in the kernel from the sequence's
own length, so the grid depends only on `num_splits`: the kernel is CUDA-graph safe, and the same graph serves any
context length. Inside a split the keys are walked in tiles of BLOCK_N; each key's physical block comes from the
block table (`pos // PAGE_SIZE`), so BLOCK_N is independent of the cache's block size.

Each split leaves a normalised partial output and its log-sum-exp (base 2); `_reduce_kernel` merges them. With a
single split the first kernel writes the output directly and no reduce is launched.
"""
import math
from typing import Optional

import torch
import triton
import triton.language as tl

from ._common import dot_precision, next_pow2, num_sms, tanh

# a split gets at least this many keys (fewer splits for short contexts: the reduce isn't free)
_MIN_KEYS_PER_SPLIT = 256
_MAX_SPLITS = 64


@triton.jit
def _decode_split_kernel(
    Q, K, V, BlockOffsets, QStartLoc, QSeqlens, KVSeqlens, Out, PartO, PartLse,
    sm_scale, softcap, window,
    stride_qt, stride_qh, stride_qd,
    stride_kb, stride_ks, stride_kh, stride_kd,
    stride_vb, stride_vs, stride_vh, stride_vd,
    stride_bo,
    stride_ot, stride_oh, stride_od,
    stride_pb, stride_ph, stride_ps,
    GROUP: tl.constexpr, HEAD_BLOCKS: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_N: tl.constexpr,
    PAGE_SIZE: tl.constexpr, NUM_SPLITS: tl.constexpr,
    USE_SOFTCAP: tl.constexpr, USE_WINDOW: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid_h = tl.program_id(0)
    b = tl.program_id(1)
    split = tl.program_id(2)
    kv_head = pid_h // HEAD_BLOCKS
    head_block = pid_h % HEAD_BLOCKS

    q_len = tl.load(QSeqlens + b)
    if q_len == 0:
        return
    kv_len = tl.load(KVSeqlens + b).to(tl.int32)
    tok = tl.load(QStartLoc + b).to(tl.int64)

    # this split's key range
    lo = 0
    if USE_WINDOW:
        lo = tl.maximum(kv_len - window, 0)
    lo_aligned = (lo // BLOCK_N) * BLOCK_N
    per_split = tl.cdiv(tl.cdiv(kv_len - lo_aligned, NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = lo_aligned + split * per_split
    end = tl.minimum(start + per_split, kv_len)

    offs_g = head_block * BLOCK_H + tl.arange(0, BLOCK_H)
    h_mask = offs_g < GROUP
    heads = kv_head * GROUP + offs_g
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    d_mask = offs_d < HEAD_DIM
    dv_mask = offs_dv < HEAD_DIM_V

    q = tl.load(Q + tok * stride_qt + heads[:, None] * stride_qh + offs_d[None, :] * stride_qd,
                mask=h_mask[:, None] & d_mask[None, :], other=0.0)

    k_base = K + kv_head * stride_kh + offs_d[None, :] * stride_kd
    v_base = V + kv_head * stride_vh + offs_dv[None, :] * stride_vd
    bo_base = BlockOffsets + b.to(tl.int64) * stride_bo

    m_i = tl.zeros([BLOCK_H], dtype=tl.float32) - 1.0e30
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_DV], dtype=tl.float32)
    qk_scale = sm_scale * 1.4426950408889634

    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_mask = offs_n < end
        block = tl.load(bo_base + offs_n // PAGE_SIZE, mask=n_mask, other=0).to(tl.int64)
        slot = offs_n % PAGE_SIZE
        k = tl.load(k_base + block[:, None] * stride_kb + slot[:, None] * stride_ks,
                    mask=n_mask[:, None] & d_mask[None, :], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        if USE_SOFTCAP:
            s = softcap * tanh(s * (sm_scale / softcap)) * 1.4426950408889634
        else:
            s = s * qk_scale
        valid = n_mask
        if USE_WINDOW:
            valid = valid & (offs_n >= lo)
        s = tl.where(valid[None, :], s, float('-inf'))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + block[:, None] * stride_vb + slot[:, None] * stride_vs,
                    mask=n_mask[:, None] & dv_mask[None, :], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    has = l_i > 0
    o = acc / tl.where(has, l_i, 1.0)[:, None]
    if NUM_SPLITS == 1:
        tl.store(Out + tok * stride_ot + heads[:, None] * stride_oh + offs_dv[None, :] * stride_od,
                 o.to(Out.dtype.element_ty), mask=h_mask[:, None] & dv_mask[None, :])
    else:
        lse = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float('-inf'))
        part = b.to(tl.int64) * stride_pb + heads * stride_ph + split * stride_ps
        tl.store(PartLse + part, lse, mask=h_mask)
        tl.store(PartO + part[:, None] * HEAD_DIM_V + offs_dv[None, :], o,
                 mask=h_mask[:, None] & dv_mask[None, :])


@triton.jit
def _reduce_kernel(
    PartO, PartLse, QStartLoc, QSeqlens, Out,
    stride_pb, stride_ph, stride_ps,
    stride_ot, stride_oh, stride_od,
    HEAD_DIM_V: tl.constexpr, BLOCK_DV: tl.constexpr, NUM_SPLITS: tl.constexpr, BLOCK_S: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    q_len = tl.load(QSeqlens + b)
    if q_len == 0:
        return
    tok = tl.load(QStartLoc + b).to(tl.int64)
    offs_s = tl.arange(0, BLOCK_S)
    offs_dv = tl.arange(0, BLOCK_DV)
    s_mask = offs_s < NUM_SPLITS
    dv_mask = offs_dv < HEAD_DIM_V
    part = b.to(tl.int64) * stride_pb + h * stride_ph + offs_s * stride_ps
    lse = tl.load(PartLse + part, mask=s_mask, other=float('-inf'))
    live = lse > float('-inf')
    mx = tl.max(lse, 0)
    mx = tl.where(mx > float('-inf'), mx, 0.0)
    w = tl.where(live, tl.exp2(lse - mx), 0.0)
    denom = tl.sum(w, 0)
    o = tl.load(PartO + part[:, None] * HEAD_DIM_V + offs_dv[None, :],
                mask=live[:, None] & dv_mask[None, :], other=0.0)
    res = tl.sum(o * w[:, None], 0) / tl.where(denom > 0, denom, 1.0)
    tl.store(Out + tok * stride_ot + h * stride_oh + offs_dv * stride_od, res.to(Out.dtype.element_ty), mask=dv_mask)


def choose_num_splits(batch: int, num_kv_heads: int, head_blocks: int, device: torch.device,
                      max_kv_seqlen: Optional[int] = None) -> int:
    """Enough splits to put ~2 programs on every SM, no split shorter than _MIN_KEYS_PER_SPLIT keys (when the
    longest context is known), a power of two so that few distinct kernels/graphs arise."""
    programs = max(1, batch * num_kv_heads * head_blocks)
    splits = triton.cdiv(2 * num_sms(device), programs)
    if max_kv_seqlen is not None:
        splits = min(splits, triton.cdiv(max(int(max_kv_seqlen), 1), _MIN_KEYS_PER_SPLIT))
    splits = max(1, min(splits, _MAX_SPLITS))
    return 1 << (splits.bit_length() - 1)  # the power of two at or below


def decode_attention_fwd(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_offsets: torch.Tensor,
                         q_start_loc: torch.Tensor, q_seqlens: torch.Tensor, kv_seqlens: torch.Tensor,
                         out: torch.Tensor, scale: Optional[float] = None, sliding_window: Optional[int] = None,
                         logit_softcapping: Optional[float] = None, max_kv_seqlen: Optional[int] = None,
                         num_splits: Optional[int] = None, block_n: Optional[int] = None,
                         num_warps: int = 4, num_stages: Optional[int] = None) -> torch.Tensor:
    """Every sequence has q_seqlen 0 or 1 (its query is the token at q_start_loc[b]). No host sync.

    block_n / num_warps / num_stages override the tile config (benchmark sweeps)."""
    num_tokens, num_heads, head_dim = q.shape
    batch = q_seqlens.numel()
    _, page_size, num_kv_heads, _ = k_cache.shape
    head_dim_v = v_cache.size(-1)
    group = num_heads // num_kv_heads
    scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
    if batch == 0 or num_tokens == 0:
        return out

    block_h = min(max(16, next_pow2(group)), 64)
    head_blocks = triton.cdiv(group, block_h)
    block_d = max(16, next_pow2(head_dim))
    block_dv = max(16, next_pow2(head_dim_v))
    block_n = block_n or (64 if max(block_d, block_dv) <= 128 else 32)
    if num_stages is None:
        num_stages = 3 if block_n * max(block_d, block_dv) <= 64 * 128 else 2
    if num_splits is None:
        num_splits = choose_num_splits(batch, num_kv_heads, head_blocks, q.device, max_kv_seqlen)
    use_window = sliding_window is not None and sliding_window > 0
    use_softcap = bool(logit_softcapping)

    if num_splits > 1:
        part_o = torch.empty(batch, num_heads, num_splits, head_dim_v, dtype=torch.float32, device=q.device)
        part_lse = torch.empty(batch, num_heads, num_splits, dtype=torch.float32, device=q.device)
    else:
        part_o = part_lse = out  # unused
    stride_pb, stride_ph, stride_ps = (num_heads * num_splits, num_splits, 1)

    grid = (num_kv_heads * head_blocks, batch, num_splits)
    _decode_split_kernel[grid](
        q, k_cache, v_cache, block_offsets, q_start_loc, q_seqlens, kv_seqlens, out, part_o, part_lse,
        scale, float(logit_softcapping) if use_softcap else 1.0, int(sliding_window) if use_window else 0,
        q.stride(0), q.stride(1), q.stride(2),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), k_cache.stride(3),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), v_cache.stride(3),
        block_offsets.stride(0),
        out.stride(0), out.stride(1), out.stride(2),
        stride_pb, stride_ph, stride_ps,
        GROUP=group, HEAD_BLOCKS=head_blocks, HEAD_DIM=head_dim, HEAD_DIM_V=head_dim_v,
        BLOCK_H=block_h, BLOCK_D=block_d, BLOCK_DV=block_dv, BLOCK_N=block_n,
        PAGE_SIZE=page_size, NUM_SPLITS=num_splits, USE_SOFTCAP=use_softcap, USE_WINDOW=use_window,
        DOT_PRECISION=dot_precision(q), num_warps=num_warps, num_stages=num_stages,
    )
    if num_splits > 1:
        _reduce_kernel[(batch, num_heads)](
            part_o, part_lse, q_start_loc, q_seqlens, out,
            stride_pb, stride_ph, stride_ps,
            out.stride(0), out.stride(1), out.stride(2),
            HEAD_DIM_V=head_dim_v, BLOCK_DV=block_dv, NUM_SPLITS=num_splits, BLOCK_S=max(2, next_pow2(num_splits)),
            num_warps=4 if block_dv <= 256 else 8,
        )
    return out
