"""`merge_attention_states` for CUDA tensors: one program per (token, head) reads both partial rows and their
log-sum-exps and writes the joined row (see `lmdp.kernels.merge_attention` for the rule)."""
import torch
import triton
import triton.language as tl

from ._common import next_pow2


@triton.jit
def _merge_kernel(OutA, LseA, OutB, LseB, Out,
                  stride_as, stride_ah, stride_ad, stride_lah, stride_las,
                  stride_bs, stride_bh, stride_bd, stride_lbh, stride_lbs,
                  stride_os, stride_oh, stride_od,
                  HEAD_DIM_V: tl.constexpr, BLOCK_DV: tl.constexpr):
    s = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    offs = tl.arange(0, BLOCK_DV)
    d_mask = offs < HEAD_DIM_V
    la = tl.load(LseA + h * stride_lah + s * stride_las).to(tl.float32)
    lb = tl.load(LseB + h * stride_lbh + s * stride_lbs).to(tl.float32)
    m = tl.maximum(la, lb)
    m = tl.where(m == float('-inf'), 0.0, m)    # both parts empty: both weights 0, the row is 0
    wa = tl.exp(la - m)
    wb = tl.exp(lb - m)
    total = wa + wb
    total = tl.where(total > 0, total, 1.0)
    a = tl.load(OutA + s * stride_as + h * stride_ah + offs * stride_ad, mask=d_mask, other=0.0).to(tl.float32)
    b = tl.load(OutB + s * stride_bs + h * stride_bh + offs * stride_bd, mask=d_mask, other=0.0).to(tl.float32)
    o = a * (wa / total) + b * (wb / total)
    tl.store(Out + s * stride_os + h * stride_oh + offs * stride_od, o.to(Out.dtype.element_ty), mask=d_mask)


def merge_attention_states(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor,
                           out: torch.Tensor | None = None) -> torch.Tensor:
    num_tokens, num_heads, head_dim_v = out_a.shape
    if out is None:
        out = torch.empty_like(out_a)
    if num_tokens == 0:
        return out
    _merge_kernel[(num_tokens, num_heads)](
        out_a, lse_a, out_b, lse_b, out,
        out_a.stride(0), out_a.stride(1), out_a.stride(2), lse_a.stride(0), lse_a.stride(1),
        out_b.stride(0), out_b.stride(1), out_b.stride(2), lse_b.stride(0), lse_b.stride(1),
        out.stride(0), out.stride(1), out.stride(2),
        HEAD_DIM_V=head_dim_v, BLOCK_DV=max(16, next_pow2(head_dim_v)), num_warps=1 if head_dim_v <= 128 else 2,
    )
    return out
