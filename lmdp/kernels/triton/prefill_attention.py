"""Prefill attention (packed queries, with or without history) over the paged KV cache.

Flash-attention forward: grid `(query tiles, batch, Hq)`; a program holds BLOCK_M queries of one head of one
sequence and streams that sequence's keys/values in BLOCK_N tiles read through the block table, with an online
softmax in float32. Key tiles that no query of the tile can see (past the causal diagonal, before the sliding
window) are never visited; the visited range is cut into three parts so that only the tiles that straddle a mask
boundary pay for masking:
    [lo, a_end)      window boundary tiles (masked)
    [a_end, b_end)   tiles every query of the tile sees entirely (no masks at all)
    [b_end, hi)      causal-diagonal / sequence-end tiles (masked)
Causal programs are launched heaviest-first (last query tile first) to shorten the tail.
"""
import math

import torch
import triton
import triton.language as tl

from ._common import dot_precision, next_pow2, tanh


@triton.jit
def _tile_range(acc, l_i, m_i, q, k_base, v_base, bo_base, lo, hi, q_pos, kv_len, sm_scale, softcap, window,
                stride_kb, stride_ks, stride_vb, stride_vs, d_mask, dv_mask,
                MASKED: tl.constexpr, CAUSAL: tl.constexpr, USE_WINDOW: tl.constexpr, USE_SOFTCAP: tl.constexpr,
                EVEN_D: tl.constexpr, BLOCK_N: tl.constexpr, PAGE_SIZE: tl.constexpr, DOT_PRECISION: tl.constexpr):
    qk_scale = sm_scale * 1.4426950408889634
    for n0 in range(lo, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        slot = offs_n % PAGE_SIZE
        if MASKED:
            n_mask = offs_n < kv_len
            block = tl.load(bo_base + offs_n // PAGE_SIZE, mask=n_mask, other=0).to(tl.int64)
            k = tl.load(k_base + block[:, None] * stride_kb + slot[:, None] * stride_ks,
                        mask=n_mask[:, None] & d_mask[None, :], other=0.0)
        else:
            block = tl.load(bo_base + offs_n // PAGE_SIZE).to(tl.int64)
            if EVEN_D:
                k = tl.load(k_base + block[:, None] * stride_kb + slot[:, None] * stride_ks)
            else:
                k = tl.load(k_base + block[:, None] * stride_kb + slot[:, None] * stride_ks,
                            mask=d_mask[None, :], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        if USE_SOFTCAP:
            s = softcap * tanh(s * (sm_scale / softcap)) * 1.4426950408889634
        else:
            s = s * qk_scale
        if MASKED:
            valid = n_mask[None, :]
            if CAUSAL:
                valid = valid & (offs_n[None, :] <= q_pos[:, None])
            if USE_WINDOW:
                valid = valid & (offs_n[None, :] > q_pos[:, None] - window)
            s = tl.where(valid, s, float('-inf'))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if MASKED:
            v = tl.load(v_base + block[:, None] * stride_vb + slot[:, None] * stride_vs,
                        mask=n_mask[:, None] & dv_mask[None, :], other=0.0)
        else:
            if EVEN_D:
                v = tl.load(v_base + block[:, None] * stride_vb + slot[:, None] * stride_vs)
            else:
                v = tl.load(v_base + block[:, None] * stride_vb + slot[:, None] * stride_vs,
                            mask=dv_mask[None, :], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit(do_not_specialize=['stride_bo'])
def _prefill_kernel(
    Q, K, V, BlockOffsets, QStartLoc, QSeqlens, KVSeqlens, Out,
    sm_scale, softcap, window,
    stride_qt, stride_qh, stride_qd,
    stride_kb, stride_ks, stride_kh, stride_kd,
    stride_vb, stride_vs, stride_vh, stride_vd,
    stride_bo,
    stride_ot, stride_oh, stride_od,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    PAGE_SIZE: tl.constexpr, CAUSAL: tl.constexpr, USE_SOFTCAP: tl.constexpr, USE_WINDOW: tl.constexpr,
    EVEN_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    b = tl.program_id(1)
    h = tl.program_id(2)
    q_len = tl.load(QSeqlens + b).to(tl.int32)
    if CAUSAL:
        # heaviest tiles (the last ones, which see the most keys) are launched first
        pid_m = tl.cdiv(q_len, BLOCK_M) - 1 - pid_m
        if pid_m < 0:
            return
    m0 = pid_m * BLOCK_M
    if m0 >= q_len:
        return
    kv_len = tl.load(KVSeqlens + b).to(tl.int32)
    q_start = tl.load(QStartLoc + b).to(tl.int64)
    history = kv_len - q_len
    kv_head = h // GROUP

    offs_m = m0 + tl.arange(0, BLOCK_M)
    m_mask = offs_m < q_len
    q_pos = history + offs_m
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    d_mask = offs_d < HEAD_DIM
    dv_mask = offs_dv < HEAD_DIM_V
    rows = q_start + offs_m
    q = tl.load(Q + rows[:, None] * stride_qt + h * stride_qh + offs_d[None, :] * stride_qd,
                mask=m_mask[:, None] & d_mask[None, :], other=0.0)

    k_base = K + kv_head * stride_kh + offs_d[None, :] * stride_kd
    v_base = V + kv_head * stride_vh + offs_dv[None, :] * stride_vd
    bo_base = BlockOffsets + b.to(tl.int64) * stride_bo

    # key ranges (see the module docstring); q_first/q_last: positions of the tile's first/last real query
    q_first = history + m0
    q_last = history + tl.minimum(m0 + BLOCK_M, q_len) - 1
    hi = kv_len
    full_hi = (kv_len // BLOCK_N) * BLOCK_N
    if CAUSAL:
        hi = tl.minimum(kv_len, q_last + 1)
        full_hi = ((q_first + 1) // BLOCK_N) * BLOCK_N
    lo = 0
    a_end = 0
    if USE_WINDOW:
        lo = (tl.maximum(q_first - window + 1, 0) // BLOCK_N) * BLOCK_N
        full_lo = tl.cdiv(tl.maximum(q_last - window + 1, 0), BLOCK_N) * BLOCK_N
        a_end = tl.maximum(lo, tl.minimum(full_lo, hi))
    b_end = tl.maximum(a_end, full_hi)

    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - 1.0e30
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    if USE_WINDOW:
        acc, l_i, m_i = _tile_range(acc, l_i, m_i, q, k_base, v_base, bo_base, lo, a_end, q_pos, kv_len, sm_scale,
                                    softcap, window, stride_kb, stride_ks, stride_vb, stride_vs, d_mask, dv_mask,
                                    True, CAUSAL, USE_WINDOW, USE_SOFTCAP, EVEN_D, BLOCK_N, PAGE_SIZE,
                                    DOT_PRECISION)
    acc, l_i, m_i = _tile_range(acc, l_i, m_i, q, k_base, v_base, bo_base, a_end, b_end, q_pos, kv_len, sm_scale,
                                softcap, window, stride_kb, stride_ks, stride_vb, stride_vs, d_mask, dv_mask,
                                False, CAUSAL, USE_WINDOW, USE_SOFTCAP, EVEN_D, BLOCK_N, PAGE_SIZE,
                                    DOT_PRECISION)
    acc, l_i, m_i = _tile_range(acc, l_i, m_i, q, k_base, v_base, bo_base, b_end, hi, q_pos, kv_len, sm_scale,
                                softcap, window, stride_kb, stride_ks, stride_vb, stride_vs, d_mask, dv_mask,
                                True, CAUSAL, USE_WINDOW, USE_SOFTCAP, EVEN_D, BLOCK_N, PAGE_SIZE,
                                    DOT_PRECISION)

    o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(Out + rows[:, None] * stride_ot + h * stride_oh + offs_dv[None, :] * stride_od,
             o.to(Out.dtype.element_ty), mask=m_mask[:, None] & dv_mask[None, :])


def _config(block_d: int, device: torch.device):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages), picked for H100 (bf16, ~227 KB shared memory per SM)."""
    if block_d <= 64:
        return 128, 64, 4, 3
    if block_d <= 128:
        return 128, 64, 8, 3
    return 64, 32, 8, 2


def prefill_attention_fwd(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_offsets: torch.Tensor,
                          q_start_loc: torch.Tensor, q_seqlens: torch.Tensor, kv_seqlens: torch.Tensor,
                          out: torch.Tensor, max_q_seqlen: int, scale: float | None = None,
                          sliding_window: int | None = None, logit_softcapping: float | None = None,
                          causal: bool = True, block_m: int | None = None, block_n: int | None = None,
                          num_warps: int | None = None, num_stages: int | None = None) -> torch.Tensor:
    """max_q_seqlen sizes the grid; block_m / block_n / num_warps / num_stages override the tile config."""
    num_tokens, num_heads, head_dim = q.shape
    batch = q_seqlens.numel()
    _, page_size, num_kv_heads, _ = k_cache.shape
    head_dim_v = v_cache.size(-1)
    group = num_heads // num_kv_heads
    scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
    if batch == 0 or num_tokens == 0 or max_q_seqlen <= 0:
        return out
    block_d = max(16, next_pow2(head_dim))
    block_dv = max(16, next_pow2(head_dim_v))
    cfg_m, cfg_n, cfg_warps, cfg_stages = _config(max(block_d, block_dv), q.device)
    block_m = block_m or cfg_m
    block_n = block_n or cfg_n
    num_warps = num_warps or cfg_warps
    num_stages = num_stages or cfg_stages
    # short prompts (or chunks) need no 128-row tiles
    block_m = min(block_m, max(16, next_pow2(max_q_seqlen)))
    if block_m < 64:
        num_warps = min(num_warps, 4)
    use_window = sliding_window is not None and sliding_window > 0
    use_softcap = bool(logit_softcapping)
    grid = (triton.cdiv(max_q_seqlen, block_m), batch, num_heads)
    _prefill_kernel[grid](
        q, k_cache, v_cache, block_offsets, q_start_loc, q_seqlens, kv_seqlens, out,
        scale, float(logit_softcapping) if use_softcap else 1.0, int(sliding_window) if use_window else 0,
        q.stride(0), q.stride(1), q.stride(2),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), k_cache.stride(3),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), v_cache.stride(3),
        block_offsets.stride(0),
        out.stride(0), out.stride(1), out.stride(2),
        GROUP=group, HEAD_DIM=head_dim, HEAD_DIM_V=head_dim_v,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, BLOCK_DV=block_dv,
        PAGE_SIZE=page_size, CAUSAL=bool(causal), USE_SOFTCAP=use_softcap, USE_WINDOW=use_window,
        EVEN_D=(block_d == head_dim and block_dv == head_dim_v), DOT_PRECISION=dot_precision(q),
        num_warps=num_warps, num_stages=num_stages,
    )
    return out
