# A Qwen3 port written the way lmdeploy's PyTorch-engine ports are written (its imports, builders and
# conventions), against lmdeploy's API. tests/test_lmdeploy_compat.py changes the import prefix
# `lmdeploy.pytorch` to `lmdp` and nothing else, then runs it through the parity harness.
from collections.abc import Iterable
from typing import Any

import torch
from lmdeploy.pytorch.model_inputs import StepContext, StepContextManager
from lmdeploy.pytorch.models.utils.cudagraph import CudaGraphMixin
from lmdeploy.pytorch.nn import (
    ApplyRotaryEmb,
    Attention,
    ParallelEmbedding,
    RMSNorm,
    SiluAndMul,
    build_rotary_embedding_from_config,
)
from lmdeploy.pytorch.nn.linear import (
    build_down_linear,
    build_gateup_linear,
    build_o_proj,
    build_qkv_proj,
    build_rowwise_linear,
)
from lmdeploy.pytorch.weight_loader.model_weight_loader import load_weight
from torch import nn
from transformers.configuration_utils import PretrainedConfig


class Qwen3Attention(nn.Module):

    def __init__(self, config: PretrainedConfig, dtype: torch.dtype = None, device: torch.device = None):
        super().__init__()
        quantization_config = getattr(config, 'quantization_config', None)
        num_heads = config.num_attention_heads
        num_key_value_heads = config.num_key_value_heads
        head_dim = getattr(config, 'head_dim', config.hidden_size // num_heads)
        num_replicate_kv_heads = getattr(config, 'num_replicate_key_value_heads', 1)
        self.qkv_proj = build_qkv_proj(config.hidden_size, num_q_heads=num_heads, num_kv_heads=num_key_value_heads,
                                       head_size=head_dim, bias=config.attention_bias,
                                       quant_config=quantization_config, dtype=dtype, device=device,
                                       num_replicate_kv_heads=num_replicate_kv_heads)
        self.apply_rotary_pos_emb = ApplyRotaryEmb()
        self.attn_fwd = Attention(num_heads, head_dim, num_kv_heads=num_key_value_heads, v_head_size=head_dim,
                                  sliding_window=getattr(config, 'sliding_window', None))
        self.o_proj = build_o_proj(num_heads * head_dim, config.hidden_size, bias=config.attention_bias,
                                   quant_config=quantization_config, dtype=dtype, device=device, is_tp=True)
        self.q_norm = RMSNorm(head_dim, config.rms_norm_eps, dtype=dtype, device=device)
        self.k_norm = RMSNorm(head_dim, config.rms_norm_eps, dtype=dtype, device=device)

    def forward(self, hidden_states: torch.Tensor, rotary_pos_emb: tuple[torch.FloatTensor, torch.FloatTensor],
                past_key_value: tuple[torch.Tensor] | None = None, attn_metadata: Any = None):
        qkv_states = self.qkv_proj(hidden_states)
        qkv_states = qkv_states.flatten(0, -2)
        query_states, key_states, value_states = self.qkv_proj.split_qkv(qkv_states)
        query_states = self.q_norm(query_states)
        key_states = self.k_norm(key_states)
        cos, sin = rotary_pos_emb
        query_states, key_states = self.apply_rotary_pos_emb(query_states, key_states, cos, sin, inplace=True)
        attn_output = self.attn_fwd(query_states, key_states, value_states, past_key_value[0], past_key_value[1],
                                    attn_metadata,
                                    k_scales_zeros=None if len(past_key_value) == 2 else past_key_value[2],
                                    v_scales_zeros=None if len(past_key_value) == 2 else past_key_value[3],
                                    inplace=True)
        attn_output = attn_output.reshape(*hidden_states.shape[:-1], -1)
        return self.o_proj(attn_output)


class Qwen3MLP(nn.Module):

    def __init__(self, config: PretrainedConfig, dtype: torch.dtype = None, device: torch.device = None):
        super().__init__()
        quantization_config = getattr(config, 'quantization_config', None)
        self.gate_up_proj = build_gateup_linear(config.hidden_size,
                                                [config.intermediate_size, config.intermediate_size], bias=False,
                                                dtype=dtype, device=device, quant_config=quantization_config,
                                                is_tp=True)
        self.act_fn = SiluAndMul(inplace=True)
        self.down_proj = build_down_linear(config.intermediate_size, config.hidden_size, bias=False,
                                           quant_config=quantization_config, dtype=dtype, device=device, is_tp=True)

    def forward(self, x):
        gate_up = self.gate_up_proj(x)
        act = self.act_fn(gate_up)
        return self.down_proj(act)


class Qwen3DecoderLayer(nn.Module):

    def __init__(self, config: PretrainedConfig, layer_idx: int, dtype: torch.dtype = None,
                 device: torch.device = None):
        super().__init__()
        self.layer_idx = layer_idx
        quantization_config = getattr(config, 'quantization_config', None)
        self.self_attn = Qwen3Attention(config, dtype=dtype, device=device)
        self.mlp = Qwen3MLP(config, dtype=dtype, device=device)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, quant_config=quantization_config,
                                       dtype=dtype, device=device)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps,
                                                quant_config=quantization_config, dtype=dtype, device=device)

    def forward(self, hidden_states: torch.Tensor, rotary_pos_emb: tuple[torch.FloatTensor, torch.FloatTensor],
                past_key_value: list[torch.FloatTensor] | None, residual: torch.Tensor | None = None,
                attn_metadata: Any = None):
        if residual is None:
            residual = hidden_states
            hidden_states = self.input_layernorm(hidden_states)
        else:
            hidden_states, residual = self.input_layernorm(hidden_states, residual)
        hidden_states = self.self_attn(hidden_states=hidden_states, rotary_pos_emb=rotary_pos_emb,
                                       past_key_value=past_key_value, attn_metadata=attn_metadata)
        hidden_states, residual = self.post_attention_layernorm(hidden_states, residual)
        hidden_states = self.mlp(hidden_states)
        return hidden_states, residual


