"""Attention over the paged KV cache: rotate q and k, write this step's keys and values, then attend."""
import math

import torch
from torch import nn

from .. import kernels
from .fusion import fusable
from .rotary_embedding import ApplyRotaryEmb, as_rows


class Attention(nn.Module):
    """Paged attention for packed tokens (GQA, sliding window, tanh logit softcap), rotary included.

    `forward(query [T, Hq, D], key [T, Hk, D], value [T, Hk, Dv], k_cache, v_cache, attn_metadata,
    rotary_pos_emb=(cos, sin))` rotates query and key by cos/sin `[T, R]` (R <= D: partial rotary), writes the keys
    and values into the caches `[num_blocks, block_size, Hk, D]`, and returns `[T, Hq, Dv]`. Without
    `rotary_pos_emb`, q and k are taken as already rotated (what lmdeploy's ports do with `ApplyRotaryEmb`).

    The rotation is the child module `rotary` (an `ApplyRotaryEmb`, or the one passed in); lmdp's own runs inside
    the kernel that writes the cache, a replaced or hooked one as a step of its own (see `lmdp.nn.fusion`).
    `use_flash_mla`, `learnable_sink`, `block_sparse_size` and `prefix` are lmdeploy's; only their defaults work.
    """

    def __init__(self, num_heads: int, head_size: int, scale: float | None = None,
                 num_kv_heads: int | None = None, v_head_size: int | None = None, alibi: bool = False,
                 sliding_window: int | None = None, logit_softcapping: float | None = None,
                 causal: bool = True, use_flash_mla: bool = False, learnable_sink: bool = False,
                 block_sparse_size: int = 1, prefix: str = '', rotary: nn.Module | None = None):
        super().__init__()
        unsupported = [name for name, on in (('alibi', alibi), ('use_flash_mla', use_flash_mla),
                                             ('learnable_sink', learnable_sink),
                                             ('block_sparse_size', block_sparse_size != 1)) if on]
        if unsupported:
            raise NotImplementedError(f'Attention: {", ".join(unsupported)} is not supported yet')
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
        self.rotary = ApplyRotaryEmb() if rotary is None else rotary

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor,
                v_cache: torch.Tensor, attn_metadata, k_scales_zeros=None, v_scales_zeros=None, s_aux=None,
                inplace: bool = True, rotary_pos_emb: tuple[torch.Tensor, torch.Tensor] | None = None
                ) -> torch.Tensor:
        """`rotary_pos_emb=(cos, sin)` (`[T, R]` or `[1, T, R]`): rotate query and key first (in place)."""
        if k_scales_zeros is not None or v_scales_zeros is not None or s_aux is not None:
            raise NotImplementedError('Attention: quantised KV caches (k/v_scales_zeros) and attention sinks (s_aux) '
                                      'are not supported yet')
        meta = attn_metadata
        if rotary_pos_emb is not None:
            cos, sin = (as_rows(t) for t in rotary_pos_emb)
        if rotary_pos_emb is not None and fusable(self.rotary, 'fuses_into_cache_write'):
            kernels.rotary_fill_kv_cache(query, key, value, cos, sin, k_cache, v_cache, meta.q_start_loc,
                                         meta.q_seqlens, meta.kv_seqlens, meta.block_offsets)
        else:
            if rotary_pos_emb is not None:
                query, key = self.rotary(query, key, cos, sin, inplace=True)
            kernels.fill_kv_cache(key, value, k_cache, v_cache, meta.q_start_loc, meta.q_seqlens, meta.kv_seqlens,
                                  meta.block_offsets)
        # Decode steps split the KV length by batch size alone (no max_kv_seqlen hint): a CUDA graph captured
        # for a batch size then runs the very same kernels as an eager step of that size, bit for bit.
        max_kv_seqlen = None if meta.is_decoding else meta.max_kv_seqlen
        sum_kv_seqlen = None if meta.is_decoding else (getattr(meta, 'sum_kv_seqlen', 0) or None)
        return kernels.paged_attention_fwd(query, k_cache, v_cache, meta.block_offsets, meta.q_start_loc,
                                           meta.q_seqlens, meta.kv_seqlens, scale=self.scale,
                                           sliding_window=self.sliding_window,
                                           logit_softcapping=self.logit_softcapping, causal=self.causal,
                                           is_decoding=meta.is_decoding, max_q_seqlen=meta.max_q_seqlen,
                                           max_kv_seqlen=max_kv_seqlen, sum_kv_seqlen=sum_kv_seqlen,
                                           num_decodes=getattr(meta, 'num_decodes', 0))

    def extra_repr(self):
        return (f'heads={self.num_heads}, kv_heads={self.num_kv_heads}, head_size={self.head_size}, '
                f'scale={self.scale:.4g}, sliding_window={self.sliding_window}, softcap={self.logit_softcapping}')
