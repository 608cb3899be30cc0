"""Gemma and Gemma 2 on lmdp's paged engine.

Both scale the embeddings by sqrt(hidden) and use `(1 + w)` RMSNorm weights (folded into the weight at load
time, so the plain fused RMSNorm serves) and a tanh-GELU MLP. Gemma 2 adds norms after attention and around the
MLP, a query scale from `query_pre_attn_scalar`, a sliding window on every other layer, and tanh softcaps on the
attention scores and the final logits.
"""
from typing import Any, Iterable, Tuple

import torch
from torch import nn

from ..nn import ApplyRotaryEmb, Attention, GeluAndMul, RMSNorm, build_qkv_proj, build_rowwise_linear
from ..nn.rotary_embedding import apply_rotary
from .llama import LlamaForCausalLM, LlamaMLP, LlamaModel


def is_sliding_layer(config, layer_idx: int) -> bool:
    layer_types = getattr(config, 'layer_types', None)
    if layer_types:
        return layer_types[layer_idx] == 'sliding_attention'
    return config.model_type == 'gemma2' and layer_idx % 2 == 0


class GemmaAttention(nn.Module):

    def __init__(self, config, layer_idx: int, dtype=None, device=None):
        super().__init__()
        quant_config = getattr(config, 'quantization_config', None)
        num_heads, num_kv_heads, head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        bias = getattr(config, 'attention_bias', False)
        self.qkv_proj = build_qkv_proj(config.hidden_size, num_q_heads=num_heads, num_kv_heads=num_kv_heads,
                                       head_size=head_dim, bias=bias, quant_config=quant_config, dtype=dtype,
                                       device=device)
        self.apply_rotary_pos_emb = ApplyRotaryEmb()
        scalar = getattr(config, 'query_pre_attn_scalar', None) or head_dim
        window = getattr(config, 'sliding_window', None) if is_sliding_layer(config, layer_idx) else None
        self.attn_fwd = Attention(num_heads, head_dim, scale=scalar ** -0.5, num_kv_heads=num_kv_heads,
                                  sliding_window=window,
                                  logit_softcapping=getattr(config, 'attn_logit_softcapping', None))
        self.o_proj = build_rowwise_linear(num_heads * head_dim, config.hidden_size, bias=bias,
                                           quant_config=quant_config, dtype=dtype, device=device, is_tp=True)

    def forward(self, hidden_states, rotary_pos_emb, past_key_value, attn_metadata=None):
        qkv = self.qkv_proj(hidden_states).flatten(0, -2)
        q, k, v = self.qkv_proj.split_qkv(qkv)
        q, k, deferred = apply_rotary(self.apply_rotary_pos_emb, q, k, rotary_pos_emb)
        out = self.attn_fwd(q, k, v, past_key_value[0], past_key_value[1], attn_metadata, inplace=True,
                            rotary_pos_emb=deferred)
        return self.o_proj(out.reshape(*hidden_states.shape[:-1], -1))


class GemmaMLP(LlamaMLP):
    """Llama's gated MLP with GELU (tanh-approximated, as Gemma's `gelu_pytorch_tanh`) for SiLU."""

    def __init__(self, config, dtype=None, device=None):
        super().__init__(config, dtype=dtype, device=device)
        act = getattr(config, 'hidden_activation', None) or getattr(config, 'hidden_act', 'gelu_pytorch_tanh')
        self.act_fn = GeluAndMul(approximate='tanh' if 'tanh' in act else 'none')


class GemmaDecoderLayer(nn.Module):

    def __init__(self, config, layer_idx: int, dtype=None, device=None):
        super().__init__()
        eps = config.rms_norm_eps
        norm = lambda: RMSNorm(config.hidden_size, eps, dtype=dtype, device=device)  # noqa: E731
        self.self_attn = GemmaAttention(config, layer_idx, dtype=dtype, device=device)
        self.mlp = GemmaMLP(config, dtype=dtype, device=device)
        self.input_layernorm = norm()
        self.post_attention_layernorm = norm()
        self.sandwich = config.model_type == 'gemma2'   # Gemma 2 norms each block's output too
        if self.sandwich:
            self.pre_feedforward_layernorm = norm()
            self.post_feedforward_layernorm = norm()

    def forward(self, hidden_states, rotary_pos_emb, past_key_value, residual=None, attn_metadata: Any = None):
        if residual is None:
            residual = hidden_states
            hidden_states = self.input_layernorm(hidden_states)
        else:
            hidden_states, residual = self.input_layernorm(hidden_states, residual)
        hidden_states = self.self_attn(hidden_states, rotary_pos_emb, past_key_value, attn_metadata)
        if self.sandwich:
            hidden_states = self.post_attention_layernorm(hidden_states)
            hidden_states, residual = self.pre_feedforward_layernorm(hidden_states, residual)
            hidden_states = self.post_feedforward_layernorm(self.mlp(hidden_states))
        else:
            hidden_states, residual = self.post_attention_layernorm(hidden_states, residual)
            hidden_states = self.mlp(hidden_states)
        return hidden_states, residual


class GemmaModel(LlamaModel):
    """Llama's skeleton with Gemma's layers and embeddings scaled by sqrt(hidden)."""

    decoder_layer_cls = GemmaDecoderLayer

    def __init__(self, config, dtype=None, device=None):
        super().__init__(config, dtype=dtype, device=device)
        self.hidden_size = config.hidden_size

    def embed(self, input_ids, inputs_embeds=None):
        hidden_states = super().embed(input_ids, inputs_embeds)
        # transformers rounds the scale to the activation dtype before multiplying; so do we
        return hidden_states * torch.tensor(self.hidden_size ** 0.5, dtype=hidden_states.dtype)


class GemmaForCausalLM(LlamaForCausalLM):
    """Gemma / Gemma 2; the contract (prepare_inputs_for_generation, stacking) is Llama's."""

    def __init__(self, config, ctx_mgr, dtype: torch.dtype = None, device: torch.device = None):
        nn.Module.__init__(self)
        self.config, self.ctx_mgr = config, ctx_mgr
        self.model = GemmaModel(config, dtype=dtype, device=device)
        self.final_logit_softcapping = getattr(config, 'final_logit_softcapping', None)
        self.tie_word_embeddings = bool(getattr(config, 'tie_word_embeddings', True))
        self.lm_head = build_rowwise_linear(config.hidden_size, config.vocab_size, bias=False, dtype=dtype,
                                            device=device)
        self.ignored_checkpoint_keys = [r'rotary_emb\.inv_freq']
        if self.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
            self.ignored_checkpoint_keys.append(r'^lm_head\.weight$')

    def get_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(hidden_states)
        if self.final_logit_softcapping:
            cap = self.final_logit_softcapping
            logits = torch.tanh(logits.float() / cap) * cap
        return logits

    def load_weights(self, weights: Iterable[Tuple[str, torch.Tensor]]):
        def fold_norms(pairs):
            # Gemma's norms multiply by (1 + w): fold the 1 in once, in float32, at load time
            for name, tensor in pairs:
                if name.endswith('norm.weight'):
                    tensor = tensor.float() + 1
                yield name, tensor
        super().load_weights(fold_norms(weights))
