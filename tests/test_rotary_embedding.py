"""Rotary embedding vs transformers: inv_freq, attention scaling, cos/sin and the apply op."""

import math
from types import SimpleNamespace

import pytest
import torch
from transformers import Gemma3TextConfig, LlamaConfig, Phi3Config
from transformers.models.gemma3.modeling_gemma3 import Gemma3RotaryEmbedding
from transformers.models.llama.modeling_llama import (
    LlamaRotaryEmbedding,
    apply_rotary_pos_emb as hf_apply_rotary_pos_emb,
)
from transformers.models.phi3.modeling_phi3 import Phi3RotaryEmbedding

from lmdp.kernels.rotary import apply_rotary_pos_emb
from lmdp.nn.rotary_embedding import (
    ApplyRotaryEmb,
    DynamicNTKRotaryEmbedding,
    LongRoPERotaryEmbedding,
    RopeType,
    RotaryEmbedding,
    build_rotary_embedding,
    build_rotary_embedding_from_config,
    build_rotary_params,
)

X32 = torch.empty(0, dtype=torch.float32)


def _llama_config(rope_parameters, max_position_embeddings=2048, head_dim=32):
    return LlamaConfig(hidden_size=4 * head_dim,
                       num_attention_heads=4,
                       num_key_value_heads=2,
                       head_dim=head_dim,
                       max_position_embeddings=max_position_embeddings,
                       rope_parameters=rope_parameters)


def _hf_cos_sin(hf_rope, position_ids, x=X32):
    cos, sin = hf_rope(x, position_ids[None])  # HF wants [batch, T]
    return cos[0], sin[0]


def _assert_matches_hf(rope, hf_rope, position_ids, check_inv_freq=True, atol=1e-6):
    """Same inv_freq (bit for bit), attention scaling and cos/sin as HF for these positions."""
    if check_inv_freq:
        assert torch.equal(rope.inv_freq, hf_rope.original_inv_freq)
        assert rope.attention_scaling == pytest.approx(hf_rope.attention_scaling, rel=1e-12)
    cos, sin = rope(X32, position_ids)
    hf_cos, hf_sin = _hf_cos_sin(hf_rope, position_ids)
    assert cos.shape == (position_ids.numel(), rope.rotary_dim) == hf_cos.shape
    torch.testing.assert_close(cos, hf_cos, atol=atol, rtol=0)
    torch.testing.assert_close(sin, hf_sin, atol=atol, rtol=0)


def _packed_positions(*seq_ranges):
    """position_ids of several packed sequences, e.g. a prefill chunk plus decodes."""
    return torch.cat([torch.arange(a, b) for a, b in seq_ranges])


# --- cos/sin vs HF for every rope type ---

STATIC_CASES = {
    'default': dict(rope_type='default', rope_theta=500000.0),
    'linear': dict(rope_type='linear', factor=4.0, rope_theta=10000.0),
    'llama3': dict(rope_type='llama3', factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=256, rope_theta=500000.0),
    'yarn': dict(rope_type='yarn', factor=4.0, original_max_position_embeddings=512, rope_theta=10000.0),
    # beta_fast/beta_slow move the ramp only when original_max_position_embeddings is large enough
    'yarn_mscale': dict(rope_type='yarn', factor=40.0, original_max_position_embeddings=2048, rope_theta=10000.0,
                        mscale=0.707, mscale_all_dim=1.0, beta_fast=16, beta_slow=2),
    'yarn_no_truncate': dict(rope_type='yarn', factor=4.0, original_max_position_embeddings=512,
                             rope_theta=150000.0, truncate=False),
    'yarn_attention_factor': dict(rope_type='yarn', factor=4.0, original_max_position_embeddings=512,
                                  rope_theta=10000.0, attention_factor=1.25),
}


@pytest.mark.parametrize('name', list(STATIC_CASES))
def test_static_rope_matches_hf(name):
    config = _llama_config(dict(STATIC_CASES[name]), max_position_embeddings=2048)
    rope = build_rotary_embedding_from_config(config)
    hf_rope = LlamaRotaryEmbedding(config)
    assert rope.rope_type == RopeType(config.rope_parameters['rope_type'])
    _assert_matches_hf(rope, hf_rope, _packed_positions((0, 37), (1000, 1003), (4095, 4096)))


