"""FP8 experts on the GPU, for now: every expert's weights dequantised to the activations' dtype (torch ops), then
the bf16 fused-MoE kernels. Correct, and CUDA-graph safe (fixed shapes), but it reads and writes every expert's
weights each call: a grouped GEMM that dequantises its FP8 tiles in registers is the fast path still to write."""
import torch

from ..quant import fp8_expert_dequant
from .fused_moe import fused_moe


def fused_moe_fp8(hidden_states: torch.Tensor, gate_up_weights: torch.Tensor, gate_up_scales: torch.Tensor,
                  down_weights: torch.Tensor, down_scales: torch.Tensor, topk_weights: torch.Tensor,
                  topk_ids: torch.Tensor, renormalize: bool = False, act: str = 'silu') -> torch.Tensor:
    dtype = hidden_states.dtype
    return fused_moe(hidden_states, fp8_expert_dequant(gate_up_weights, gate_up_scales, dtype),
                     fp8_expert_dequant(down_weights, down_scales, dtype), topk_weights, topk_ids, renormalize, act)
