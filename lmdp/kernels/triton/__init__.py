"""Triton kernels of lmdp's fused ops, used by `lmdp.kernels.dispatch` for CUDA tensors.

Each op has the signature and return convention of its pure-torch reference in `lmdp.kernels`.
"""
from .activation import gelu_and_mul, silu_and_mul
from .fill_kv_cache import fill_kv_cache
from .paged_attention import paged_attention_fwd
from .rms_norm import rms_norm
from .rotary import apply_rotary_pos_emb

__all__ = ['apply_rotary_pos_emb', 'fill_kv_cache', 'gelu_and_mul', 'paged_attention_fwd', 'rms_norm',
           'silu_and_mul']
