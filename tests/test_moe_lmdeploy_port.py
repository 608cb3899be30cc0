"""lmdeploy's Qwen3-MoE port, written the way lmdeploy writes it (its module structure, builder calls and
`expert_params_mapping` loading, with the import prefix `lmdeploy.pytorch` changed to `lmdp` and its
expert-parallel load balancing left out), runs on lmdp and passes parity against transformers."""
from collections.abc import Iterable
from typing import Any

import pytest
import torch
from torch import nn

import parity
from lmdp.model_inputs import StepContext, StepContextManager
from lmdp.models.utils.cudagraph import CudaGraphMixin
from lmdp.nn import ApplyRotaryEmb, Attention, RMSNorm, SiluAndMul, build_rotary_embedding_from_config
from lmdp.nn.linear import build_merged_colwise_linear, build_qkv_proj, build_rowwise_linear
from lmdp.nn.moe import SoftmaxTopK, build_fused_moe
from lmdp.weight_loader.model_weight_loader import load_weight


class Qwen3MoeAttention(nn.Module):

    def __init__(self, config, dtype=None, device=None):
        super().__init__()
        quantization_config = getattr(config, 'quantization_config', None)
        num_heads, num_key_value_heads = config.num_attention_heads, config.num_key_value_heads
        head_dim = getattr(config, 'head_dim', config.hidden_size // num_heads)
        self.qkv_proj = build_qkv_proj(config.hidden_size, num_q_heads=num_heads, num_kv_heads=num_key_value_heads,
                                       head_size=head_dim, bias=config.attention_bias,
                                       quant_config=quantization_config, num_replicate_kv_heads=1, dtype=dtype,
                                       device=device)
        self.apply_rotary_pos_emb = ApplyRotaryEmb()
        self.attn_fwd = Attention(num_heads, head_dim, num_kv_heads=num_key_value_heads, v_head_size=head_dim,
                                  sliding_window=getattr(config, 'sliding_window', None))
        self.o_proj = build_rowwise_linear(num_heads * head_dim, config.hidden_size, bias=config.attention_bias,
                                           quant_config=quantization_config, dtype=dtype, device=device, is_tp=True)
        self.q_norm = RMSNorm(head_dim, config.rms_norm_eps, quant_config=quantization_config, dtype=dtype,
                              device=device)
        self.k_norm = RMSNorm(head_dim, config.rms_norm_eps, quant_config=quantization_config, dtype=dtype,
                              device=device)

    def forward(self, hidden_states, rotary_pos_emb, past_key_value=None, attn_metadata: Any = None):
        qkv_states = self.qkv_proj(hidden_states)
        qkv_states = qkv_states.flatten(0, -2)
        query_states, key_states, value_states = self.qkv_proj.split_qkv(qkv_states)
        query_states = self.q_norm(query_states)
        key_states = self.k_norm(key_states)
        cos, sin = rotary_pos_emb
        query_states, key_states = self.apply_rotary_pos_emb(query_states, key_states, cos, sin, inplace=True)
        attn_output = self.attn_fwd(query_states, key_states, value_states, past_key_value[0], past_key_value[1],
                                    attn_metadata, k_scales_zeros=None if len(past_key_value) == 2 else
                                    past_key_value[2], v_scales_zeros=None if len(past_key_value) == 2 else
                                    past_key_value[3], inplace=True)
        attn_output = attn_output.reshape(*hidden_states.shape[:-1], -1)
        return self.o_proj(attn_output)


class Qwen3MoeMLP(nn.Module):

    def __init__(self, config, intermediate_size=None, dtype=None, device=None, is_tp=True, all_reduce=True):
        super().__init__()
        quantization_config = getattr(config, 'quantization_config', None)
        intermediate_size = intermediate_size or config.intermediate_size
        self.gate_up_proj = build_merged_colwise_linear(config.hidden_size, [intermediate_size, intermediate_size],
                                                        bias=False, dtype=dtype, device=device,
                                                        quant_config=quantization_config, is_tp=is_tp)
        self.act_fn = SiluAndMul(inplace=True)
        self.down_proj = build_rowwise_linear(intermediate_size, config.hidden_size, bias=False,
                                              quant_config=quantization_config, dtype=dtype, device=device,
                                              is_tp=is_tp, all_reduce=all_reduce)

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_up_proj(x)))


class Qwen3MoeSparseMoeBlock(nn.Module):

    def __init__(self, config, layer_idx: int, dtype=None, device=None):
        super().__init__()
        quantization_config = getattr(config, 'quantization_config', None)
        self.hidden_dim = config.hidden_size
        self.ffn_dim = config.moe_intermediate_size
        self.num_experts = config.num_experts
        self.top_k = config.num_experts_per_tok
        self.renormalize = config.norm_topk_prob
        self.gate = build_rowwise_linear(self.hidden_dim, self.num_experts, bias=False, dtype=dtype, device=device,
                                         is_tp=False)
        self.softmax_topk = SoftmaxTopK(self.top_k)
        self.experts = build_fused_moe(self.hidden_dim, self.ffn_dim, self.num_experts, top_k=self.top_k,
                                       renormalize=self.renormalize, dtype=dtype, device=device,
                                       quant_config=quantization_config, all_reduce=False, layer_idx=layer_idx)

    def forward(self, hidden_states: torch.Tensor):
        batch_size, sequence_length, hidden_dim = hidden_states.shape
        hidden_states = hidden_states.view(-1, hidden_dim)
        router_logits = self.gate(hidden_states)
        topk_weights, topk_ids = self.softmax_topk(router_logits)
        out_states = self.experts(hidden_states, topk_weights, topk_ids)
        return out_states.reshape(batch_size, sequence_length, -1)


