"""Random-weight Llama checkpoints of any size, initialised on the device: seconds for a 1B-shaped model on a GPU.

`lmdp.tiny.make_tiny` initialises on the CPU, which is right for tiny models and slow for big ones. This builds
the same config (`lmdp.tiny.tiny_config`) and applies the same order-one init rules (see
`lmdp.tiny.reinit_weights`: Linear ~ N(0, 1/fan_in), x RESIDUAL_OUT_GAIN on o_proj/down_proj, embeddings ~ N(0, 1),
norm gains 1 + N(0, NORM_NOISE)) with a generator on `device`. No tokenizer is written: parity prompts are token
ids.
"""
from pathlib import Path

import torch
from torch import nn

from lmdp.tiny import NORM_NOISE, RESIDUAL_OUT_GAIN, tiny_config

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

_DTYPES = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}


@torch.no_grad()
def build_random_llama(out_dir, device='cpu', dtype: str = 'bfloat16', seed: int = 0, **config_overrides) -> Path:
    """Write a random-weight llama checkpoint (config.json + safetensors) into `out_dir`; returns the Path."""
    from transformers import AutoModelForCausalLM

    cfg = tiny_config('llama', **config_overrides)
    if cfg.tie_word_embeddings:
        raise ValueError('build_random_llama writes untied models; use lmdp.tiny.make_tiny for tied ones')
    try:
        with torch.device('meta'):   # no allocation, no transformers init: every tensor is written below
            model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
        model = model.to_empty(device=device)
    except Exception:  # noqa: BLE001 - a transformers that refuses meta init: slower, same result
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).to(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            gain = RESIDUAL_OUT_GAIN if name.rsplit('.', 1)[-1] in ('o_proj', 'down_proj') else 1.0
            module.weight.normal_(0.0, gain * module.in_features**-0.5, generator=gen)
            if module.bias is not None:
                module.bias.normal_(0.0, 0.1, generator=gen)
        elif isinstance(module, nn.Embedding):
            module.weight.normal_(0.0, 1.0, generator=gen)
    for name, param in model.named_parameters():
        if param.ndim == 1 and 'norm' in name:
            param.normal_(1.0, NORM_NOISE, generator=gen)
    model.to(_DTYPES[dtype])
    model.config.dtype = dtype
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    from lmdp.quiet import quiet_transformers
    with quiet_transformers():
        model.save_pretrained(out)
    return out