def test_yarn_attention_scaling_values():
    # Guards against both sides being wrong the same way: check the formula directly.
    rope = build_rotary_embedding_from_config(_llama_config(dict(STATIC_CASES['yarn'])))
    assert rope.attention_scaling == pytest.approx(0.1 * math.log(4.0) + 1.0)
    rope = build_rotary_embedding_from_config(_llama_config(dict(STATIC_CASES['yarn_mscale'])))
    expected = (0.1 * 0.707 * math.log(40.0) + 1.0) / (0.1 * math.log(40.0) + 1.0)
    assert rope.attention_scaling == pytest.approx(expected)
    rope = build_rotary_embedding_from_config(_llama_config(dict(STATIC_CASES['yarn_attention_factor'])))
    assert rope.attention_scaling == 1.25
    cos, _ = rope(X32, torch.zeros(1, dtype=torch.long))
    assert torch.allclose(cos, torch.full_like(cos, 1.25))


def test_llama3_changes_low_frequencies_only():
    config = _llama_config(dict(STATIC_CASES['llama3']), head_dim=64)
    base = build_rotary_embedding(64, base=500000.0).inv_freq
    inv_freq = build_rotary_embedding_from_config(config).inv_freq
    assert torch.equal(inv_freq[:4], base[:4])  # high frequencies untouched
    torch.testing.assert_close(inv_freq[-1], base[-1] / 8.0)  # lowest ones divided by factor


def test_partial_rotary_default_matches_phi3():
    # LlamaRotaryEmbedding ignores partial_rotary_factor; Phi3's honours it.
    config = Phi3Config(hidden_size=128, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                        partial_rotary_factor=0.5, rope_parameters=dict(rope_type='default', rope_theta=10000.0))
    rope = build_rotary_embedding_from_config(config)
    assert rope.rotary_dim == 16
    _assert_matches_hf(rope, Phi3RotaryEmbedding(config), _packed_positions((0, 20), (300, 301)))


# lmdp rounds dynamic NTK's grown base from float64 (so that it cannot depend on a token's place in the step),
# transformers computes it in float32: the two are at most an ulp apart, a few 1e-6 in cos/sin at these positions
DYNAMIC_ATOL = 1e-5


def test_dynamic_ntk_matches_hf_per_step():
    config = _llama_config(dict(rope_type='dynamic', factor=2.0, rope_theta=10000.0), max_position_embeddings=512)
    rope = build_rotary_embedding_from_config(config)
    assert isinstance(rope, DynamicNTKRotaryEmbedding)
    # One HF module across growing steps: it recomputes whenever the largest position grows.
    hf_rope = LlamaRotaryEmbedding(config)
    for step in [_packed_positions((0, 100)), _packed_positions((0, 100), (500, 512)),
                 _packed_positions((700, 701), (3, 9)), _packed_positions((1499, 1500))]:
        _assert_matches_hf(rope, hf_rope, step, check_inv_freq=False, atol=DYNAMIC_ATOL)
    # Back within max_position_embeddings both use the original frequencies again.
    _assert_matches_hf(rope, hf_rope, _packed_positions((200, 300)), check_inv_freq=False)


def test_dynamic_ntk_without_metadata_takes_the_step_as_one_sequence():
    """Called as transformers calls it (no attn_metadata), the positions are one sequence: its largest position
    sets everyone's frequencies. (With the step's metadata each sequence gets its own: tests/nn.)"""
    config = _llama_config(dict(rope_type='dynamic', factor=1.3, rope_theta=10000.0), max_position_embeddings=512)
    rope = build_rotary_embedding_from_config(config)
    short, long = _packed_positions((0, 64)), _packed_positions((0, 64), (2999, 3000))
    cos_short, _ = rope(X32, short)
    cos_long, _ = rope(X32, long)
    assert not torch.allclose(cos_short[1:], cos_long[1:64])
    # Stateless: a fresh HF module gives the same tables for any step, in any order.
    _assert_matches_hf(rope, LlamaRotaryEmbedding(config), _packed_positions((1000, 1010)), check_inv_freq=False,
                       atol=DYNAMIC_ATOL)
    # Within max_position_embeddings the original inv_freq is used bit for bit (the NTK
    # formula at seq_len == max_position_embeddings is off by rounding for factor 1.3).
    _assert_matches_hf(rope, LlamaRotaryEmbedding(config), _packed_positions((0, 512)))
    torch.testing.assert_close(rope(X32, short)[0], cos_short, atol=0, rtol=0)


