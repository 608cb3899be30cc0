"""Fused ops. Each has a pure-torch reference here (the ground truth and the CPU path); `dispatch` picks Triton
kernels for CUDA tensors."""
from .dispatch import (apply_rotary_pos_emb, fill_kv_cache, gelu_and_mul, paged_attention_fwd, rms_norm,
                       silu_and_mul)

__all__ = ['apply_rotary_pos_emb', 'fill_kv_cache', 'gelu_and_mul', 'paged_attention_fwd', 'rms_norm', 'silu_and_mul']
