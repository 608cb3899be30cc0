"""Mixtral on lmdp's paged engine: Mistral's attention (GQA, sliding window when the config sets one) with a
sparse mixture of experts in place of the MLP.

Quirks kept: the router's top-k weights are always renormalised to sum to one; checkpoints name the block
`block_sparse_moe` (transformers 5's module is `mlp`, as here) and each expert's projections `w1` (gate),
`w3` (up) and `w2` (down).
"""
import torch

from .llama import LlamaDecoderLayer, LlamaForCausalLM, LlamaModel
from .sparse_moe import MoeWeightsMixin, SparseMoeBlock


class MixtralSparseMoeBlock(SparseMoeBlock):

    def __init__(self, config, dtype=None, device=None):
        super().__init__(config.hidden_size, config.intermediate_size, config.num_local_experts,
                         config.num_experts_per_tok, renormalize=True, hidden_act=config.hidden_act, dtype=dtype,
                         device=device, quant_config=getattr(config, 'quantization_config', None))


class MixtralDecoderLayer(LlamaDecoderLayer):

    def build_mlp(self, config, layer_idx, dtype=None, device=None):
        return MixtralSparseMoeBlock(config, dtype=dtype, device=device)


class MixtralModel(LlamaModel):

    def __init__(self, config, dtype=None, device=None, layer_type=MixtralDecoderLayer):
        super().__init__(config, dtype=dtype, device=device, layer_type=layer_type)


class MixtralForCausalLM(MoeWeightsMixin, LlamaForCausalLM):

    expert_checkpoint_names = ('w1', 'w3', 'w2')
    checkpoint_renames = (('.block_sparse_moe.', '.mlp.'), )

    def __init__(self, config, ctx_mgr, dtype: torch.dtype = None, device: torch.device = None,
                 model_type=MixtralModel):
        super().__init__(config, ctx_mgr, dtype=dtype, device=device, model_type=model_type)
        self.init_expert_mapping(config.num_local_experts)
