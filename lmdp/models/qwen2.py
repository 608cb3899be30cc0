"""Qwen2 (and Qwen2.5) on lmdp's paged engine: Llama's skeleton with biases on q, k and v (not on o_proj) and
sliding windows on the layers `config.layer_types` names (those past `max_window_layers` when
`use_sliding_window` is on)."""
import torch

from .llama import LlamaAttention, LlamaDecoderLayer, LlamaForCausalLM, LlamaModel


class Qwen2DecoderLayer(LlamaDecoderLayer):

    def build_attention(self, config, layer_idx, dtype=None, device=None):
        return LlamaAttention(config, layer_idx, dtype=dtype, device=device, qkv_bias=True, o_bias=False)


class Qwen2Model(LlamaModel):

    def __init__(self, config, dtype=None, device=None, layer_type=Qwen2DecoderLayer):
        super().__init__(config, dtype=dtype, device=device, layer_type=layer_type)


class Qwen2ForCausalLM(LlamaForCausalLM):

    def __init__(self, config, ctx_mgr, dtype: torch.dtype = None, device: torch.device = None,
                 model_type=Qwen2Model):
        super().__init__(config, ctx_mgr, dtype=dtype, device=device, model_type=model_type)
