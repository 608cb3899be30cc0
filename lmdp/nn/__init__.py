"""Building blocks for model ports (lmdeploy's `lmdeploy.pytorch.nn` names).

Each takes `is_tp`/`quant_config` where lmdeploy's does, and every parameter carries a `weight_loader`.
"""
from .activation import GeluAndMul, SiluAndMul
from .attention import Attention
from .embedding import ParallelEmbedding, build_embedding
from .linear import build_colwise_linear, build_merged_colwise_linear, build_qkv_proj, build_rowwise_linear
from .moe import FusedMoE, SharedExpertGate, SoftmaxTopK, build_fused_moe, build_shared_expert_gate
from .norm import RMSNorm
from .rotary_embedding import (ApplyRotaryEmb, RotaryEmbedding, build_rotary_embedding,
                               build_rotary_embedding_from_config)

__all__ = ['ApplyRotaryEmb', 'Attention', 'GeluAndMul', 'ParallelEmbedding', 'RMSNorm', 'RotaryEmbedding',
           'SiluAndMul', 'build_colwise_linear', 'build_embedding', 'build_merged_colwise_linear',
           'build_qkv_proj', 'build_rotary_embedding', 'build_rotary_embedding_from_config',
           'build_rowwise_linear']
__all__ += ['FusedMoE', 'SharedExpertGate', 'SoftmaxTopK', 'build_fused_moe', 'build_shared_expert_gate']
