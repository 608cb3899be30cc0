"""Llama (and Mistral-style sliding-window Llamas) on lmdp's paged engine.

The skeleton other families reuse: `LlamaModel(config, layer_type=...)` takes the decoder layer class, a decoder
layer builds its parts through `build_attention` / `build_mlp`, and `LlamaForCausalLM(..., model_type=...)` takes
the model class, so a family that is "Llama with other layers" passes its own (see gemma.py, qwen2.py).
"""
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from ..model_inputs import StepContext, StepContextManager
from ..nn import (
    Attention,
    GatedMLP,
    ParallelEmbedding,
    RMSNorm,
    build_lm_head,
    build_o_proj,
    build_qkv_proj,
    build_rotary_embedding_from_config,
)
from ..weight_loader import load_weight


def head_dim_of(config) -> int:
    return getattr(config, 'head_dim', None) or config.hidden_size // config.num_attention_heads


def layer_sliding_window(config, layer_idx: int) -> int | None:
    """The attention window of one layer: `config.layer_types` says which layers slide (Qwen2, Gemma 2/3, ...);
    without it every layer slides when the config has a window (Mistral, Phi-3), unless `use_sliding_window` is
    off."""
    window = getattr(config, 'sliding_window', None)
    layer_types = getattr(config, 'layer_types', None)
    if layer_types:
        return window if layer_types[layer_idx] == 'sliding_attention' else None
    return window if getattr(config, 'use_sliding_window', True) is not False else None


class LlamaAttention(nn.Module):
    """qkv_proj → rotary → paged attention (`attn_fwd`, rotary inside) → o_proj."""

    def __init__(self, config, layer_idx: int = 0, dtype=None, device=None, qkv_bias: bool | None = None,
                 o_bias: bool | None = None):
        super().__init__()
        quant_config = getattr(config, 'quantization_config', None)
        num_heads = config.num_attention_heads
        num_kv_heads = getattr(config, 'num_key_value_heads', None) or num_heads
        head_dim = head_dim_of(config)
        bias = getattr(config, 'attention_bias', False)
        self.qkv_proj = build_qkv_proj(config.hidden_size, num_q_heads=num_heads, num_kv_heads=num_kv_heads,
                                       head_size=head_dim, bias=bias if qkv_bias is None else qkv_bias,
                                       quant_config=quant_config, dtype=dtype, device=device)
        self.attn_fwd = Attention(num_heads, head_dim, num_kv_heads=num_kv_heads,
                                  sliding_window=layer_sliding_window(config, layer_idx))
        self.o_proj = build_o_proj(num_heads * head_dim, config.hidden_size, bias=bias if o_bias is None else o_bias,
                                   quant_config=quant_config, dtype=dtype, device=device, is_tp=True)

    def forward(self, hidden_states: torch.Tensor, rotary_pos_emb: tuple[torch.Tensor, torch.Tensor],
                past_key_value: tuple[torch.Tensor, torch.Tensor], attn_metadata: Any = None):
        qkv_states = self.qkv_proj(hidden_states).flatten(0, -2)   # [T, ...]: the step's tokens, packed
        query_states, key_states, value_states = self.qkv_proj.split_qkv(qkv_states)
        attn_output = self.attn_fwd(query_states, key_states, value_states, past_key_value[0], past_key_value[1],
                                    attn_metadata, rotary_pos_emb=rotary_pos_emb)
        return self.o_proj(attn_output.reshape(*hidden_states.shape[:-1], -1))


class LlamaMLP(GatedMLP):
    """gate_up_proj → SiLU-and-mul → down_proj."""

    def __init__(self, config, dtype=None, device=None):
        super().__init__(config.hidden_size, config.intermediate_size, act=getattr(config, 'hidden_act', 'silu'),
                         bias=getattr(config, 'mlp_bias', False), dtype=dtype, device=device,
                         quant_config=getattr(config, 'quantization_config', None))


class LlamaDecoderLayer(nn.Module):
    """input norm → attention → post-attention norm → MLP, the residual add fused into each norm.

    Families with Llama's layer and other parts override `build_attention` / `build_mlp`.
    """

    def __init__(self, config, layer_idx: int, dtype=None, device=None):
        super().__init__()
        self.layer_idx = layer_idx
        self.self_attn = self.build_attention(config, layer_idx, dtype=dtype, device=device)
        self.mlp = self.build_mlp(config, layer_idx, dtype=dtype, device=device)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype, device=device)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype, device=device)

    def build_attention(self, config, layer_idx: int, dtype=None, device=None) -> nn.Module:
        return LlamaAttention(config, layer_idx, dtype=dtype, device=device)

    def build_mlp(self, config, layer_idx: int, dtype=None, device=None) -> nn.Module:
        return LlamaMLP(config, dtype=dtype, device=device)

    def forward(self, hidden_states, rotary_pos_emb, past_key_value, residual: torch.Tensor | None = None,
                attn_metadata: Any = None):
        # The residual add is fused into the next norm: a layer returns (mlp_out, residual) and the stream
        # itself is their sum.
        if residual is None:
            residual = hidden_states
            hidden_states = self.input_layernorm(hidden_states)
        else:
            hidden_states, residual = self.input_layernorm(hidden_states, residual)
        hidden_states = self.self_attn(hidden_states, rotary_pos_emb, past_key_value, attn_metadata)
        hidden_states, residual = self.post_attention_layernorm(hidden_states, residual)
        hidden_states = self.mlp(hidden_states)
        return hidden_states, residual