def _phi3_longrope_config(partial_rotary_factor=1.0, **extra):
    rot_half = int(32 * partial_rotary_factor) // 2
    gen = torch.Generator().manual_seed(0)
    rope_parameters = dict(rope_type='longrope', rope_theta=10000.0,
                           short_factor=(1 + torch.rand(rot_half, generator=gen)).tolist(),
                           long_factor=(2 + 8 * torch.rand(rot_half, generator=gen)).tolist(), **extra)
    return Phi3Config(hidden_size=128, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                      original_max_position_embeddings=256, partial_rotary_factor=partial_rotary_factor,
                      rope_parameters=rope_parameters)


@pytest.mark.parametrize('partial_rotary_factor', [1.0, 0.5])
def test_longrope_matches_hf(partial_rotary_factor):
    config = _phi3_longrope_config(partial_rotary_factor)
    rope = build_rotary_embedding_from_config(config)
    assert isinstance(rope, LongRoPERotaryEmbedding)
    assert rope.rotary_dim == int(32 * partial_rotary_factor)
    # factor defaults to max_position_embeddings / original_max_position_embeddings = 4
    assert rope.attention_scaling == pytest.approx(math.sqrt(1 + math.log(4) / math.log(256)))
    hf_rope = Phi3RotaryEmbedding(config)
    # largest position 255 -> seq_len 256 == original: short; 256 -> long (HF uses '>').
    for step in [_packed_positions((0, 256)), _packed_positions((10, 20), (256, 257)),
                 _packed_positions((900, 1000)), _packed_positions((3, 7))]:
        _assert_matches_hf(rope, hf_rope, step)
    short_cos, _ = rope(X32, _packed_positions((0, 256)))
    long_cos, _ = rope(X32, _packed_positions((0, 257)))
    assert not torch.allclose(short_cos[2:256], long_cos[2:256])


def test_longrope_explicit_attention_factor():
    rope = build_rotary_embedding_from_config(_phi3_longrope_config(attention_factor=1.5))
    assert rope.attention_scaling == 1.5


# --- config reading ---


def test_transformers_4x_style_config():
    # 4.x keeps rope_theta / partial_rotary_factor on the config and the rest in rope_scaling.
    v4 = SimpleNamespace(hidden_size=128, num_attention_heads=4, head_dim=None, max_position_embeddings=2048,
                         rope_theta=20000.0, partial_rotary_factor=0.5,
                         rope_scaling=dict(type='yarn', factor=4.0, original_max_position_embeddings=512))
    v5 = _llama_config(dict(rope_type='yarn', factor=4.0, original_max_position_embeddings=512,
                            rope_theta=20000.0, partial_rotary_factor=0.5))
    params = build_rotary_params(v4)
    assert params['dim'] == 32 and params['base'] == 20000.0 and params['partial_rotary_factor'] == 0.5
    rope_v4, rope_v5 = build_rotary_embedding_from_config(v4), build_rotary_embedding_from_config(v5)
    assert rope_v4.rotary_dim == 16
    assert torch.equal(rope_v4.inv_freq, rope_v5.inv_freq)
    assert rope_v4.attention_scaling == rope_v5.attention_scaling

    plain = SimpleNamespace(hidden_size=64, num_attention_heads=2, max_position_embeddings=128, rope_theta=1e6,
                            rope_scaling=None)
    rope = build_rotary_embedding_from_config(plain)
    assert rope.rope_type == RopeType.Default and rope.rotary_dim == 32
    assert torch.equal(rope.inv_freq, 1.0 / (1e6**(torch.arange(0, 32, 2).float() / 32)))


def test_legacy_su_alias_is_longrope():
    config = SimpleNamespace(hidden_size=128, num_attention_heads=4, max_position_embeddings=1024,
                             original_max_position_embeddings=256, rope_theta=10000.0,
                             rope_scaling=dict(type='su', short_factor=[1.0] * 16, long_factor=[4.0] * 16))
    rope = build_rotary_embedding_from_config(config)
    assert isinstance(rope, LongRoPERotaryEmbedding)
    assert torch.equal(rope.long_inv_freq, rope.inv_freq / 4.0)


