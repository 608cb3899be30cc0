"""Tiny random-weight checkpoints written by `transformers` itself.

`make_tiny('llama', tmp_path)` gives a directory that loads with
`AutoModelForCausalLM.from_pretrained` / `AutoTokenizer.from_pretrained`,
offline, in well under a second. Each family keeps its structural quirks
(GQA/MQA, head_dim != hidden/heads, sliding windows, softcapping, tying), and
weights are re-initialised so activations stay of order one through every
layer: HF's std-0.02 init at hidden 64 makes everything fade to ~0, which
would let many porting bugs (wrong norm, wrong scale) pass parity unnoticed.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from lmdp import tiny_tokenizer
from lmdp.quiet import quiet_transformers

# Shared small dims; GQA 4 query heads : 2 kv heads by default.
_BASE = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
    rms_norm_eps=1e-6,
)

# Per-family quirks on top of _BASE. Sliding windows are small (32) so that
# ordinary test prompts actually cross them; softcaps are lower than the real
# ones (gemma2: 50 / 30) so that they bite at tiny-model logit scales.
TINY_FAMILIES: dict[str, dict] = {
    'llama': dict(tie_word_embeddings=False),  # head_dim = 64/4 = 16
    'mistral': dict(tie_word_embeddings=False, sliding_window=32),
    # gemma-2b style MQA; head_dim 32 != 64/4; embeddings scaled by sqrt(hidden);
    # norms are (1 + w); tied lm_head.
    'gemma': dict(num_key_value_heads=1, head_dim=32, tie_word_embeddings=True),
    # Alternating sliding/full layers (layer 0 sliding); query scale uses
    # query_pre_attn_scalar (16, not head_dim 32, like gemma2-27b); softcaps.
    'gemma2': dict(
        head_dim=32,
        query_pre_attn_scalar=16,
        sliding_window=32,
        attn_logit_softcapping=10.0,
        final_logit_softcapping=5.0,
        tie_word_embeddings=True,
    ),
    # qkv bias; sliding window on layers >= max_window_layers (HF's semantics).
    'qwen2': dict(tie_word_embeddings=False, use_sliding_window=True, sliding_window=32, max_window_layers=1),
    # q_norm/k_norm per head; head_dim 32 != 64/4; tied embeddings (as the 0.6B-4B sizes).
    'qwen3': dict(head_dim=32, tie_word_embeddings=True),
    # q/k/v and gate/up stored fused (qkv_proj, gate_up_proj); partial rotary (3/4 of head_dim 16, as Phi-4-mini);
    # LongRoPE switching to its long factors past 48 tokens, so the default parity prompts (5, 17, 64) straddle
    # it in one packed prefill; a 32-token window on every layer.
    'phi3': dict(tie_word_embeddings=False, sliding_window=32, original_max_position_embeddings=48,
                 rope_parameters=dict(rope_type='longrope', rope_theta=10000.0, partial_rotary_factor=0.75,
                                      short_factor=[1.0, 1.1, 1.3, 1.6, 2.0, 2.5],
                                      long_factor=[1.0, 1.9, 3.7, 6.4, 10.0, 15.0])),
    # q_norm/k_norm; sandwich norms; sliding layers with rope base 1e4 beside a global layer with base 1e6 and
    # linear scaling 8 (as Gemma 3 4B+); query scale from query_pre_attn_scalar; tied embeddings.
    'gemma3_text': dict(
        head_dim=32,
        query_pre_attn_scalar=16,
        sliding_window=32,
        sliding_window_pattern=2,   # every 2nd layer global: sliding, full, sliding, ... for any layer count
        rope_parameters={'sliding_attention': dict(rope_type='default', rope_theta=10000.0),
                         'full_attention': dict(rope_type='linear', factor=8.0, rope_theta=1000000.0)},
        tie_word_embeddings=True,
    ),
}

# Mixtures of experts: few experts of a small intermediate size, so that routing is visible at tiny scale.
TINY_FAMILIES.update({
    # 4 experts, top-2, always renormalised; checkpoint names block_sparse_moe.experts.N.w1/w2/w3; sliding window
    'mixtral': dict(tie_word_embeddings=False, num_local_experts=4, num_experts_per_tok=2, intermediate_size=48,
                    sliding_window=32),
    # qkv bias; 8 experts, top-4, NOT renormalised (norm_topk_prob False, as Qwen1.5-MoE); a shared expert of its
    # own width behind a sigmoid gate; layer 2 a dense MLP (mlp_only_layers) of a third width
    'qwen2_moe': dict(tie_word_embeddings=False, num_experts=8, num_experts_per_tok=4, moe_intermediate_size=32,
                      shared_expert_intermediate_size=80, intermediate_size=96, norm_topk_prob=False,
                      mlp_only_layers=[2]),
    # q_norm/k_norm per head, head_dim 32 != 64/4; 16 experts, top-4, renormalised (norm_topk_prob)
    'qwen3_moe': dict(head_dim=32, tie_word_embeddings=False, num_experts=16, num_experts_per_tok=4,
                      moe_intermediate_size=32, norm_topk_prob=True),
})

# Families lmdp has no port for: they run on the transformers fallback (lmdp.fallback). Kept apart from
# TINY_FAMILIES, whose members are the ported families the port tests sweep. Each keeps its quirks: partial
# rotary, parallel residuals, LayerNorm with biases, qk norms, multipliers and logit scales, mixtures of experts.
FALLBACK_FAMILIES: dict[str, dict] = {
    'olmo2': dict(tie_word_embeddings=False),
    'granite': dict(tie_word_embeddings=False, embedding_multiplier=2.0, attention_multiplier=0.1,
                    residual_multiplier=0.7, logits_scaling=2.0),
    'stablelm': dict(tie_word_embeddings=False, use_qkv_bias=True, qk_layernorm=True),
    'cohere': dict(logit_scale=0.5),   # tied, LayerNorm without bias, parallel attention + MLP
    'gpt_neox': dict(tie_word_embeddings=False),
    'phi': dict(tie_word_embeddings=False),
    'starcoder2': dict(sliding_window=32),   # tied
    'olmoe': dict(tie_word_embeddings=False, num_experts=4, num_experts_per_tok=2),
    'granitemoe': dict(tie_word_embeddings=False, num_local_experts=4, num_experts_per_tok=2,
                       embedding_multiplier=2.0, logits_scaling=2.0),
}

# Accepted in overrides although absent from config.to_dict(): transformers 5
# folds these legacy names into `rope_parameters`.
_LEGACY_KEYS = {'rope_theta', 'rope_scaling'}
# Read by the modeling code with getattr although some config classes (qwen3_moe) don't declare them.
_UNDECLARED_KEYS = {'head_dim'}

_DTYPES = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}

NORM_NOISE = 0.1  # std added to norm weights so a port that ignores them fails parity
BIAS_STD = 0.1
# Attention averaging and the MLP's gating shrink a branch's variance well
# below one; a gain on the projections that write back into the residual
# stream keeps each layer's contribution order one, so outputs depend on
# context and not mostly on the current token's embedding.
RESIDUAL_OUT_GAIN = 2.0
_RESIDUAL_OUT = {'o_proj', 'down_proj', 'dense', 'dense_4h_to_h', 'fc2', 'c_proj'}
_FINAL_NORMS = ('norm', 'final_layer_norm', 'final_layernorm', 'ln_f')


def tiny_config(model_type: str, **config_overrides):
    """The `transformers` config `make_tiny` would use (no files written)."""
    from transformers import AutoConfig

    families = {**FALLBACK_FAMILIES, **TINY_FAMILIES}
    if model_type not in families:
        raise ValueError(
            f'make_tiny: unsupported model_type {model_type!r}; supported: {", ".join(sorted(families))}'
        )
    # Catch typos: config classes silently store unknown kwargs as attributes.
    default = AutoConfig.for_model(model_type)
    # aliases (qwen3_moe's num_experts -> num_local_experts) are fields too
    known = set(default.to_dict()) | set(getattr(default, 'attribute_map', {})) | _LEGACY_KEYS | _UNDECLARED_KEYS
    unknown = sorted(set(config_overrides) - known)
    if unknown:
        raise ValueError(f'make_tiny: {model_type} config has no field(s) {unknown}')
    ids = tiny_tokenizer.SPECIAL_IDS
    kwargs = dict(
        _BASE,
        **families[model_type],
        vocab_size=tiny_tokenizer.VOCAB_SIZE,
        bos_token_id=ids[tiny_tokenizer.BOS],
        eos_token_id=ids[tiny_tokenizer.EOS],
        pad_token_id=ids[tiny_tokenizer.PAD],
    )
    kwargs.update(config_overrides)
    # All kwargs at once so derived fields (layer_types, head_dim, rope) are
    # computed from the final values.
    return AutoConfig.for_model(model_type, **kwargs)


@torch.no_grad()
def reinit_weights(model: nn.Module, seed: int = 0) -> None:
    """Seeded order-one init, in place.

    Linear ~ N(0, 1/fan_in) (x RESIDUAL_OUT_GAIN for o_proj/down_proj; other
    matrices, such as routers and stacked experts, alike),
    embeddings ~ N(0, 1) as seen by layer 0, norm weights = identity +
    N(0, NORM_NOISE), biases ~ N(0, BIAS_STD). With tied embeddings the final
    norm's gain is N(0, 1) instead (see below).
    The generator lives on the model's device (a 1B-shaped model inits in seconds on a GPU; the numbers then
    differ from a CPU init of the same seed).
    """
    device = next(model.parameters()).device
    g = torch.Generator(device=device).manual_seed(seed)
    done: set[int] = set()

    def fill(p: torch.Tensor, std: float, mean: torch.Tensor | float = 0.0) -> None:
        if id(p) in done:  # tied weights keep their first (embedding) init
            return
        p.copy_(mean + std * torch.randn(p.shape, generator=g, dtype=torch.float32, device=device))
        done.add(id(p))

    # Embedding first so a tied lm_head inherits it. Gemma multiplies the
    # lookup by sqrt(hidden) (exposed as scalar_embed_scale), so undo it here.
    emb = model.get_input_embeddings()
    fill(emb.weight, 1.0 / float(getattr(emb, 'scalar_embed_scale', 1.0)))

    # Tied: the residual stream still carries the current token's embedding
    # e_t, and the readout h . E_t then favours t itself; random weights make
    # greedy decoding repeat one token forever, so decode-time KV would all be
    # the same token and cache/paging bugs could hide. A zero-mean random gain
    # on the final norm decorrelates the readout from the input embedding.
    # HF's init left norms at their identity value (1 for w*x, 0 for gemma's
    # (1+w)*x), so `identity - 1 + N(0,1)` is a N(0,1) gain in both styles.
    if getattr(model.config, 'tie_word_embeddings', False):
        norm = next(getattr(model.base_model, n) for n in _FINAL_NORMS if hasattr(model.base_model, n))
        fill(norm.weight, 1.0, mean=norm.weight.detach().float() - 1.0)

    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            gain = RESIDUAL_OUT_GAIN if name.rsplit('.', 1)[-1] in _RESIDUAL_OUT else 1.0
            fill(module.weight, gain * module.in_features**-0.5)
            if module.bias is not None:
                fill(module.bias, BIAS_STD)
    for name, p in model.named_parameters():
        if id(p) in done:
            continue
        if p.ndim == 1 and 'norm' in name:  # RMSNorm: identity value + noise
            fill(p, NORM_NOISE, mean=p.detach().float().clone())
        elif p.ndim == 3 and name.endswith(('experts.gate_up_proj', 'experts.down_proj')):
            # transformers 5 stacks experts [E, out, in]; each expert is a linear layer of fan-in p.shape[-1]
            gain = RESIDUAL_OUT_GAIN if name.endswith('down_proj') else 1.0
            fill(p, gain * p.shape[-1] ** -0.5)
        elif p.ndim == 2 and name.endswith('gate.weight'):
            # a router kept as a bare parameter (transformers 5): logits of order one, so routing is decisive
            fill(p, p.shape[-1] ** -0.5)

        elif p.ndim >= 2:  # a weight outside nn.Linear (a router, stacked experts [E, out, in]): as a Linear
            gain = RESIDUAL_OUT_GAIN if name.rsplit('.', 1)[-1] in _RESIDUAL_OUT else 1.0
            fill(p, gain * p.shape[-1]**-0.5)
        else:
            raise RuntimeError(f'reinit_weights: no init rule for parameter {name} {tuple(p.shape)}')


def make_tiny(
    model_type: str,
    out_dir,
    *,
    seed: int = 0,
    dtype: str = 'float32',
    max_shard_size=None,
    quantize: str | None = None,
    **config_overrides,
) -> Path:
    """Write a tiny random-weight `model_type` checkpoint into `out_dir`.

    Writes config.json, generation_config.json, safetensors (sharded with an
    index when `max_shard_size`, e.g. "200KB", is smaller than the model),
    tokenizer.json and tokenizer_config.json (with a chat template).
    `config_overrides` replace any config field (e.g. num_hidden_layers=2,
    rope_theta=5e5, rope_parameters={...}, tie_word_embeddings=True).
    Same seed -> identical bytes. Returns the directory as a Path.
    `quantize` ('fp8-block' | 'awq'): the checkpoint is written unquantised into `out_dir/unquantized` and
    quantised from there into `out_dir` (`lmdp.quantize`; AWQ with the largest group that fits the tiny shapes).
    """
    from transformers import AutoModelForCausalLM, GenerationConfig

    if dtype not in _DTYPES:
        raise ValueError(f'make_tiny: unsupported dtype {dtype!r}; supported: {", ".join(_DTYPES)}')
    if quantize is not None:
        return _make_tiny_quantized(model_type, out_dir, quantize, seed=seed, dtype=dtype,
                                    max_shard_size=max_shard_size, **config_overrides)
    cfg = tiny_config(model_type, **config_overrides)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    # Build and init in float32 so a bf16/fp16 checkpoint is exactly the
    # rounded fp32 one for the same seed.
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    reinit_weights(model, seed)
    model.to(_DTYPES[dtype])
    model.config.dtype = dtype
    model.generation_config = GenerationConfig(
        bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id
    )
    save_kwargs = {} if max_shard_size is None else {'max_shard_size': max_shard_size}
    with quiet_transformers():  # a "Writing model shards" bar per test is noise
        model.save_pretrained(out, **save_kwargs)
    tiny_tokenizer.save_tokenizer(out)
    return out


def _make_tiny_quantized(model_type: str, out_dir, method: str, **kwargs) -> Path:
    import json

    from lmdp.quantize import METHODS, RECORD, quantize_checkpoint
    if method not in METHODS:
        raise ValueError(f'make_tiny: quantize must be one of {", ".join(METHODS)}, got {method!r}')
    out = Path(out_dir)
    source = make_tiny(model_type, out / 'unquantized', **kwargs)
    record = quantize_checkpoint(str(source), str(out), method, group_size=None, device='cpu')
    record['source'] = 'unquantized'      # relative: the folder may move
    (out / RECORD).write_text(json.dumps(record, indent=1))
    return out
