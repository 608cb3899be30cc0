"""Rotary position embedding (neox / HF rotate_half on the first R channels), in place or out of place.

Grid `(T, 2)`: program (t, 0) rotates all query heads of token t, (t, 1) all its key heads, with the token's
cos/sin row loaded once. q and k may be any strided views (e.g. slices of a fused qkv projection). The math runs
in float32; the pass-through channels R..D are copied only when the output is not the input.
"""

import torch
import triton
import triton.language as tl

from ._common import next_pow2


@triton.jit
def cos_sin_row(Cos, Sin, t, stride_ct, stride_cd, stride_st, stride_sd, HALF: tl.constexpr,
                BLOCK_HALF: tl.constexpr):
    """Token t's cos/sin, float32, split in the halves rotate_half pairs: (cos[:R/2], sin[:R/2], cos[R/2:],
    sin[R/2:]), zero past R/2 (BLOCK_HALF is its power of two)."""
    offs_r = tl.arange(0, BLOCK_HALF)
    r_mask = offs_r < HALF
    c1 = tl.load(Cos + t * stride_ct + offs_r * stride_cd, mask=r_mask, other=0.0).to(tl.float32)
    c2 = tl.load(Cos + t * stride_ct + (offs_r + HALF) * stride_cd, mask=r_mask, other=0.0).to(tl.float32)
    s1 = tl.load(Sin + t * stride_st + offs_r * stride_sd, mask=r_mask, other=0.0).to(tl.float32)
    s2 = tl.load(Sin + t * stride_st + (offs_r + HALF) * stride_sd, mask=r_mask, other=0.0).to(tl.float32)
    return c1, s1, c2, s2


@triton.jit
def _rotate_heads(X, XOut, t, c1, s1, c2, s2, stride_xt, stride_xh, stride_xd, stride_ot, stride_oh, stride_od,
                  NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, ROT_DIM: tl.constexpr,
                  BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_REST: tl.constexpr,
                  COPY_REST: tl.constexpr):
    HALF: tl.constexpr = ROT_DIM // 2
    offs_h = tl.arange(0, BLOCK_H)
    offs_r = tl.arange(0, BLOCK_HALF)
    mask = (offs_h < NUM_HEADS)[:, None] & (offs_r < HALF)[None, :]
    x_row = X + t * stride_xt + offs_h[:, None] * stride_xh
    o_row = XOut + t * stride_ot + offs_h[:, None] * stride_oh
    x1 = tl.load(x_row + offs_r[None, :] * stride_xd, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_row + (offs_r[None, :] + HALF) * stride_xd, mask=mask, other=0.0).to(tl.float32)
    y1 = x1 * c1[None, :] - x2 * s1[None, :]
    y2 = x2 * c2[None, :] + x1 * s2[None, :]
    tl.store(o_row + offs_r[None, :] * stride_od, y1.to(XOut.dtype.element_ty), mask=mask)
    tl.store(o_row + (offs_r[None, :] + HALF) * stride_od, y2.to(XOut.dtype.element_ty), mask=mask)
    if COPY_REST:
        offs_p = ROT_DIM + tl.arange(0, BLOCK_REST)
        pmask = (offs_h < NUM_HEADS)[:, None] & (offs_p < HEAD_DIM)[None, :]
        rest = tl.load(x_row + offs_p[None, :] * stride_xd, mask=pmask)
        tl.store(o_row + offs_p[None, :] * stride_od, rest.to(XOut.dtype.element_ty), mask=pmask)


@triton.jit
def _rotary_kernel(Q, K, Cos, Sin, QOut, KOut,
                   stride_qt, stride_qh, stride_qd, stride_kt, stride_kh, stride_kd,
                   stride_qot, stride_qoh, stride_qod, stride_kot, stride_koh, stride_kod,
                   stride_ct, stride_cd, stride_st, stride_sd,
                   NUM_Q_HEADS: tl.constexpr, NUM_K_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
                   ROT_DIM: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr,
                   BLOCK_HALF: tl.constexpr, BLOCK_REST: tl.constexpr,
                   COPY_REST_Q: tl.constexpr, COPY_REST_K: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    which = tl.program_id(1)
    HALF: tl.constexpr = ROT_DIM // 2
    c1, s1, c2, s2 = cos_sin_row(Cos, Sin, t, stride_ct, stride_cd, stride_st, stride_sd, HALF, BLOCK_HALF)
    if which == 0:
        _rotate_heads(Q, QOut, t, c1, s1, c2, s2, stride_qt, stride_qh, stride_qd, stride_qot, stride_qoh,
                      stride_qod, NUM_Q_HEADS, HEAD_DIM, ROT_DIM, BLOCK_HQ, BLOCK_HALF, BLOCK_REST, COPY_REST_Q)
    else:
        _rotate_heads(K, KOut, t, c1, s1, c2, s2, stride_kt, stride_kh, stride_kd, stride_kot, stride_koh,
                      stride_kod, NUM_K_HEADS, HEAD_DIM, ROT_DIM, BLOCK_HK, BLOCK_HALF, BLOCK_REST, COPY_REST_K)


def apply_rotary_pos_emb(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                         q_out: torch.Tensor | None = None,
                         k_out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as `lmdp.kernels.rotary.apply_rotary_pos_emb`; `q_out is q` / `k_out is k` for in place."""
    if cos.shape != sin.shape or cos.dim() != 2:
        raise ValueError(f'cos/sin must both be [T, R], got {tuple(cos.shape)} and {tuple(sin.shape)}')
    num_tokens, num_q_heads, head_dim = q.shape
    num_k_heads = k.size(1)
    rot_dim = cos.size(-1)
    if rot_dim % 2 or rot_dim > head_dim or k.size(-1) != head_dim or k.size(0) != num_tokens \
            or cos.size(0) != num_tokens:
        raise ValueError(f'bad rotary shapes: q {tuple(q.shape)}, k {tuple(k.shape)}, cos {tuple(cos.shape)}')
    if q_out is None:
        q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if k_out is None:
        k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    if num_tokens == 0:
        return q_out, k_out
    has_rest = rot_dim < head_dim
    _rotary_kernel[(num_tokens, 2)](
        q, k, cos, sin, q_out, k_out,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        q_out.stride(0), q_out.stride(1), q_out.stride(2), k_out.stride(0), k_out.stride(1), k_out.stride(2),
        cos.stride(0), cos.stride(1), sin.stride(0), sin.stride(1),
        NUM_Q_HEADS=num_q_heads, NUM_K_HEADS=num_k_heads, HEAD_DIM=head_dim, ROT_DIM=rot_dim,
        BLOCK_HQ=next_pow2(num_q_heads), BLOCK_HK=next_pow2(num_k_heads),
        BLOCK_HALF=max(1, next_pow2(rot_dim // 2)), BLOCK_REST=next_pow2(max(head_dim - rot_dim, 1)),
        COPY_REST_Q=has_rest and q_out.data_ptr() != q.data_ptr(),
        COPY_REST_K=has_rest and k_out.data_ptr() != k.data_ptr(),
        num_warps=4,
    )
    return q_out, k_out