def test_per_layer_type_rope_gemma3():
    config = Gemma3TextConfig(hidden_size=64, num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                              num_hidden_layers=2, layer_types=['sliding_attention', 'full_attention'],
                              max_position_embeddings=4096,
                              rope_parameters=dict(
                                  sliding_attention=dict(rope_type='default', rope_theta=10000.0),
                                  full_attention=dict(rope_type='linear', factor=8.0, rope_theta=1e6)))
    hf_rope = Gemma3RotaryEmbedding(config)
    pos = _packed_positions((0, 9), (2000, 2002))
    for layer_type in ['sliding_attention', 'full_attention']:
        rope = build_rotary_embedding_from_config(config, layer_type=layer_type)
        assert torch.equal(rope.inv_freq, getattr(hf_rope, f'{layer_type}_inv_freq'))
        cos, sin = rope(X32, pos)
        hf_cos, hf_sin = hf_rope(X32, pos[None], layer_type)
        torch.testing.assert_close(cos, hf_cos[0], atol=1e-6, rtol=0)
        torch.testing.assert_close(sin, hf_sin[0], atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match='layer_type'):
        build_rotary_embedding_from_config(config)


def test_unknown_rope_type_error():
    config = _llama_config(dict(rope_type='default', rope_theta=10000.0))
    config.rope_parameters = dict(rope_type='proportional', rope_theta=10000.0)
    with pytest.raises(ValueError, match="'proportional'") as info:
        build_rotary_embedding_from_config(config)
    for name in ['default', 'linear', 'dynamic', 'llama3', 'yarn', 'longrope']:
        assert name in str(info.value)
    with pytest.raises(ValueError, match="'foo'.*yarn"):
        build_rotary_embedding(32, emb_type='foo')


def test_missing_factor_error():
    config = SimpleNamespace(hidden_size=64, num_attention_heads=2, max_position_embeddings=128,
                             rope_scaling=dict(rope_type='linear'))
    with pytest.raises(ValueError, match="'factor'"):
        build_rotary_embedding_from_config(config)


# --- forward properties ---


@pytest.mark.parametrize('config', [
    _llama_config(dict(STATIC_CASES['yarn'])),
    _llama_config(dict(rope_type='dynamic', factor=2.0, rope_theta=10000.0), max_position_embeddings=512),
    _phi3_longrope_config(),
], ids=['yarn', 'dynamic', 'longrope'])
def test_forward_has_no_host_sync(config):
    # Meta tensors have no data: any .item()/bool() on them raises, so this
    # passing means forward only queues device work (CUDA-graph capturable).
    rope = build_rotary_embedding_from_config(config, device='meta')
    cos, sin = rope(torch.empty(0, dtype=torch.bfloat16, device='meta'),
                    torch.empty(1, 70, dtype=torch.long, device='meta'))
    assert cos.shape == sin.shape == (1, 70, 32) and cos.dtype == torch.bfloat16


def test_forward_dtype_and_position_shapes():
    rope = build_rotary_embedding(32, base=10000.0)
    pos = _packed_positions((0, 5), (40, 42))
    cos_1d, sin_1d = rope(torch.empty(0, dtype=torch.bfloat16), pos)
    cos_2d, sin_2d = rope(torch.empty(0, dtype=torch.bfloat16), pos[None])
    assert cos_1d.dtype == torch.bfloat16 and cos_1d.shape == (7, 32)
    # [1, T] positions give [1, T, R], as lmdeploy's rotary does (its ports take cos[0])
    assert cos_2d.shape == (1, 7, 32)
    assert torch.equal(cos_1d, cos_2d[0]) and torch.equal(sin_1d, sin_2d[0])
    cos32, _ = rope(X32, pos)
    assert torch.equal(cos_1d, cos32.to(torch.bfloat16))  # computed in float32, then cast


# --- apply_rotary_pos_emb vs HF ---


def _hf_apply(q, k, cos, sin):
    """HF reference on [T, H, D]; partial rotary as HF models do it (rotate first R, pass the rest)."""
    rot = cos.size(-1)
    q_rot, k_rot = hf_apply_rotary_pos_emb(q[..., :rot], k[..., :rot], cos, sin, unsqueeze_dim=1)
    return torch.cat((q_rot, q[..., rot:]), dim=-1), torch.cat((k_rot, k[..., rot:]), dim=-1)


def _inputs(T=11, Hq=4, Hk=2, D=32, rot=32, dtype=torch.float32):
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(T, Hq, D, generator=gen).to(dtype)
    k = torch.randn(T, Hk, D, generator=gen).to(dtype)
    rope = build_rotary_embedding(rot, base=10000.0)
    cos, sin = rope(q, _packed_positions((0, T - 3), (100, 103)))
    return q, k, cos, sin


