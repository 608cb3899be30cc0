"""Fused ops. Each has a pure-torch reference here (the ground truth and the CPU path); `dispatch` picks Triton
kernels for CUDA tensors."""
from .dispatch import (
                       act_and_mul_linear,
                       apply_rotary_pos_emb,
                       awq_linear,
                       fill_kv_cache,
                       fp8_block_linear,
                       fused_moe,
                       fused_moe_fp8,
                       gelu_and_mul,
                       linear,
                       paged_attention_fwd,
                       rms_norm,
                       rotary_fill_kv_cache,
                       silu_and_mul,
                       softmax_topk,
)

__all__ = ['act_and_mul_linear', 'apply_rotary_pos_emb', 'fill_kv_cache', 'fused_moe', 'gelu_and_mul', 'linear',
           'paged_attention_fwd', 'rms_norm', 'rotary_fill_kv_cache', 'silu_and_mul', 'softmax_topk']
__all__ += ['awq_linear', 'fp8_block_linear', 'fused_moe_fp8']
