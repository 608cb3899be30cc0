"""RMSNorm with an optional fused residual add; one program per row, the whole row in one tile.

Matches the reference's rounding: the sum `x + residual` is rounded to its dtype (and written out as the new
residual stream) before the statistic; `x * rstd` is rounded to that dtype before the weight multiplies it, except
for a float32 weight on 16-bit activations (Gemma's convention, see the reference's `gain_in_float32`).
"""

import torch
import triton
import triton.language as tl

from ._common import next_pow2, pdl_launch, pdl_wait


@triton.jit
def _rms_norm_kernel(X, Residual, W, Out, ResOut, eps,
                     stride_x, stride_r, stride_o, stride_ro, N, heads, stride_xh,
                     HAS_RESIDUAL: tl.constexpr, ROUND_NORMED: tl.constexpr, BLOCK_N: tl.constexpr,
                     USE_PDL: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_N)
    mask = offs < N
    w = tl.load(W + offs, mask=mask, other=0.0).to(tl.float32)     # a weight: no kernel of the step writes it
    if USE_PDL:
        pdl_wait()
    # x may be [T, heads, N] with any strides on T and heads (per-head q/k norms on views of a fused qkv)
    x = tl.load(X + (row // heads) * stride_x + (row % heads) * stride_xh + offs, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(Residual + row * stride_r + offs, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(ResOut.dtype.element_ty)
        tl.store(ResOut + row * stride_ro + offs, x, mask=mask)
    xf = x.to(tl.float32)
    var = tl.sum(xf * xf, 0) / N
    rstd = 1.0 / tl.sqrt(var + eps)
    normed = xf * rstd
    if ROUND_NORMED:
        normed = normed.to(x.dtype).to(tl.float32)
    tl.store(Out + row * stride_o + offs, (normed * w).to(Out.dtype.element_ty), mask=mask)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """`t` as a 2-D `[rows, N]` view with unit stride along N (copying only when it must)."""
    if t.stride(-1) != 1:
        t = t.contiguous()
    if t.dim() == 2:
        return t
    try:
        return t.view(-1, t.size(-1))
    except RuntimeError:
        return t.reshape(-1, t.size(-1))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, residual: torch.Tensor | None = None):
    """Same contract as `lmdp.kernels.rms_norm.rms_norm`: out, or (out, x + residual)."""
    shape = x.shape
    n = shape[-1]
    sum_dtype = x.dtype if residual is None else torch.result_type(x, residual)
    round_normed = not (weight.dtype == torch.float32 and sum_dtype in (torch.bfloat16, torch.float16))
    out_dtype = torch.promote_types(weight.dtype, sum_dtype) if round_normed else sum_dtype
    heads, stride_xh = 1, 0
    if residual is None and x.dim() == 3 and x.stride(-1) == 1 and x.dtype == sum_dtype:
        # per-head rows of a strided view ([T, H, D] of a fused qkv): read in place, no copy
        x2, heads, stride_xh = x, x.size(1), x.stride(1)
        rows = x.size(0) * heads
    else:
        x2 = _rows(x)
        if x2.dtype != sum_dtype:
            x2 = x2.to(sum_dtype)
        rows = x2.size(0)
    out = torch.empty(shape, dtype=out_dtype, device=x.device)
    out2 = out.view(-1, n)
    weight = weight.contiguous()
    if residual is not None:
        r2 = _rows(residual.expand(shape))
        res_out = torch.empty(shape, dtype=sum_dtype, device=x.device)
        ro2 = res_out.view(-1, n)
    else:
        r2 = ro2 = res_out = x2  # unused
    if rows > 0:
        block_n = next_pow2(n)
        num_warps = 4 if block_n <= 1024 else (8 if block_n <= 4096 else 16)
        _rms_norm_kernel[(rows,)](x2, r2, weight, out2, ro2, float(eps),
                                  x2.stride(0), r2.stride(0), out2.stride(0), ro2.stride(0), n, heads, stride_xh,
                                  HAS_RESIDUAL=residual is not None, ROUND_NORMED=round_normed, BLOCK_N=block_n,
                                  num_warps=num_warps, **pdl_launch(x.device))
    return out if residual is None else (out, res_out)
