"""Qwen3-MoE on lmdp's paged engine: Qwen3's attention (per-head q/k norm) with a sparse mixture of experts.

Quirks kept: `norm_topk_prob` decides whether the top-k weights are renormalised (True in the released
checkpoints); layers in `mlp_only_layers`, or off the `decoder_sparse_step` rhythm, keep a dense MLP of
`intermediate_size`; experts have their own `moe_intermediate_size`.
"""
import torch

from ..nn import GatedMLP
from .qwen3 import Qwen3DecoderLayer, Qwen3ForCausalLM, Qwen3Model
from .sparse_moe import MoeWeightsMixin, SparseMoeBlock, is_sparse_layer


def dense_mlp(config, intermediate_size: int, dtype=None, device=None) -> GatedMLP:
    return GatedMLP(config.hidden_size, intermediate_size, act=config.hidden_act, dtype=dtype, device=device,
                    quant_config=getattr(config, 'quantization_config', None))


class Qwen3MoeSparseMoeBlock(SparseMoeBlock):

    def __init__(self, config, dtype=None, device=None):
        super().__init__(config.hidden_size, config.moe_intermediate_size, config.num_experts,
                         config.num_experts_per_tok, renormalize=bool(config.norm_topk_prob),
                         hidden_act=config.hidden_act, dtype=dtype, device=device,
                         quant_config=getattr(config, 'quantization_config', None))


class Qwen3MoeDecoderLayer(Qwen3DecoderLayer):

    def build_mlp(self, config, layer_idx, dtype=None, device=None):
        if is_sparse_layer(config, layer_idx):
            return Qwen3MoeSparseMoeBlock(config, dtype=dtype, device=device)
        return dense_mlp(config, config.intermediate_size, dtype=dtype, device=device)


class Qwen3MoeModel(Qwen3Model):

    def __init__(self, config, dtype=None, device=None, layer_type=Qwen3MoeDecoderLayer):
        super().__init__(config, dtype=dtype, device=device, layer_type=layer_type)


class Qwen3MoeForCausalLM(MoeWeightsMixin, Qwen3ForCausalLM):

    def __init__(self, config, ctx_mgr, dtype: torch.dtype = None, device: torch.device = None,
                 model_type=Qwen3MoeModel):
        super().__init__(config, ctx_mgr, dtype=dtype, device=device, model_type=model_type)
        self.init_expert_mapping(config.num_experts)