@pytest.mark.parametrize('rot', [32, 16])
def test_apply_matches_hf(rot):
    q, k, cos, sin = _inputs(rot=rot)
    q_ref, k_ref = _hf_apply(q, k, cos, sin)
    q_in, k_in = q.clone(), k.clone()
    q_out, k_out = apply_rotary_pos_emb(q, k, cos, sin)
    torch.testing.assert_close(q_out, q_ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(k_out, k_ref, atol=1e-6, rtol=0)
    assert torch.equal(q, q_in) and torch.equal(k, k_in)  # not in-place: inputs untouched
    assert not torch.allclose(q_out[3:, :, :rot], q[3:, :, :rot])  # it did rotate
    assert torch.equal(q_out[..., rot:], q[..., rot:])  # pass-through channels


@pytest.mark.parametrize('rot', [32, 16])
def test_apply_inplace_on_fused_qkv_slices(rot):
    T, Hq, Hk, D = 11, 4, 2, 32
    q0, k0, cos, sin = _inputs(T, Hq, Hk, D, rot)
    v0 = torch.randn(T, Hk, D)
    qkv = torch.cat([q0.flatten(1), k0.flatten(1), v0.flatten(1)], dim=1)
    q = qkv[:, :Hq * D].view(T, Hq, D)
    k = qkv[:, Hq * D:(Hq + Hk) * D].view(T, Hk, D)
    assert not q.is_contiguous() and not k.is_contiguous()
    q_ref, k_ref = _hf_apply(q0, k0, cos, sin)

    q_out, k_out = apply_rotary_pos_emb(q, k, cos, sin, q_out=q, k_out=k)
    assert q_out is q and k_out is k
    torch.testing.assert_close(qkv[:, :Hq * D].view(T, Hq, D), q_ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(qkv[:, Hq * D:(Hq + Hk) * D].view(T, Hk, D), k_ref, atol=1e-6, rtol=0)
    assert torch.equal(qkv[:, (Hq + Hk) * D:].view(T, Hk, D), v0)  # v untouched


def test_apply_into_separate_outputs():
    q, k, cos, sin = _inputs(rot=16)
    q_out, k_out = torch.full_like(q, float('nan')), torch.full_like(k, float('nan'))
    ret = apply_rotary_pos_emb(q, k, cos, sin, q_out=q_out, k_out=k_out)
    assert ret[0] is q_out and ret[1] is k_out
    q_ref, k_ref = _hf_apply(q, k, cos, sin)
    torch.testing.assert_close(q_out, q_ref, atol=1e-6, rtol=0)  # also checks pass-through was copied
    torch.testing.assert_close(k_out, k_ref, atol=1e-6, rtol=0)


def test_apply_bf16_computes_in_float32():
    q, k, cos, sin = _inputs(dtype=torch.bfloat16, rot=16)
    q_out, k_out = apply_rotary_pos_emb(q, k, cos, sin)
    assert q_out.dtype == k_out.dtype == torch.bfloat16
    q_ref, k_ref = _hf_apply(q.float(), k.float(), cos.float(), sin.float())
    assert torch.equal(q_out, q_ref.to(torch.bfloat16))
    assert torch.equal(k_out, k_ref.to(torch.bfloat16))


def test_apply_rejects_bad_shapes():
    q, k, cos, sin = _inputs()
    with pytest.raises(ValueError, match='even'):
        apply_rotary_pos_emb(q, k, cos[:, :15], sin[:, :15])
    with pytest.raises(ValueError, match='tokens'):
        apply_rotary_pos_emb(q[:-1], k[:-1], cos, sin)


def test_apply_rotary_emb_module():
    q, k, cos, sin = _inputs(rot=16)
    q_ref, k_ref = _hf_apply(q, k, cos, sin)
    q_new, k_new = ApplyRotaryEmb()(q, k, cos, sin, inplace=False)
    torch.testing.assert_close(q_new, q_ref, atol=1e-6, rtol=0)
    assert not torch.equal(q, q_new)
    q_ret, k_ret = ApplyRotaryEmb()(q, k, cos, sin)
    assert q_ret is q and k_ret is k
    torch.testing.assert_close(q, q_ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(k, k_ref, atol=1e-6, rtol=0)


def test_rotary_embedding_module_basics():
    rope = build_rotary_embedding(64, emb_type=RopeType.LinearScaling, scaling_factor=2.0, partial_rotary_factor=0.5)
    assert isinstance(rope, RotaryEmbedding) and rope.rotary_dim == 32
    assert 'inv_freq' not in rope.state_dict()  # derived, not a checkpoint weight
    assert torch.equal(rope.inv_freq, build_rotary_embedding(32).inv_freq / 2.0)
