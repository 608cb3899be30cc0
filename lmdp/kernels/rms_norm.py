"""Reference op: RMSNorm, optionally fused with the residual add that precedes it."""
from typing import Optional

import torch


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, residual: Optional[torch.Tensor] = None):
    """`weight * x / rms(x)`, the statistic in float32; with `residual`, first `x = x + residual`.

    Returns the normed tensor, or `(normed, x + residual)` when a residual is given, so that a decoder layer can
    carry the residual stream without a separate add. The sum is rounded to x's dtype before the norm, as the
    unfused `x + residual` of a transformers model is.
    """
    if residual is not None:
        x = x + residual
        residual = x
    variance = x.float().pow(2).mean(-1, keepdim=True)
    normed = (x.float() * torch.rsqrt(variance + eps)).to(x.dtype)
    out = weight * normed
    return out if residual is None else (out, residual)
