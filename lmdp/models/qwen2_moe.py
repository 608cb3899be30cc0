"""Qwen2-MoE (Qwen1.5-MoE, Qwen2-57B-A14B) on lmdp's paged engine: Qwen2's attention (biases on q, k, v) with a
sparse mixture of experts plus an always-on shared expert.

Quirks kept: the shared expert has its own width (`shared_expert_intermediate_size`) and its output is scaled
per token by `sigmoid(shared_expert_gate(x))` before it joins the routed experts' sum; `norm_topk_prob` (False in
the released checkpoints) decides renormalisation; `mlp_only_layers` / `decoder_sparse_step` pick dense layers.
"""
import torch

from .llama import LlamaAttention
from .qwen2 import Qwen2DecoderLayer, Qwen2ForCausalLM, Qwen2Model
from .qwen3_moe import dense_mlp
from .sparse_moe import MoeWeightsMixin, SparseMoeBlock, is_sparse_layer


class Qwen2MoeSparseMoeBlock(SparseMoeBlock):

    def __init__(self, config, dtype=None, device=None):
        shared = dense_mlp(config, config.shared_expert_intermediate_size, dtype=dtype, device=device)
        super().__init__(config.hidden_size, config.moe_intermediate_size, config.num_experts,
                         config.num_experts_per_tok, renormalize=bool(config.norm_topk_prob),
                         hidden_act=config.hidden_act, shared_expert=shared, shared_expert_gate=True, dtype=dtype,
                         device=device, quant_config=getattr(config, 'quantization_config', None))


class Qwen2MoeDecoderLayer(Qwen2DecoderLayer):

    def build_attention(self, config, layer_idx, dtype=None, device=None):
        return LlamaAttention(config, layer_idx, dtype=dtype, device=device,
                              qkv_bias=getattr(config, 'qkv_bias', True), o_bias=False)

    def build_mlp(self, config, layer_idx, dtype=None, device=None):
        if is_sparse_layer(config, layer_idx):
            return Qwen2MoeSparseMoeBlock(config, dtype=dtype, device=device)
        return dense_mlp(config, config.intermediate_size, dtype=dtype, device=device)


class Qwen2MoeModel(Qwen2Model):

    def __init__(self, config, dtype=None, device=None, layer_type=Qwen2MoeDecoderLayer):
        super().__init__(config, dtype=dtype, device=device, layer_type=layer_type)


class Qwen2MoeForCausalLM(MoeWeightsMixin, Qwen2ForCausalLM):

    def __init__(self, config, ctx_mgr, dtype: torch.dtype = None, device: torch.device = None,
                 model_type=Qwen2MoeModel):
        super().__init__(config, ctx_mgr, dtype=dtype, device=device, model_type=model_type)
        self.init_expert_mapping(config.num_experts)
