"""Copies of the lmdp Llama and Qwen3 ports with one porting bug planted in each: the harness must name where each goes
wrong.

Each bug is a subclass of a port class (Llama, or Qwen3 for mistakes inside attention), handed to lmdp as a custom
module map entry, and states the phase and the first tap where a correct harness sees it diverge. The harness's
tests (tests/parity) and its GPU self-test (`python -m parity.selftest`) run every one of them.
"""
import copy
import types
from dataclasses import dataclass

import torch
from torch import nn

from lmdp.models.llama import LlamaDecoderLayer, LlamaForCausalLM
from lmdp.models.qwen3 import Qwen3ForCausalLM
from lmdp.nn import RMSNorm, build_rotary_embedding_from_config
from lmdp.nn.rotary_embedding import as_rows

WRONG_EPS = 0.1   # large enough to move the norm of order-one activations by ~5%: visible above bf16 rounding


class WrongNormEps(LlamaForCausalLM):
    """Every RMSNorm uses eps 0.1 instead of config.rms_norm_eps (e.g. a hard-coded default)."""

    def __init__(self, config, ctx_mgr, dtype=None, device=None):
        super().__init__(config, ctx_mgr, dtype=dtype, device=device)
        for module in self.modules():
            if isinstance(module, RMSNorm):
                module.eps = WRONG_EPS


class _RotaryKHalvesSwapped(nn.Module):
    """Rotary as HF does it for q; for k the two halves of rotate_half are swapped: cat(x2, -x1), not cat(-x2, x1)."""

    @staticmethod
    def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, swapped: bool):
        rot = cos.size(-1)
        half = rot // 2
        xf = x[..., :rot].float()
        x1, x2 = xf[..., :half], xf[..., half:]
        rotated = torch.cat((x2, -x1), -1) if swapped else torch.cat((-x2, x1), -1)
        x[..., :rot] = (xf * cos.float()[:, None] + rotated * sin.float()[:, None]).to(x.dtype)
        return x

    def forward(self, query, key, cos, sin, inplace=True):
        if not inplace:
            query, key = query.clone(), key.clone()
        return self._rotate(query, cos, sin, False), self._rotate(key, cos, sin, True)


class RotaryHalvesSwappedInK(LlamaForCausalLM):
    """Keys are rotated by -theta (rotate_half's halves swapped), queries correctly."""

    def __init__(self, config, ctx_mgr, dtype=None, device=None):
        super().__init__(config, ctx_mgr, dtype=dtype, device=device)
        for layer in self.model.layers:
            layer.self_attn.attn_fwd.rotary = _RotaryKHalvesSwapped()   # the attention block's rotary step


class _LayerDroppingMLP(LlamaDecoderLayer):

    def forward(self, *args, **kwargs):
        mlp_out, residual = super().forward(*args, **kwargs)
        return torch.zeros_like(mlp_out), residual   # the MLP ran, but its output never joins the stream


class MLPDroppedInLayer1(LlamaForCausalLM):
    """Decoder layer 1 computes its MLP and then leaves it out of the residual stream."""

    def __init__(self, config, ctx_mgr, dtype=None, device=None):
        super().__init__(config, ctx_mgr, dtype=dtype, device=device)
        self.model.layers[1].__class__ = _LayerDroppingMLP


class KVSwappedInQKV(LlamaForCausalLM):
    """load_weights stacks k_proj into the v slot of qkv_proj and v_proj into the k slot."""

    stacked_params_mapping = [
        ('.qkv_proj', '.q_proj', 'q'),
        ('.qkv_proj', '.k_proj', 'v'),
        ('.qkv_proj', '.v_proj', 'k'),
        ('.gate_up_proj', '.gate_proj', 0),
        ('.gate_up_proj', '.up_proj', 1),
    ]


class DecodePositionOffByOne(LlamaForCausalLM):
    """Decode steps pass position = history + 1 instead of history; prefill is right."""

    def prepare_inputs_for_generation(self, past_key_values, inputs_embeds=None, context=None):
        inputs = super().prepare_inputs_for_generation(past_key_values, inputs_embeds, context)
        if context.is_decoding:
            inputs['position_ids'] = inputs['position_ids'] + 1
        return inputs


# ---- a Qwen3-style port (per-head q/k norms before rotary): mistakes inside attention ------------------------

def _qwen3_attention_forward(norm_k: bool = True, norm_after_rotary: bool = False):
    """Qwen3Attention.forward with one mistake (see the classes below)."""

    def forward(self, hidden_states, rotary_pos_emb, past_key_value, attn_metadata=None):
        q, k, v = self.qkv_proj.split_qkv(self.qkv_proj(hidden_states).flatten(0, -2))
        if norm_after_rotary:
            cos, sin = (as_rows(t) for t in rotary_pos_emb)
            q, k = self.attn_fwd.rotary(q, k, cos, sin, inplace=False)
            q, k = self.q_norm(q), self.k_norm(k)
            out = self.attn_fwd(q, k, v, past_key_value[0], past_key_value[1], attn_metadata)
        else:
            q = self.q_norm(q)
            k = self.k_norm(k) if norm_k else k
            out = self.attn_fwd(q, k, v, past_key_value[0], past_key_value[1], attn_metadata,
                                rotary_pos_emb=rotary_pos_emb)
        return self.o_proj(out.reshape(*hidden_states.shape[:-1], -1))
    return forward


