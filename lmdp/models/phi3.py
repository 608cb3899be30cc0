"""Phi-3 (and Phi-3.5 / Phi-4-mini) on lmdp's paged engine: Llama's port as it is.

What differs is in the checkpoint and the config, and lmdp.nn takes it: `qkv_proj` and `gate_up_proj` are stored
already fused (the stacked parameters' loaders cut them by their own sizes), rotary may cover part of each head
(`partial_rotary_factor`), LongRoPE picks its short or long factors per sequence, and every layer may slide a
window.
"""
from .llama import LlamaForCausalLM


class Phi3ForCausalLM(LlamaForCausalLM):
    """Phi-3's checkpoint names are Llama's with q/k/v and gate/up already stacked."""