class Qwen3MoeDecoderLayer(nn.Module):

    def __init__(self, config, layer_idx: int, dtype=None, device=None):
        super().__init__()
        self.self_attn = Qwen3MoeAttention(config, dtype=dtype, device=device)
        if (layer_idx not in config.mlp_only_layers) and (config.num_experts > 0) and (
                (layer_idx + 1) % config.decoder_sparse_step == 0):
            self.mlp = Qwen3MoeSparseMoeBlock(config, layer_idx=layer_idx, dtype=dtype, device=device)
        else:
            self.mlp = Qwen3MoeMLP(config, intermediate_size=config.intermediate_size, dtype=dtype, device=device)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype, device=device)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype, device=device)

    def forward(self, hidden_states, rotary_pos_emb, past_key_value, residual=None, attn_metadata=None):
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


class Qwen3MoeModel(nn.Module):

    def __init__(self, config, dtype=None, device=None):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id, dtype=dtype,
                                         device=device)
        self.layers = nn.ModuleList([Qwen3MoeDecoderLayer(config, layer_idx, dtype=dtype, device=device)
                                     for layer_idx in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype, device=device)
        self.rotary_emb = build_rotary_embedding_from_config(config)

    def forward(self, input_ids=None, position_ids=None, past_key_values=None, attn_metadata=None,
                inputs_embeds=None):
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        hidden_states = inputs_embeds
        cos, sin = self.rotary_emb(hidden_states, position_ids)
        cos, sin = cos[0], sin[0]
        rotary_pos_emb = (cos, sin)
        residual = None
        for idx, decoder_layer in enumerate(self.layers):
            hidden_states, residual = decoder_layer(hidden_states, rotary_pos_emb=rotary_pos_emb,
                                                    past_key_value=past_key_values[idx], residual=residual,
                                                    attn_metadata=attn_metadata)
        hidden_states, _ = self.norm(hidden_states, residual)
        return hidden_states

    def get_input_embeddings(self):
        return self.embed_tokens


class Qwen3MoeForCausalLM(nn.Module, CudaGraphMixin):

    packed_modules_mapping = {'qkv_proj': ['q_proj', 'k_proj', 'v_proj'], 'gate_up_proj': ['gate_proj', 'up_proj']}

    def __init__(self, config, ctx_mgr: StepContextManager, dtype=None, device=None):
        super().__init__()
        self.config = config
        self.ctx_mgr = ctx_mgr
        self.model = Qwen3MoeModel(config, dtype=dtype, device=device)
        self.lm_head = build_rowwise_linear(config.hidden_size, config.vocab_size, bias=False, dtype=dtype,
                                            device=device)

    def forward(self, input_ids, position_ids, past_key_values: list[list[torch.Tensor]], attn_metadata=None,
                inputs_embeds=None, **kwargs):
        return self.model(input_ids=input_ids, position_ids=position_ids, past_key_values=past_key_values,
                          attn_metadata=attn_metadata, inputs_embeds=inputs_embeds)

    def get_logits(self, hidden_states: torch.Tensor):
        return self.lm_head(hidden_states)

    def get_input_embeddings(self):
        return self.model.get_input_embeddings()

    def prepare_inputs_for_generation(self, past_key_values, inputs_embeds: torch.Tensor | None = None,
                                      context: StepContext = None):
        return dict(input_ids=context.input_ids, position_ids=context.position_ids, past_key_values=past_key_values,
                    attn_metadata=context.attn_metadata, inputs_embeds=inputs_embeds)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]):
        stacked_params_mapping = [
            ('.qkv_proj', '.q_proj', 'q'), ('.qkv_proj', '.k_proj', 'k'), ('.qkv_proj', '.v_proj', 'v'),
            ('.gate_up_proj', '.gate_proj', 0), ('.gate_up_proj', '.up_proj', 1),
        ]
        num_experts = self.config.num_experts
        expert_params_mapping = []
        for exp_id in range(num_experts):
            gate_param = ('.experts.gate_up', f'.experts.{exp_id}.gate_proj', exp_id, 'gate')
            up_param = ('.experts.gate_up', f'.experts.{exp_id}.up_proj', exp_id, 'up')
            down_param = ('.experts.down', f'.experts.{exp_id}.down_proj', exp_id, 'down')
            expert_params_mapping += [gate_param, up_param, down_param]
        params_dict = dict(self.named_parameters())
        for name, loaded_weight in weights:
            if 'rotary_emb.inv_freq' in name:
                continue
            if '.experts' in name:
                for (param_name, weight_name, expert_id, shard_id) in expert_params_mapping:
                    if weight_name not in name:
                        continue
                    name = name.replace(weight_name, param_name)
                    param = params_dict[name]
                    load_weight(param, loaded_weight, expert_id=expert_id, shard_id=shard_id)
                    break
            else:
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


@pytest.fixture(scope='module')
def tiny_qwen3_moe(tmp_path_factory):
    from lmdp.tiny import make_tiny
    # a dense layer too (mlp_only_layers), so both branches of the lmdeploy layer run
    return str(make_tiny('qwen3_moe', tmp_path_factory.mktemp('qwen3_moe'), mlp_only_layers=[1]))


def test_lmdeploy_style_moe_port_passes_parity(tiny_qwen3_moe):
    report = parity.compare(tiny_qwen3_moe, prompts=2, decode_steps=2,
                            custom_module_map={'Qwen3MoeForCausalLM': Qwen3MoeForCausalLM})
    assert report.passed, report.summary()
    assert report.port_class.endswith('test_moe_lmdeploy_port.Qwen3MoeForCausalLM')
