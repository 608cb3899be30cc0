"""Triton kernels of lmdp's fused ops, used by `lmdp.kernels.dispatch` for CUDA tensors.

Each op has the signature and return convention of its pure-torch reference in `lmdp.kernels`.
"""
from .activation import gelu_and_mul, silu_and_mul
from .awq_linear import awq_linear
from .fill_kv_cache import fill_kv_cache
from .fp8_linear import fp8_block_linear
from .fused_moe import fused_moe
from .fused_moe_fp8 import fused_moe_fp8
from .gemv import act_and_mul_linear, linear
from .merge_attention import merge_attention_states
from .moe_router import softmax_topk
from .paged_attention import paged_attention_fwd
from .rms_norm import rms_norm
from .rotary import apply_rotary_pos_emb
from .rotary_fill_kv_cache import rotary_fill_kv_cache

__all__ = ['act_and_mul_linear', 'apply_rotary_pos_emb', 'fill_kv_cache', 'fused_moe', 'gelu_and_mul', 'linear',
           'paged_attention_fwd', 'rms_norm', 'rotary_fill_kv_cache', 'silu_and_mul', 'softmax_topk']
__all__ += ['awq_linear', 'fp8_block_linear', 'fused_moe_fp8']
__all__ += ['merge_attention_states']