class LlamaModel(nn.Module):
    """Embeddings, decoder layers (of class `layer_type`), final norm. Families override `embed` to scale or
    otherwise transform the embeddings, `build_rotary_embedding` for other rotary tables."""

    def __init__(self, config, dtype=None, device=None, layer_type=LlamaDecoderLayer):
        super().__init__()
        self.embed_tokens = ParallelEmbedding(config.vocab_size, config.hidden_size,
                                              getattr(config, 'pad_token_id', None), dtype=dtype, device=device,
                                              is_tp=True)
        self.layers = nn.ModuleList([layer_type(config, i, dtype=dtype, device=device)
                                     for i in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype, device=device)
        self.rotary_emb = self.build_rotary_embedding(config, device=device)

    def build_rotary_embedding(self, config, device=None) -> nn.Module:
        """What makes the cos/sin every layer receives (a family with per-layer-type rope returns a dict)."""
        return build_rotary_embedding_from_config(config, device=device)

    def forward(self, input_ids=None, position_ids=None, past_key_values=None, attn_metadata=None,
                inputs_embeds=None):
        hidden_states = self.embed(input_ids, inputs_embeds)
        # per sequence where the scaling depends on the sequence's length (LongRoPE, dynamic NTK)
        rotary_pos_emb = self.rotary_emb(hidden_states, position_ids, attn_metadata)
        residual = None
        for idx, decoder_layer in enumerate(self.layers):
            hidden_states, residual = decoder_layer(hidden_states, rotary_pos_emb, past_key_values[idx], residual,
                                                    attn_metadata)
        hidden_states, _ = self.norm(hidden_states, residual)
        return hidden_states

    def embed(self, input_ids, inputs_embeds=None):
        return self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds

    def get_input_embeddings(self):
        return self.embed_tokens


class LlamaForCausalLM(nn.Module):
    """The model contract: forward → hidden states; get_logits → logits of the rows the engine samples.

    `model_type` is the class of `self.model` (a `LlamaModel` or a family's subclass of it).
    """

    support_cuda_graph = True
    packed_modules_mapping = {
        'qkv_proj': ['q_proj', 'k_proj', 'v_proj'],
        'gate_up_proj': ['gate_proj', 'up_proj'],
    }
    # (param name, checkpoint name, shard id); a checkpoint that already stores qkv_proj / gate_up_proj fused
    # (Phi-3) matches no entry and loads whole: the stacked parameters' loaders cut it by their own sizes
    stacked_params_mapping = [
        ('.qkv_proj', '.q_proj', 'q'),
        ('.qkv_proj', '.k_proj', 'k'),
        ('.qkv_proj', '.v_proj', 'v'),
        ('.gate_up_proj', '.gate_proj', 0),
        ('.gate_up_proj', '.up_proj', 1),
    ]

    def __init__(self, config, ctx_mgr: StepContextManager, dtype: torch.dtype = None,
                 device: torch.device = None, model_type=LlamaModel):
        super().__init__()
        self.config = config
        self.ctx_mgr = ctx_mgr
        self.model = model_type(config, dtype=dtype, device=device)
        self.tie_word_embeddings = bool(getattr(config, 'tie_word_embeddings', False))
        # vocabulary-parallel like the embedding, so a tied lm_head shares its rows
        self.lm_head = build_lm_head(config.hidden_size, config.vocab_size, bias=False, dtype=dtype, device=device)
        # checkpoint tensors that are expected to match nothing (the coverage check stays quiet about them)
        self.ignored_checkpoint_keys = [r'rotary_emb\.inv_freq', r'rotary_emb\.(cos|sin)_cached']
        if self.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
            self.ignored_checkpoint_keys.append(r'^lm_head\.weight$')

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, past_key_values: list[list[torch.Tensor]],
                attn_metadata: Any = None, inputs_embeds: torch.Tensor = None, **kwargs):
        return self.model(input_ids=input_ids, position_ids=position_ids, past_key_values=past_key_values,
                          attn_metadata=attn_metadata, inputs_embeds=inputs_embeds)

    def get_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden_states)

    def get_input_embeddings(self):
        return self.model.get_input_embeddings()

    def prepare_inputs_for_generation(self, past_key_values: list[list[torch.Tensor]],
                                      inputs_embeds: torch.Tensor | None = None, context: StepContext = None):
        return dict(input_ids=context.input_ids, position_ids=context.position_ids,
                    past_key_values=past_key_values, attn_metadata=context.attn_metadata,
                    inputs_embeds=inputs_embeds)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]):
        params_dict = dict(self.named_parameters())
        for name, loaded_weight in weights:
            if self.tie_word_embeddings and name == 'lm_head.weight':
                continue
            for param_name, weight_name, shard_id in self.stacked_params_mapping:
                if weight_name not in name:
                    continue
                name = name.replace(weight_name, param_name)
                if name in params_dict:
                    load_weight(params_dict[name], loaded_weight, shard_id=shard_id)
                break
            else:
                if name in params_dict:
                    load_weight(params_dict[name], loaded_weight)
