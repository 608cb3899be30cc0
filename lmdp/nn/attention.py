"""Attention over the paged KV cache: write this step's keys and values, then attend."""
import math
from typing import Optional, Tuple

import torch
from torch import nn

from .. import kernels


class Attention(nn.Module):
    """Paged attention for packed tokens (GQA, sliding window, tanh logit softcap).

    `forward(query [T, Hq, D], key [T, Hk, D], value [T, Hk, Dv], k_cache, v_cache, attn_metadata)` returns
    `[T, Hq, Dv]`. The caches are `[num_blocks, block_size, Hk, D]`.
    """

    def __init__(self, num_heads: int, head_size: int, scale: Optional[float] = None,
                 num_kv_heads: Optional[int] = None, v_head_size: Optional[int] = None, alibi: bool = False,
                 sliding_window: Optional[int] = None, logit_softcapping: Optional[float] = None,
                 causal: bool = True, **kwargs):
        super().__init__()
        if alibi:
            raise NotImplementedError('ALiBi attention is not supported yet')
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if num_heads % num_kv_heads:
            raise ValueError(f'num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})')
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        self.head_size = head_size
        self.v_head_size = head_size if v_head_size is None else v_head_size
        self.scale = 1.0 / math.sqrt(head_size) if scale is None else scale
        # HF configs say "no window" as None, 0 or -1
        self.sliding_window = sliding_window if sliding_window and sliding_window > 0 else None
        self.logit_softcapping = logit_softcapping or None
        self.causal = causal

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor,
                v_cache: torch.Tensor, attn_metadata, k_scales_zeros=None, v_scales_zeros=None,
                inplace: bool = True, rotary_pos_emb: Optional[Tuple[torch.Tensor, torch.Tensor]] = None
                ) -> torch.Tensor:
        """`rotary_pos_emb=(cos, sin)`: query and key are not rotated yet; they are rotated (in place) by the kernel
        that writes the cache, one launch instead of two (what `ApplyRotaryEmb` then the cache write would do)."""
        meta = attn_metadata
        if rotary_pos_emb is None:
            kernels.fill_kv_cache(key, value, k_cache, v_cache, meta.q_start_loc, meta.q_seqlens, meta.kv_seqlens,
                                  meta.block_offsets)
        else:
            cos, sin = rotary_pos_emb
            kernels.rotary_fill_kv_cache(query, key, value, cos, sin, k_cache, v_cache, meta.q_start_loc,
                                         meta.q_seqlens, meta.kv_seqlens, meta.block_offsets)
        # Decode steps split the KV length by batch size alone (no max_kv_seqlen hint): a CUDA graph captured
        # for a batch size then runs the very same kernels as an eager step of that size, bit for bit.
        max_kv_seqlen = None if meta.is_decoding else meta.max_kv_seqlen
        return kernels.paged_attention_fwd(query, k_cache, v_cache, meta.block_offsets, meta.q_start_loc,
                                           meta.q_seqlens, meta.kv_seqlens, scale=self.scale,
                                           sliding_window=self.sliding_window,
                                           logit_softcapping=self.logit_softcapping, causal=self.causal,
                                           is_decoding=meta.is_decoding, max_q_seqlen=meta.max_q_seqlen,
                                           max_kv_seqlen=max_kv_seqlen)

    def extra_repr(self):
        return (f'heads={self.num_heads}, kv_heads={self.num_kv_heads}, head_size={self.head_size}, '
                f'sliding_window={self.sliding_window}, softcap={self.logit_softcapping}')
