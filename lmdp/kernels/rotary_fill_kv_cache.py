"""Reference op: rotary on q/k in place, then the rotated k and v written into the paged cache.

An attention layer runs these two steps back to back; a fused kernel (`lmdp.kernels.triton`) does both in one
launch. This reference is literally the composition of the two reference ops, so the fused kernel is tested
against exactly what the unfused path computes.

Tokens past the last sequence (`T > sum(q_seqlens)`, the padding of a CUDA-graph batch) are rotated like every
other token (rotary knows nothing of sequences) but are not written into the cache.
"""
import torch

from .fill_kv_cache import fill_kv_cache
from .rotary import apply_rotary_pos_emb


def check_rotary_fill_shapes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
                             sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                             q_start_loc: torch.Tensor, q_seqlens: torch.Tensor, kv_seqlens: torch.Tensor,
                             block_offsets: torch.Tensor) -> None:
    """Raise ValueError unless the arguments fit together (shapes only: nothing is read from the device)."""
    for name, x in (('q', q), ('k', k), ('v', v)):
        if x.dim() != 3:
            raise ValueError(f'{name} must be [T, H, D], got shape {tuple(x.shape)}')
    if cos.shape != sin.shape or cos.dim() != 2:
        raise ValueError(f'cos/sin must both be [T, R], got {tuple(cos.shape)} and {tuple(sin.shape)}')
    num_tokens, _, head_dim = q.shape
    num_kv_heads = k.size(1)
    if k.size(0) != num_tokens or v.size(0) != num_tokens or cos.size(0) != num_tokens:
        raise ValueError(f'token counts differ: q {q.size(0)}, k {k.size(0)}, v {v.size(0)}, cos {cos.size(0)}')
    if k.size(-1) != head_dim:
        raise ValueError(f'q and k head dims differ: {head_dim} vs {k.size(-1)}')
    if v.size(1) != num_kv_heads:
        raise ValueError(f'k has {num_kv_heads} heads but v has {v.size(1)}')
    rot_dim = cos.size(-1)
    if rot_dim % 2 or rot_dim > head_dim:
        raise ValueError(f'rotary dim must be even and <= head dim {head_dim}, got {rot_dim}')
    if k_cache.dim() != 4 or tuple(k_cache.shape[2:]) != (num_kv_heads, head_dim):
        raise ValueError(f'k_cache must be [num_blocks, block_size, {num_kv_heads}, {head_dim}], '
                         f'got {tuple(k_cache.shape)}')
    if v_cache.dim() != 4 or tuple(v_cache.shape[:2]) != tuple(k_cache.shape[:2]) \
            or tuple(v_cache.shape[2:]) != (num_kv_heads, v.size(-1)):
        raise ValueError(f'v_cache must be [{k_cache.size(0)}, {k_cache.size(1)}, {num_kv_heads}, {v.size(-1)}], '
                         f'got {tuple(v_cache.shape)}')
    batch = q_seqlens.numel()
    if q_start_loc.numel() != batch or kv_seqlens.numel() != batch:
        raise ValueError(f'q_start_loc ({q_start_loc.numel()}), q_seqlens ({batch}) and kv_seqlens '
                         f'({kv_seqlens.numel()}) must have one entry per sequence')
    if block_offsets.dim() != 2 or block_offsets.size(0) != batch:
        raise ValueError(f'block_offsets must be [{batch}, max_blocks], got {tuple(block_offsets.shape)}')


def rotary_fill_kv_cache(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                         k_cache: torch.Tensor, v_cache: torch.Tensor, q_start_loc: torch.Tensor,
                         q_seqlens: torch.Tensor, kv_seqlens: torch.Tensor, block_offsets: torch.Tensor) -> None:
    """Rotate q `[T, Hq, D]` and k `[T, Hk, D]` in place (cos/sin `[T, R]`, R <= D), then scatter k and
    v `[T, Hk, Dv]` into k_cache/v_cache `[num_blocks, block_size, Hk, D or Dv]`.

    q, k and v may be strided views (e.g. slices of one fused qkv projection). The cache layout and the batch
    arguments are those of `fill_kv_cache`.
    """
    check_rotary_fill_shapes(q, k, v, cos, sin, k_cache, v_cache, q_start_loc, q_seqlens, kv_seqlens,
                             block_offsets)
    apply_rotary_pos_emb(q, k, cos, sin, q_out=q, k_out=k)
    # The reference fill wants exactly the packed tokens; anything after them is padding (a host sync, which
    # is fine for the reference).
    num_real = int(q_seqlens.sum()) if q_seqlens.numel() else 0
    if num_real > k.size(0):
        raise ValueError(f'q_seqlens add up to {num_real} tokens but only {k.size(0)} were given')
    fill_kv_cache(k[:num_real], v[:num_real], k_cache, v_cache, q_start_loc, q_seqlens, kv_seqlens, block_offsets)
