"""The one place that picks an op's implementation: Triton for CUDA tensors, the pure-torch reference elsewhere.

`LMDP_KERNELS=reference` forces the references everywhere (to bisect a suspected kernel bug on the GPU).
"""
import functools
import importlib

import torch

from .. import envs
from . import (
    activation,
    fill_kv_cache as _fill,
    linear as _linear,
    merge_attention as _merge,
    moe as _moe,
    paged_attention as _attn,
    quant as _quant,
    rms_norm as _norm,
    rotary as _rotary,
    rotary_fill_kv_cache as _rotary_fill,
)

_REFERENCE = {
    'fill_kv_cache': _fill.fill_kv_cache,
    'paged_attention_fwd': _attn.paged_attention_fwd,
    'rms_norm': _norm.rms_norm,
    'apply_rotary_pos_emb': _rotary.apply_rotary_pos_emb,
    'silu_and_mul': activation.silu_and_mul,
    'gelu_and_mul': activation.gelu_and_mul,
    'linear': _linear.linear,
    'act_and_mul_linear': _linear.act_and_mul_linear,
    'rotary_fill_kv_cache': _rotary_fill.rotary_fill_kv_cache,
    'softmax_topk': _moe.softmax_topk,
    'fused_moe': _moe.fused_moe,
    'fp8_block_linear': _quant.fp8_block_linear,
    'awq_linear': _quant.awq_linear,
    'fused_moe_fp8': _quant.fused_moe_fp8,
    'merge_attention_states': _merge.merge_attention_states,
}


@functools.cache
def _triton_impl(name: str):
    """The Triton implementation of `name` from `lmdp.kernels.triton`, or None where it can't be had."""
    if envs.LMDP_KERNELS == 'reference':
        return None
    try:
        module = importlib.import_module('lmdp.kernels.triton')
    except ImportError:
        return None
    return getattr(module, name, None)


def implementation(name: str, tensor: torch.Tensor):
    """The function that runs op `name` on tensors living where `tensor` lives."""
    if tensor.is_cuda:
        impl = _triton_impl(name)
        if impl is not None:
            return impl
    return _REFERENCE[name]


def fill_kv_cache(k_states, v_states, k_cache, v_cache, q_start_loc, q_seqlens, kv_seqlens, block_offsets):
    return implementation('fill_kv_cache', k_states)(k_states, v_states, k_cache, v_cache, q_start_loc, q_seqlens,
                                                     kv_seqlens, block_offsets)


def rotary_fill_kv_cache(q, k, v, cos, sin, k_cache, v_cache, q_start_loc, q_seqlens, kv_seqlens, block_offsets):
    """Rotate q and k in place and write the rotated k and v into the cache (one launch on CUDA)."""
    return implementation('rotary_fill_kv_cache', q)(q, k, v, cos, sin, k_cache, v_cache, q_start_loc, q_seqlens,
                                                     kv_seqlens, block_offsets)


def paged_attention_fwd(q, k_cache, v_cache, block_offsets, q_start_loc, q_seqlens, kv_seqlens, **kwargs):
    return implementation('paged_attention_fwd', q)(q, k_cache, v_cache, block_offsets, q_start_loc, q_seqlens,
                                                    kv_seqlens, **kwargs)


def rms_norm(x, weight, eps=1e-6, residual=None):
    return implementation('rms_norm', x)(x, weight, eps, residual)


def apply_rotary_pos_emb(q, k, cos, sin, q_out=None, k_out=None):
    return implementation('apply_rotary_pos_emb', q)(q, k, cos, sin, q_out, k_out)


def silu_and_mul(x):
    return implementation('silu_and_mul', x)(x)


def gelu_and_mul(x, approximate='none'):
    return implementation('gelu_and_mul', x)(x, approximate)


def linear(x, weight, bias=None):
    return implementation('linear', x)(x, weight, bias)


def act_and_mul_linear(x, weight, bias=None, act='silu'):
    return implementation('act_and_mul_linear', x)(x, weight, bias, act)


def softmax_topk(router_logits, top_k):
    """(topk_weights float32, topk_ids int64) of the router's softmax."""
    return implementation('softmax_topk', router_logits)(router_logits, top_k)


def fused_moe(hidden_states, gate_up_weights, down_weights, topk_weights, topk_ids, renormalize=False, act='silu'):
    """Every token through its top-k experts, weighted and summed (`lmdp.kernels.moe.fused_moe`)."""
    return implementation('fused_moe', hidden_states)(hidden_states, gate_up_weights, down_weights, topk_weights,
                                                      topk_ids, renormalize, act)


def fp8_block_linear(x, weight, scale, bias=None, act=None, scale_per_row=False):
    """`x W^T + b` for FP8 block-scaled W, x quantised per token group of 128 (`lmdp.kernels.quant`)."""
    return implementation('fp8_block_linear', x)(x, weight, scale, bias, act, scale_per_row)


def awq_linear(x, qweight, scales, zeros, bias=None, act=None):
    """`x W^T + b` for 4-bit AWQ W in lmdp's layout (`lmdp.kernels.quant`)."""
    return implementation('awq_linear', x)(x, qweight, scales, zeros, bias, act)


def fused_moe_fp8(hidden_states, gate_up_weights, gate_up_scales, down_weights, down_scales, topk_weights, topk_ids,
                  renormalize=False, act='silu'):
    """`fused_moe` over FP8 experts with per-row block scales (W8A16, `lmdp.kernels.quant.fused_moe_fp8`)."""
    return implementation('fused_moe_fp8', hidden_states)(hidden_states, gate_up_weights, gate_up_scales,
                                                          down_weights, down_scales, topk_weights, topk_ids,
                                                          renormalize, act)
