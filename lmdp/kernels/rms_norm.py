"""Reference op: RMSNorm, optionally fused with the residual add that precedes it."""

import torch


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, residual: torch.Tensor | None = None):
    """`weight * x / rms(x)`, the statistic in float32; with `residual`, first `x = x + residual`.

    Returns the normed tensor, or `(normed, x + residual)` when a residual is given, so that a decoder layer can
    carry the residual stream without a separate add. The sum is rounded to x's dtype before the norm, as the
    unfused `x + residual` of a transformers model is. `x / rms(x)` is rounded to x's dtype before the weight
    multiplies it (transformers' Llama), unless the weight is float32 and x is not (see `gain_in_float32`).
    """
    if residual is not None:
        x = x + residual
        residual = x
    variance = x.float().pow(2).mean(-1, keepdim=True)
    if gain_in_float32(weight, x):
        out = (x.float() * torch.rsqrt(variance + eps) * weight).to(x.dtype)
    else:
        out = weight * (x.float() * torch.rsqrt(variance + eps)).to(x.dtype)
    return out if residual is None else (out, residual)


def gain_in_float32(weight: torch.Tensor, x: torch.Tensor) -> bool:
    """A float32 weight on 16-bit activations is transformers' Gemma convention: the gain multiplies the unrounded
    normed value in float32 and the output takes x's dtype (one rounding, no per-channel rounding of the gain)."""
    return weight.dtype == torch.float32 and x.dtype in (torch.bfloat16, torch.float16)
