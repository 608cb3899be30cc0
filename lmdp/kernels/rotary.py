"""Pure-torch rotary position embedding: the reference op.

This is the ground truth that faster kernels (Triton) are tested against, so it
favours clarity over speed. Convention is Neox / HF ``rotate_half``: the rotary
dim R is split into two halves (x1, x2) and rotated as
``(x1*cos - x2*sin, x2*cos + x1*sin)``; channels ``R..D`` pass through.
"""


import torch
from torch import Tensor


def _rotate_into(x: Tensor, cos: Tensor, sin: Tensor, out: Tensor | None) -> Tensor:
    """Rotate the first R channels of ``x`` [T, H, D] and write the result into ``out``."""
    rot_dim = cos.size(-1)
    half = rot_dim // 2
    # Everything below is computed from a float32 copy before any write, so
    # ``out`` may alias ``x`` (in-place) without reading half-updated values.
    x_rot = x[..., :rot_dim].float()
    x1, x2 = x_rot[..., :half], x_rot[..., half:]
    rotated = torch.cat((-x2, x1), dim=-1)
    # Same expression (and op order) as HF's apply_rotary_pos_emb, so float32
    # inputs give bit-identical results.
    y = x_rot * cos + rotated * sin

    if out is None:
        # A fresh contiguous tensor; the pass-through channels are copied below.
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        if rot_dim < x.size(-1):
            out[..., rot_dim:] = x[..., rot_dim:]
    elif out is not x and rot_dim < x.size(-1):
        out[..., rot_dim:].copy_(x[..., rot_dim:])
    out[..., :rot_dim] = y.to(out.dtype)
    return out


def _check_shapes(name: str, x: Tensor, cos: Tensor, out: Tensor | None) -> None:
    if x.dim() != 3:
        raise ValueError(f'{name} must be [T, H, D], got shape {tuple(x.shape)}')
    if x.size(0) != cos.size(0):
        raise ValueError(f'{name} has {x.size(0)} tokens but cos/sin have {cos.size(0)}')
    if cos.size(-1) > x.size(-1):
        raise ValueError(f'rotary dim {cos.size(-1)} exceeds head dim {x.size(-1)} of {name}')
    if out is not None and out.shape != x.shape:
        raise ValueError(f'{name}_out shape {tuple(out.shape)} != {name} shape {tuple(x.shape)}')


def apply_rotary_pos_emb(q: Tensor,
                         k: Tensor,
                         cos: Tensor,
                         sin: Tensor,
                         q_out: Tensor | None = None,
                         k_out: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Apply rotary embedding to packed query/key tokens.

    Args:
        q: query, ``[T, Hq, D]``; any strides (e.g. a slice of a fused qkv).
        k: key, ``[T, Hk, D]``; Hk may differ from Hq (GQA/MQA).
        cos, sin: ``[T, R]`` with R the (even) rotary dim, ``R <= D``; channels
            ``R..D`` of q/k are left unchanged (partial rotary).
        q_out, k_out: optional outputs of q's/k's shape; may be ``q``/``k``
            themselves for an in-place update.

    Returns:
        ``(q_out, k_out)``. The math runs in float32 and is cast back to the
        output dtype (the inputs' dtype when new outputs are allocated).
    """
    if cos.shape != sin.shape or cos.dim() != 2:
        raise ValueError(f'cos/sin must both be [T, R], got {tuple(cos.shape)} and {tuple(sin.shape)}')
    if cos.size(-1) % 2:
        raise ValueError(f'rotary dim must be even, got {cos.size(-1)}')
    _check_shapes('q', q, cos, q_out)
    _check_shapes('k', k, cos, k_out)

    # [T, 1, R] so one table broadcasts over every head of q and k.
    cos = cos.float().unsqueeze(1)
    sin = sin.float().unsqueeze(1)
    q_out = _rotate_into(q, cos, sin, q_out)
    k_out = _rotate_into(k, cos, sin, k_out)
    return q_out, k_out
