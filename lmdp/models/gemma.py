"""Gemma and Gemma 2 on lmdp's paged engine: Llama's skeleton with Gemma's layers.

Both scale the embeddings by sqrt(hidden) and use `(1 + w)` RMSNorm weights (folded into the weight at load
time, so the plain fused RMSNorm serves) and a tanh-GELU MLP. Gemma 2 adds norms after attention and around the
MLP, a query scale from `query_pre_attn_scalar`, a sliding window on every other layer, and tanh softcaps on the
attention scores and the final logits.
"""
from collections.abc import Iterable

import torch
from torch import nn

from ..nn import Attention, GatedMLP, RMSNorm, build_o_proj, build_qkv_proj
from .llama import LlamaDecoderLayer, LlamaForCausalLM, LlamaModel


def is_sliding_layer(config, layer_idx: int) -> bool:
    if getattr(config, 'layer_types', None):
        return config.layer_types[layer_idx] == 'sliding_attention'
    return config.model_type == 'gemma2' and layer_idx % 2 == 0


class GemmaAttention(nn.Module):
    """qkv_proj → rotary → paged attention (query scale, window, softcap per layer) → o_proj."""

    def __init__(self, config, layer_idx: int, dtype=None, device=None):
        super().__init__()
        quant_config = getattr(config, 'quantization_config', None)
        num_heads, num_kv_heads, head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        bias = getattr(config, 'attention_bias', False)
        self.qkv_proj = build_qkv_proj(config.hidden_size, num_q_heads=num_heads, num_kv_heads=num_kv_heads,
                                       head_size=head_dim, bias=bias, quant_config=quant_config, dtype=dtype,
                                       device=device)
        scalar = getattr(config, 'query_pre_attn_scalar', None) or head_dim
        window = config.sliding_window if is_sliding_layer(config, layer_idx) else None
        self.attn_fwd = Attention(num_heads, head_dim, scale=scalar ** -0.5, num_kv_heads=num_kv_heads,
                                  sliding_window=window,
                                  logit_softcapping=getattr(config, 'attn_logit_softcapping', None))
        self.o_proj = build_o_proj(num_heads * head_dim, config.hidden_size, bias=bias, quant_config=quant_config,
                                   dtype=dtype, device=device, is_tp=True)

    def forward(self, hidden_states, rotary_pos_emb, past_key_value, attn_metadata=None):
        q, k, v = self.qkv_proj.split_qkv(self.qkv_proj(hidden_states).flatten(0, -2))
        out = self.attn_fwd(q, k, v, past_key_value[0], past_key_value[1], attn_metadata,
                            rotary_pos_emb=rotary_pos_emb)
        return self.o_proj(out.reshape(*hidden_states.shape[:-1], -1))


class GemmaMLP(GatedMLP):
    """Llama's gated MLP with GELU (tanh-approximated, as Gemma's `gelu_pytorch_tanh`)."""

    def __init__(self, config, dtype=None, device=None):
        act = getattr(config, 'hidden_activation', None) or getattr(config, 'hidden_act', 'gelu_pytorch_tanh')
        super().__init__(config.hidden_size, config.intermediate_size, act=act, bias=False, dtype=dtype,
                         device=device, quant_config=getattr(config, 'quantization_config', None))


class GemmaDecoderLayer(LlamaDecoderLayer):
    """Llama's layer with Gemma's attention and MLP; Gemma 2 (and 3) also norm each block's output ("sandwich")."""

    def __init__(self, config, layer_idx: int, dtype=None, device=None):
        super().__init__(config, layer_idx, dtype=dtype, device=device)
        self.sandwich = config.model_type != 'gemma'
        if self.sandwich:
            self.pre_feedforward_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype,
                                                     device=device)
            self.post_feedforward_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype,
                                                      device=device)

    def build_attention(self, config, layer_idx, dtype=None, device=None):
        return GemmaAttention(config, layer_idx, dtype=dtype, device=device)

    def build_mlp(self, config, layer_idx, dtype=None, device=None):
        return GemmaMLP(config, dtype=dtype, device=device)

    def forward(self, hidden_states, rotary_pos_emb, past_key_value, residual=None, attn_metadata=None):
        if not self.sandwich:
            return super().forward(hidden_states, rotary_pos_emb, past_key_value, residual, attn_metadata)
        if residual is None:
            residual = hidden_states
            hidden_states = self.input_layernorm(hidden_states)
        else:
            hidden_states, residual = self.input_layernorm(hidden_states, residual)
        hidden_states = self.self_attn(hidden_states, rotary_pos_emb, past_key_value, attn_metadata)
        hidden_states = self.post_attention_layernorm(hidden_states)
        hidden_states, residual = self.pre_feedforward_layernorm(hidden_states, residual)
        hidden_states = self.post_feedforward_layernorm(self.mlp(hidden_states))
        return hidden_states, residual


class GemmaModel(LlamaModel):
    """Llama's skeleton with Gemma's layers and embeddings scaled by sqrt(hidden)."""

    def __init__(self, config, dtype=None, device=None, layer_type=GemmaDecoderLayer):
        super().__init__(config, dtype=dtype, device=device, layer_type=layer_type)
        self.hidden_size = config.hidden_size

    def embed(self, input_ids, inputs_embeds=None):
        hidden_states = super().embed(input_ids, inputs_embeds)
        # transformers rounds the scale to the activation dtype before multiplying; so do we
        return hidden_states * torch.tensor(self.hidden_size ** 0.5, dtype=hidden_states.dtype)


class GemmaForCausalLM(LlamaForCausalLM):
    """Gemma / Gemma 2; the contract (prepare_inputs_for_generation, stacking) is Llama's."""

    def __init__(self, config, ctx_mgr, dtype: torch.dtype = None, device: torch.device = None,
                 model_type=GemmaModel):
        super().__init__(config, ctx_mgr, dtype=dtype, device=device, model_type=model_type)
        self.final_logit_softcapping = getattr(config, 'final_logit_softcapping', None)
        # transformers multiplies by (1 + w) in float32; a folded gain rounded to bfloat16 would put a fixed error
        # of up to half a unit on every channel, so the folded gains stay float32 (lmdp.kernels.rms_norm)
        for module in self.modules():
            if isinstance(module, RMSNorm):
                module.weight.data = module.weight.data.float()
                module.weight.keep_dtype = True

    def get_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(hidden_states)
        if self.final_logit_softcapping:
            cap = self.final_logit_softcapping
            logits = torch.tanh(logits.float() / cap) * cap
        return logits

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]):
        def fold_norms(pairs):
            # Gemma's norms multiply by (1 + w): fold the 1 in once, in float32, at load time (kept float32)
            for name, tensor in pairs:
                if name.endswith('norm.weight'):
                    tensor = tensor.float() + 1
                yield name, tensor
        super().load_weights(fold_norms(weights))
