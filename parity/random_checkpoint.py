"""Random-weight checkpoints of real shapes, initialised on the device: seconds for a 1B-shaped model on a GPU.

`lmdp.tiny.make_tiny` writes tiny models on the CPU. This builds the same family config (`lmdp.tiny.tiny_config`)
at a real model's layer shape and applies the same order-one init rules (`lmdp.tiny.reinit_weights`) with a
generator on `device`. No tokenizer is written: parity prompts are token ids.
"""
from pathlib import Path

import torch

from lmdp.tiny import reinit_weights, tiny_config

# Llama-3.2-1B's shape (untied here, so lm_head is a separate 128256 x 2048 matrix).
LLAMA_1B_SHAPE = dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                      intermediate_size=8192, vocab_size=128256, tie_word_embeddings=False,
                      max_position_embeddings=131072,
                      rope_parameters={'rope_type': 'llama3', 'rope_theta': 500000.0, 'factor': 32.0,
                                       'low_freq_factor': 1.0, 'high_freq_factor': 4.0,
                                       'original_max_position_embeddings': 8192})
# Realistic head_dim (64) and GQA at a size that runs anywhere in seconds.
SMALL_SHAPE = dict(hidden_size=512, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
                   intermediate_size=1024, tie_word_embeddings=False)

# One real layer shape per family, for parity at real sizes ('1b' in scripts/parity_sensitivity.py,
# scripts/parity_real_shapes.py). Layer counts other than Llama's are cut (to 4; 2 for the mixtures of experts,
# whose layers are 0.6-2.8 GB each): the layer shape is what kernels and rounding see. What the shapes leave
# alone keeps the tiny preset's quirks (e.g. its 32-token windows, which the parity prompts cross).
_LONGROPE_48 = dict(rope_type='longrope', rope_theta=10000.0, partial_rotary_factor=0.75,
                    short_factor=[1.0 + 0.02 * i for i in range(48)], long_factor=[1.0 + 0.6 * i for i in range(48)])
REAL_SHAPES = {
    'llama': LLAMA_1B_SHAPE,
    'mistral': dict(LLAMA_1B_SHAPE, sliding_window=4096, rope_parameters={'rope_type': 'default',
                                                                          'rope_theta': 1e6}),
    'gemma': dict(hidden_size=2048, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=1, head_dim=256,
                  intermediate_size=16384, vocab_size=256000),                                # Gemma-2B
    'gemma2': dict(hidden_size=2304, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
                   head_dim=256, intermediate_size=9216, vocab_size=256000, query_pre_attn_scalar=256,
                   sliding_window=4096, attn_logit_softcapping=50.0, final_logit_softcapping=30.0),   # Gemma-2-2B
    'qwen2': dict(hidden_size=1536, num_hidden_layers=4, num_attention_heads=12, num_key_value_heads=2,
                  intermediate_size=8960, vocab_size=151936, tie_word_embeddings=True),       # Qwen2-1.5B
    'qwen3': dict(hidden_size=2048, num_hidden_layers=4, num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                  intermediate_size=6144, vocab_size=151936, tie_word_embeddings=True),       # Qwen3-1.7B
    # Phi-4-mini: tied, partial rotary 3/4 of 128, LongRoPE with 48 factors switching past 4096 tokens
    'phi3': dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=4, num_attention_heads=24,
                 num_key_value_heads=8, vocab_size=200064, max_position_embeddings=131072,
                 original_max_position_embeddings=4096, tie_word_embeddings=True, rope_parameters=_LONGROPE_48),
    # Gemma-3-4B: head_dim 256; five local layers, then a global one (its own rope base and scaling)
    'gemma3_text': dict(hidden_size=2560, intermediate_size=10240, num_hidden_layers=6, num_attention_heads=8,
                        num_key_value_heads=4, head_dim=256, vocab_size=262208, max_position_embeddings=131072,
                        query_pre_attn_scalar=256, layer_types=['sliding_attention'] * 5 + ['full_attention']),
    # Mixtral-8x7B: 8 experts of 14336, top-2
    'mixtral': dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=2, num_attention_heads=32,
                    num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2, vocab_size=32000),
    # Qwen1.5-MoE-A2.7B: 60 experts of 1408, top-4 not renormalised, a shared expert of 5632
    'qwen2_moe': dict(hidden_size=2048, num_hidden_layers=2, num_attention_heads=16, num_key_value_heads=16,
                      intermediate_size=5632, moe_intermediate_size=1408, shared_expert_intermediate_size=5632,
                      num_experts=60, num_experts_per_tok=4, mlp_only_layers=[], vocab_size=151936),
    # Qwen3-30B-A3B: 128 experts of 768, top-8 renormalised, 32/4 heads of 128
    'qwen3_moe': dict(hidden_size=2048, num_hidden_layers=2, num_attention_heads=32, num_key_value_heads=4,
                      head_dim=128, intermediate_size=6144, moe_intermediate_size=768, num_experts=128,
                      num_experts_per_tok=8, vocab_size=151936),
}

_DTYPES = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}


@torch.no_grad()
def build_random(model_type: str, out_dir, device='cpu', dtype: str = 'bfloat16', seed: int = 0,
                 **config_overrides) -> Path:
    """Write a random-weight checkpoint (config.json + safetensors) of `model_type` into `out_dir`."""
    from transformers import AutoModelForCausalLM

    cfg = tiny_config(model_type, **config_overrides)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    reinit_weights(model, seed)
    model.to(_DTYPES[dtype])
    model.config.dtype = dtype
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    from lmdp.quiet import quiet_transformers
    with quiet_transformers():
        model.save_pretrained(out)
    return out


def build_random_llama(out_dir, device='cpu', dtype: str = 'bfloat16', seed: int = 0, **config_overrides) -> Path:
    """`build_random('llama', ...)`, untied."""
    if config_overrides.get('tie_word_embeddings'):
        raise ValueError('build_random_llama writes untied models; use build_random for tied ones')
    return build_random('llama', out_dir, device, dtype, seed, **dict(config_overrides, tie_word_embeddings=False))
