"""Length-dependent rotary scaling (LongRoPE, dynamic NTK) is chosen per sequence: a sequence's cos/sin are the
same alone and packed beside others, in prefill and decode steps, and equal transformers' for that sequence run
alone."""
import pytest
import torch
from hypothesis import given, settings, strategies as st
from transformers import LlamaConfig, Phi3Config
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
from transformers.models.phi3.modeling_phi3 import Phi3RotaryEmbedding

from lmdp.model_inputs import AttentionMetadata
from lmdp.nn import build_rotary_embedding_from_config

X32 = torch.empty(0)
ORIGINAL = 48   # LongRoPE switches to the long factors past 48 tokens; dynamic NTK grows past 48


def _longrope_config(partial=1.0):
    half = int(32 * partial) // 2
    g = torch.Generator().manual_seed(0)
    return Phi3Config(hidden_size=128, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                      original_max_position_embeddings=ORIGINAL, partial_rotary_factor=partial,
                      rope_parameters=dict(rope_type='longrope', rope_theta=10000.0,
                                           short_factor=(1 + torch.rand(half, generator=g)).tolist(),
                                           long_factor=(2 + 8 * torch.rand(half, generator=g)).tolist()))


def _dynamic_config():
    return LlamaConfig(hidden_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                       max_position_embeddings=ORIGINAL,
                       rope_parameters=dict(rope_type='dynamic', factor=2.0, rope_theta=10000.0))


CONFIGS = {'longrope': (_longrope_config, Phi3RotaryEmbedding), 'longrope_partial':
           (lambda: _longrope_config(0.5), Phi3RotaryEmbedding), 'dynamic': (_dynamic_config, LlamaRotaryEmbedding)}


def _step(seqs, is_decoding=False):
    """(positions [1, T], metadata) of a packed step; seqs = [(history, new_tokens)]."""
    q = torch.tensor([n for _, n in seqs], dtype=torch.int32)
    kv = torch.tensor([h + n for h, n in seqs], dtype=torch.int32)
    positions = torch.cat([torch.arange(h, h + n) for h, n in seqs])[None]
    meta = AttentionMetadata(is_decoding=is_decoding, block_offsets=torch.zeros(len(seqs), 1, dtype=torch.int32),
                             q_start_loc=q.cumsum(0) - q, q_seqlens=q, kv_seqlens=kv)
    return positions, meta


# sequences whose lengths fall on both sides of ORIGINAL, with and without history (chunked prefill, decode)
seq_st = st.tuples(st.integers(0, 80), st.integers(1, 40))


@pytest.mark.parametrize('family', sorted(CONFIGS))
@settings(max_examples=30, deadline=None)
@given(seqs=st.lists(seq_st, min_size=1, max_size=5), which=st.integers(0, 4))
def test_a_sequences_rotary_is_the_same_alone_and_packed(family, seqs, which):
    rope = build_rotary_embedding_from_config(CONFIGS[family][0]())
    which %= len(seqs)
    positions, meta = _step(seqs)
    cos, sin = rope(X32, positions, meta)
    start = sum(n for _, n in seqs[:which])
    alone_pos, alone_meta = _step([seqs[which]])
    cos1, sin1 = rope(X32, alone_pos, alone_meta)
    n = seqs[which][1]
    assert torch.equal(cos[0, start:start + n], cos1[0]) and torch.equal(sin[0, start:start + n], sin1[0])


@pytest.mark.parametrize('family', sorted(CONFIGS))
@settings(max_examples=15, deadline=None)
@given(seqs=st.lists(seq_st, min_size=1, max_size=4))
def test_each_packed_sequence_matches_transformers_running_it_alone(family, seqs):
    make_config, hf_class = CONFIGS[family]
    config = make_config()
    rope = build_rotary_embedding_from_config(config)
    positions, meta = _step(seqs)
    cos, sin = rope(X32, positions, meta)
    start = 0
    for h, n in seqs:
        # a fresh transformers module: its dynamic NTK keeps state between calls, this module does not
        hf_cos, hf_sin = hf_class(config)(X32, torch.arange(h, h + n)[None])
        # dynamic NTK's base is rounded from float64 here, float32 in transformers (an ulp apart at most)
        atol = 1e-5 if family == 'dynamic' else 1e-6
        torch.testing.assert_close(cos[0, start:start + n], hf_cos[0], atol=atol, rtol=0)
        torch.testing.assert_close(sin[0, start:start + n], hf_sin[0], atol=atol, rtol=0)
        start += n


@pytest.mark.parametrize('family', sorted(CONFIGS))
@settings(max_examples=15, deadline=None)
@given(kv_lens=st.lists(st.integers(1, 120), min_size=1, max_size=6))
def test_decode_steps_rotate_each_sequence_by_its_own_length(family, kv_lens):
    rope = build_rotary_embedding_from_config(CONFIGS[family][0]())
    positions, meta = _step([(n - 1, 1) for n in kv_lens], is_decoding=True)
    cos, _ = rope(X32, positions, meta)
    for i, n in enumerate(kv_lens):
        alone, alone_meta = _step([(n - 1, 1)], is_decoding=True)
        assert torch.equal(cos[0, i], rope(X32, alone, alone_meta)[0][0, 0])


def test_the_issues_example_short_beside_long():
    """rope(arange(5)) differed from the same rows packed beside arange(64) by 0.63 when the step chose."""
    rope = build_rotary_embedding_from_config(_longrope_config())
    short_pos, short_meta = _step([(0, 5)])
    packed_pos, packed_meta = _step([(0, 5), (0, 64)])
    alone, _ = rope(X32, short_pos, short_meta)
    packed, _ = rope(X32, packed_pos, packed_meta)
    assert torch.equal(packed[0, :5], alone[0])
    per_step, _ = rope(X32, packed_pos)              # no metadata: the whole step taken as one sequence
    assert (per_step[0, :5] - alone[0]).abs().max() > 0.1


def test_static_rope_ignores_the_metadata():
    config = LlamaConfig(hidden_size=128, num_attention_heads=4, head_dim=32)
    rope = build_rotary_embedding_from_config(config)
    positions, meta = _step([(0, 5), (3, 60)])
    assert torch.equal(rope(X32, positions, meta)[0], rope(X32, positions)[0])


def test_per_sequence_rotary_has_no_host_sync():
    """On meta tensors any .item() raises: the per-token lengths come from the metadata on the device."""
    rope = build_rotary_embedding_from_config(_longrope_config(), device='meta')
    q = torch.empty(3, dtype=torch.int32, device='meta')
    meta = AttentionMetadata(is_decoding=False, block_offsets=torch.empty(3, 1, dtype=torch.int32, device='meta'),
                             q_start_loc=q, q_seqlens=q, kv_seqlens=q)
    cos, _ = rope(torch.empty(0, device='meta'), torch.empty(1, 70, dtype=torch.long, device='meta'), meta)
    assert cos.shape == (1, 70, 32)
