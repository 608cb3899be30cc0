"""Gemma 3 (text) on lmdp's paged engine: Gemma 2's sandwich layers with per-head q/k norms, and local
(sliding-window) layers whose rotary base differs from the global layers' (10k beside 1M, the global one linearly
scaled on the 4B+ sizes). `config.layer_types` says which layer is which; each layer takes its own cos/sin."""
import torch

from ..nn import RMSNorm
from ..nn.rotary_embedding import LayerTypeRotaryEmbedding
from .gemma import GemmaAttention, GemmaDecoderLayer, GemmaForCausalLM, GemmaModel


class Gemma3Attention(GemmaAttention):
    """qkv_proj → q_norm / k_norm per head ((1 + w), folded at load) → rotary → paged attention → o_proj."""

    def __init__(self, config, layer_idx: int, dtype=None, device=None):
        super().__init__(config, layer_idx, dtype=dtype, device=device)
        self.q_norm = RMSNorm(config.head_dim, config.rms_norm_eps, dtype=dtype, device=device)
        self.k_norm = RMSNorm(config.head_dim, config.rms_norm_eps, dtype=dtype, device=device)

    def forward(self, hidden_states, rotary_pos_emb, past_key_value, attn_metadata=None):
        q, k, v = self.qkv_proj.split_qkv(self.qkv_proj(hidden_states).flatten(0, -2))
        q, k = self.q_norm(q), self.k_norm(k)
        out = self.attn_fwd(q, k, v, past_key_value[0], past_key_value[1], attn_metadata,
                            rotary_pos_emb=rotary_pos_emb)
        return self.o_proj(out.reshape(*hidden_states.shape[:-1], -1))


class Gemma3DecoderLayer(GemmaDecoderLayer):
    """Gemma 2's sandwich layer with Gemma 3's attention, rotated by the tables of its own layer type."""

    def __init__(self, config, layer_idx: int, dtype=None, device=None):
        super().__init__(config, layer_idx, dtype=dtype, device=device)
        self.layer_type = config.layer_types[layer_idx]

    def build_attention(self, config, layer_idx, dtype=None, device=None):
        return Gemma3Attention(config, layer_idx, dtype=dtype, device=device)

    def forward(self, hidden_states, rotary_pos_emb, past_key_value, residual=None, attn_metadata=None):
        return super().forward(hidden_states, rotary_pos_emb[self.layer_type], past_key_value, residual,
                               attn_metadata)


class Gemma3Model(GemmaModel):

    def __init__(self, config, dtype=None, device=None, layer_type=Gemma3DecoderLayer):
        super().__init__(config, dtype=dtype, device=device, layer_type=layer_type)

    def build_rotary_embedding(self, config, device=None):
        return LayerTypeRotaryEmbedding(config, device=device)   # {layer type: (cos, sin)}


class Gemma3ForCausalLM(GemmaForCausalLM):

    def __init__(self, config, ctx_mgr, dtype: torch.dtype = None, device: torch.device = None,
                 model_type=Gemma3Model):
        super().__init__(config, ctx_mgr, dtype=dtype, device=device, model_type=model_type)
