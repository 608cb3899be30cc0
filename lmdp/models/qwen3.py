"""Qwen3 on lmdp's paged engine: Llama's skeleton with per-head RMSNorms on q and k before rotary.

Quirks kept: `head_dim` set apart from hidden / heads, q_norm and k_norm over each head's channels, tied
embeddings on the small sizes, sliding windows on the layers `config.layer_types` names.
"""
import torch
from torch import nn

from ..nn import Attention, RMSNorm, build_o_proj, build_qkv_proj
from .llama import LlamaDecoderLayer, LlamaForCausalLM, LlamaModel, head_dim_of, layer_sliding_window


class Qwen3Attention(nn.Module):
    """qkv_proj → q_norm / k_norm per head → rotary → paged attention (`attn_fwd`) → o_proj."""

    def __init__(self, config, layer_idx: int = 0, dtype=None, device=None):
        super().__init__()
        quant_config = getattr(config, 'quantization_config', None)
        num_heads, num_kv_heads = config.num_attention_heads, config.num_key_value_heads
        head_dim = head_dim_of(config)
        bias = getattr(config, 'attention_bias', False)
        self.qkv_proj = build_qkv_proj(config.hidden_size, num_q_heads=num_heads, num_kv_heads=num_kv_heads,
                                       head_size=head_dim, bias=bias, quant_config=quant_config, dtype=dtype,
                                       device=device,
                                       num_replicate_kv_heads=getattr(config, 'num_replicate_key_value_heads', 1))
        self.q_norm = RMSNorm(head_dim, config.rms_norm_eps, dtype=dtype, device=device)
        self.k_norm = RMSNorm(head_dim, config.rms_norm_eps, dtype=dtype, device=device)
        self.attn_fwd = Attention(num_heads, head_dim, num_kv_heads=num_kv_heads,
                                  sliding_window=layer_sliding_window(config, layer_idx))
        self.o_proj = build_o_proj(num_heads * head_dim, config.hidden_size, bias=bias, quant_config=quant_config,
                                   dtype=dtype, device=device, is_tp=True)

    def forward(self, hidden_states: torch.Tensor, rotary_pos_emb, past_key_value, attn_metadata=None):
        q, k, v = self.qkv_proj.split_qkv(self.qkv_proj(hidden_states).flatten(0, -2))
        q, k = self.q_norm(q), self.k_norm(k)
        out = self.attn_fwd(q, k, v, past_key_value[0], past_key_value[1], attn_metadata,
                            rotary_pos_emb=rotary_pos_emb)
        return self.o_proj(out.reshape(*hidden_states.shape[:-1], -1))


class Qwen3DecoderLayer(LlamaDecoderLayer):
    """Llama's layer with Qwen3's attention (a mixture-of-experts variant overrides `build_mlp`)."""

    def build_attention(self, config, layer_idx, dtype=None, device=None):
        return Qwen3Attention(config, layer_idx, dtype=dtype, device=device)


class Qwen3Model(LlamaModel):

    def __init__(self, config, dtype=None, device=None, layer_type=Qwen3DecoderLayer):
        super().__init__(config, dtype=dtype, device=device, layer_type=layer_type)


class Qwen3ForCausalLM(LlamaForCausalLM):

    def __init__(self, config, ctx_mgr, dtype: torch.dtype = None, device: torch.device = None,
                 model_type=Qwen3Model):
        super().__init__(config, ctx_mgr, dtype=dtype, device=device, model_type=model_type)
