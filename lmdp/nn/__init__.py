"""Building blocks for model ports (lmdeploy's `lmdeploy.pytorch.nn` names).

Each takes `is_tp`/`quant_config` where lmdeploy's does, and every parameter carries a `weight_loader`. Blocks
(`Attention` with its rotary, `GatedMLP` with its activation) hold each step as a named child and fuse steps
into one kernel where they can (`lmdp.nn.fusion`).
"""
from .activation import GeluAndMul, SiluAndMul
from .attention import Attention
from .embedding import ParallelEmbedding, build_embedding
from .linear import (
                     build_colwise_linear,
                     build_down_linear,
                     build_gateup_linear,
                     build_merged_colwise_linear,
                     build_o_proj,
                     build_qkv_proj,
                     build_rowwise_linear,
)
from .lm_head import ParallelLMHead, build_lm_head
from .mlp import GatedMLP, build_gated_activation
from .moe import FusedMoE, SharedExpertGate, SoftmaxTopK, build_fused_moe, build_shared_expert_gate
from .norm import RMSNorm
from .rotary_embedding import (
                     ApplyRotaryEmb,
                     RopeType,
                     RotaryEmbedding,
                     build_rotary_embedding,
                     build_rotary_embedding_from_config,
                     build_rotary_params,
)

__all__ = ['ApplyRotaryEmb', 'Attention', 'GatedMLP', 'GeluAndMul', 'ParallelEmbedding', 'RMSNorm', 'RopeType',
           'RotaryEmbedding', 'SiluAndMul', 'build_colwise_linear', 'build_down_linear', 'build_embedding',
           'build_gated_activation', 'build_gateup_linear', 'build_merged_colwise_linear', 'build_o_proj',
           'build_qkv_proj', 'build_rotary_embedding', 'build_rotary_embedding_from_config', 'build_rotary_params',
           'build_rowwise_linear']
__all__ += ['ParallelLMHead', 'build_lm_head']
__all__ += ['FusedMoE', 'SharedExpertGate', 'SoftmaxTopK', 'build_fused_moe', 'build_shared_expert_gate']