def _patch_attention(model, forward):
    for layer in model.model.layers:
        layer.self_attn.forward = types.MethodType(forward, layer.self_attn)


class Qwen3MissingKNorm(Qwen3ForCausalLM):
    """k_norm is built and loaded but never applied: keys go to rotary unnormed."""

    def __init__(self, config, ctx_mgr, dtype=None, device=None):
        super().__init__(config, ctx_mgr, dtype=dtype, device=device)
        _patch_attention(self, _qwen3_attention_forward(norm_k=False))


class Qwen3NormAfterRotary(Qwen3ForCausalLM):
    """q_norm and k_norm are applied after rotary instead of before it."""

    def __init__(self, config, ctx_mgr, dtype=None, device=None):
        super().__init__(config, ctx_mgr, dtype=dtype, device=device)
        _patch_attention(self, _qwen3_attention_forward(norm_after_rotary=True))


class Qwen3WrongRopeBase(Qwen3ForCausalLM):
    """The rotary tables use a base 100 times the config's rope_theta (another checkpoint's default)."""

    def __init__(self, config, ctx_mgr, dtype=None, device=None):
        super().__init__(config, ctx_mgr, dtype=dtype, device=device)
        wrong = copy.deepcopy(config)
        params = dict(getattr(wrong, 'rope_parameters', None) or {})
        theta = params.get('rope_theta', getattr(wrong, 'rope_theta', 10000.0))
        params['rope_theta'] = theta * 100
        wrong.rope_parameters = params
        if hasattr(wrong, 'rope_theta'):
            wrong.rope_theta = theta * 100
        self.model.rotary_emb = build_rotary_embedding_from_config(wrong, device=device)


class Qwen3WrongQKNormEps(Qwen3ForCausalLM):
    """q_norm and k_norm use eps 1e-5 instead of config.rms_norm_eps (1e-6); every other norm is right."""

    def __init__(self, config, ctx_mgr, dtype=None, device=None):
        super().__init__(config, ctx_mgr, dtype=dtype, device=device)
        for layer in self.model.layers:
            layer.self_attn.q_norm.eps = layer.self_attn.k_norm.eps = 1e-5


@dataclass(frozen=True)
class PlantedBug:
    name: str
    port_class: type
    phase: str           # where the harness must first see it
    tap: str
    architectures: tuple = ('LlamaForCausalLM', 'MistralForCausalLM')

    @property
    def description(self) -> str:
        return (self.port_class.__doc__ or '').strip().splitlines()[0]

    def module_map(self, architectures=None) -> dict[str, type]:
        """A custom module map that makes lmdp build this buggy copy for its family's checkpoints."""
        return {arch: self.port_class for arch in (architectures or self.architectures)}


PLANTED_BUGS: list[PlantedBug] = [
    PlantedBug('wrong_norm_eps', WrongNormEps, 'prefill', 'layers.0.input_norm'),
    PlantedBug('rotary_k_halves_swapped', RotaryHalvesSwappedInK, 'prefill', 'layers.0.k_rot'),
    PlantedBug('mlp_dropped_layer1', MLPDroppedInLayer1, 'prefill', 'layers.1.residual'),
    PlantedBug('kv_swapped_in_qkv', KVSwappedInQKV, 'prefill', 'layers.0.k'),
    PlantedBug('decode_position_off_by_one', DecodePositionOffByOne, 'decode', 'layers.0.q_rot'),
]


QWEN3_PLANTED_BUGS: list[PlantedBug] = [
    # float32 checks all four; the eps error (a 5e-6 relative change) is below bfloat16's rounding by design
    PlantedBug('qwen3_missing_k_norm', Qwen3MissingKNorm, 'prefill', 'layers.0.k_norm',
               ('Qwen3ForCausalLM', )),
    PlantedBug('qwen3_norm_after_rotary', Qwen3NormAfterRotary, 'prefill', 'layers.0.q_norm',
               ('Qwen3ForCausalLM', )),
    PlantedBug('qwen3_wrong_rope_base', Qwen3WrongRopeBase, 'prefill', 'layers.0.q_rot',
               ('Qwen3ForCausalLM', )),
    PlantedBug('qwen3_wrong_qk_norm_eps', Qwen3WrongQKNormEps, 'prefill', 'layers.0.q_norm',
               ('Qwen3ForCausalLM', )),
]


def planted_bugs_for(family: str, dtype: str = 'float32') -> list[PlantedBug]:
    """The planted bugs written for a family's port (model_type) that the harness must name in `dtype`."""
    qwen3 = [b for b in QWEN3_PLANTED_BUGS if dtype == 'float32' or 'eps' not in b.name]
    return {'llama': PLANTED_BUGS, 'mistral': PLANTED_BUGS, 'qwen3': qwen3}.get(family, [])