class Qwen3model(nn.Module):

    def __init__(self, config: PretrainedConfig, dtype: torch.dtype = None, device: torch.device = None):
        super().__init__()
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = ParallelEmbedding(config.vocab_size, config.hidden_size, self.padding_idx, dtype=dtype,
                                              device=device)
        self.layers = nn.ModuleList([Qwen3DecoderLayer(config, layer_idx, dtype=dtype, device=device)
                                     for layer_idx in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype, device=device)
        self.rotary_emb = build_rotary_embedding_from_config(config, device=device)

    def forward(self, input_ids: torch.LongTensor = None, position_ids: torch.LongTensor | None = None,
                past_key_values: list[torch.FloatTensor] | None = None, attn_metadata: Any = None,
                inputs_embeds: torch.FloatTensor | None = None):
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        hidden_states = inputs_embeds
        cos, sin = self.rotary_emb(hidden_states, position_ids)
        cos, sin = cos[0], sin[0]
        rotary_pos_emb = (cos, sin)
        residual = None
        for idx, decoder_layer in enumerate(self.layers):
            past_key_value = past_key_values[idx]
            hidden_states, residual = decoder_layer(hidden_states, rotary_pos_emb=rotary_pos_emb,
                                                    past_key_value=past_key_value, residual=residual,
                                                    attn_metadata=attn_metadata)
        hidden_states, _ = self.norm(hidden_states, residual)
        return hidden_states

    def get_input_embeddings(self):
        return self.embed_tokens


class Qwen3ForCausalLM(nn.Module, CudaGraphMixin):

    packed_modules_mapping = {
        'qkv_proj': ['q_proj', 'k_proj', 'v_proj'],
        'gate_up_proj': ['gate_proj', 'up_proj'],
    }

    def __init__(self, config: PretrainedConfig, ctx_mgr: StepContextManager, dtype: torch.dtype = None,
                 device: torch.device = None):
        super().__init__()
        self.config = config
        self.ctx_mgr = ctx_mgr
        self.model = Qwen3model(config, dtype=dtype, device=device)
        self.lm_head = build_rowwise_linear(config.hidden_size, config.vocab_size, bias=False, dtype=dtype,
                                            device=device)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, past_key_values: list[list[torch.Tensor]],
                attn_metadata: Any = None, inputs_embeds: torch.Tensor = None, **kwargs):
        return self.model(input_ids=input_ids, position_ids=position_ids, past_key_values=past_key_values,
                          attn_metadata=attn_metadata, inputs_embeds=inputs_embeds)

    def get_logits(self, hidden_states: torch.Tensor):
        return self.lm_head(hidden_states)

    def get_input_embeddings(self):
        return self.model.get_input_embeddings()

    def prepare_inputs_for_generation(self, past_key_values: list[list[torch.Tensor]],
                                      inputs_embeds: torch.Tensor | None = None, context: StepContext = None):
        return dict(input_ids=context.input_ids, position_ids=context.position_ids, past_key_values=past_key_values,
                    attn_metadata=context.attn_metadata, inputs_embeds=inputs_embeds)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]):
        stacked_params_mapping = [
            ('.qkv_proj', '.q_proj', 'q'),
            ('.qkv_proj', '.k_proj', 'k'),
            ('.qkv_proj', '.v_proj', 'v'),
            ('.gate_up_proj', '.gate_proj', 0),
            ('.gate_up_proj', '.up_proj', 1),
        ]
        params_dict = dict(self.named_parameters())
        for name, loaded_weight in weights:
            if 'rotary_emb.inv_freq' in name:
                continue
            if ('rotary_emb.cos_cached' in name or 'rotary_emb.sin_cached' in name):
                continue
            if self.config.tie_word_embeddings and 'lm_head.weight' in name:
                continue
            for (param_name, weight_name, shard_id) in stacked_params_mapping:
                if weight_name not in name:
                    continue
                name = name.replace(weight_name, param_name)
                param = params_dict[name]
                load_weight(param, loaded_weight, shard_id=shard_id)
                break
            else:
                param = params_dict[name]
                load_weight(param, loaded_weight)
