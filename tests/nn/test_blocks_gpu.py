"""The blocks' fused paths on CUDA (Triton kernels, bfloat16, real sizes) against their unfused steps, and
per-sequence rotary scaling inside a captured CUDA graph. Skipped without CUDA (the lead's GPU run)."""
import pytest
import torch

from lmdp.model_inputs import AttentionMetadata
from lmdp.nn import Attention, GatedMLP, RMSNorm, build_rotary_embedding, build_rotary_embedding_from_config
from lmdp.weight_loader import load_weight

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')]
DEV, BF16 = 'cuda', torch.bfloat16


def _step(seqs, hq, hk, d, block=64, decoding=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    q_lens = [1 if decoding else n for n in seqs]
    total = sum(q_lens)
    qkv = torch.randn(total, (hq + 2 * hk) * d, generator=g).to(DEV, BF16)
    q, k, v = qkv.split([hq * d, hk * d, hk * d], -1)
    q, k, v = q.unflatten(-1, (hq, d)), k.unflatten(-1, (hk, d)), v.unflatten(-1, (hk, d))
    blocks = [-(-n // block) for n in seqs]
    offsets = torch.zeros(len(seqs), max(blocks), dtype=torch.int32)
    perm, used = torch.randperm(sum(blocks), generator=g), 0
    for i, n in enumerate(blocks):
        offsets[i, :n] = perm[used:used + n]
        used += n
    ql = torch.tensor(q_lens, dtype=torch.int32, device=DEV)
    kv = torch.tensor(seqs, dtype=torch.int32, device=DEV)
    meta = AttentionMetadata(is_decoding=decoding, block_offsets=offsets.to(DEV), q_start_loc=ql.cumsum(0) - ql,
                             q_seqlens=ql, kv_seqlens=kv, max_q_seqlen=max(q_lens), max_kv_seqlen=max(seqs))
    caches = (torch.randn(sum(blocks), block, hk, d, generator=g).to(DEV, BF16),
              torch.randn(sum(blocks), block, hk, d, generator=g).to(DEV, BF16))
    positions = torch.cat([torch.arange(n - q, n) for n, q in zip(seqs, q_lens)])[None].to(DEV)
    return (q, k, v), meta, caches, positions


@pytest.mark.parametrize('decoding', [False, True])
@pytest.mark.parametrize('rot', [128, 96])
def test_attention_fused_rotary_equals_its_unfused_steps(decoding, rot):
    hq, hk, d = 32, 8, 128
    seqs = [700, 33, 1500, 5]
    (q, k, v), meta, caches, positions = _step(seqs, hq, hk, d, decoding=decoding)
    cos, sin = build_rotary_embedding(d, base=1e6, partial_rotary_factor=rot / d, device=DEV)(q, positions)
    outs = []
    for watched in (False, True):
        attn = Attention(hq, d, num_kv_heads=hk)
        if watched:   # a hook makes the block run rotary as its own kernel, then the plain cache fill
            attn.rotary.register_forward_hook(lambda *a: None)
        kc, vc = caches[0].clone(), caches[1].clone()
        outs.append((attn(q.clone(), k.clone(), v, kc, vc, meta, rotary_pos_emb=(cos, sin)), kc))
    # the same keys in the cache (bf16 rounding apart) and the same attention
    torch.testing.assert_close(outs[0][1], outs[1][1])
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize('rows', [1, 2, 64])
@pytest.mark.parametrize('act', ['silu', 'gelu_pytorch_tanh'])
def test_gated_mlp_fused_activation_equals_its_unfused_steps(rows, act):
    hidden, inter = 4096, 14336
    mlp = GatedMLP(hidden, inter, act=act, dtype=BF16, device=DEV, is_tp=False)
    g = torch.Generator(device=DEV).manual_seed(0)
    for p in mlp.parameters():
        load_weight(p, torch.randn(p.shape, generator=g, device=DEV) * p.shape[-1] ** -0.5)
    x = torch.randn(rows, hidden, generator=g, device=DEV).to(BF16)
    fused = mlp(x)
    mlp.act_fn.register_forward_hook(lambda *a: None)
    unfused = mlp(x)
    rel = ((fused.float() - unfused.float()).norm() / unfused.float().norm()).item()
    assert rel < 1e-2, rel


def test_per_head_norm_on_strided_qkv_views_matches_the_reference():
    # the pure-torch one (the package's `rms_norm` dispatches to the Triton kernel on CUDA)
    from lmdp.kernels.rms_norm import rms_norm as reference
    (q, k, _), _, _, _ = _step([300], 32, 8, 128)
    norm = RMSNorm(128, 1e-6, dtype=BF16, device=DEV)
    norm.weight.normal_(1.0, 0.1)
    assert not q.is_contiguous()
    torch.testing.assert_close(norm(q), reference(q, norm.weight, 1e-6), rtol=1e-2, atol=1e-2)


def test_per_sequence_longrope_replays_in_a_cuda_graph():
    """The per-token lengths come from the step's metadata on the device: a captured decode step gives each
    sequence its own factors when replayed with other lengths, as an eager call does."""
    from transformers import Phi3Config
    half = 48
    config = Phi3Config(hidden_size=3072, num_attention_heads=32, num_key_value_heads=32,
                        max_position_embeddings=131072, original_max_position_embeddings=4096,
                        rope_parameters=dict(rope_type='longrope', rope_theta=10000.0,
                                             short_factor=[1.0 + i / half for i in range(half)],
                                             long_factor=[1.0 + 4 * i / half for i in range(half)]))
    rope = build_rotary_embedding_from_config(config, device=DEV)
    bs = 8
    kv = torch.full((bs,), 10, dtype=torch.int32, device=DEV)
    ones = torch.ones(bs, dtype=torch.int32, device=DEV)
    meta = AttentionMetadata(is_decoding=True, block_offsets=torch.zeros(bs, 1, dtype=torch.int32, device=DEV),
                             q_start_loc=torch.arange(bs, dtype=torch.int32, device=DEV), q_seqlens=ones,
                             kv_seqlens=kv)
    positions = (kv - 1).long()[None]
    x = torch.empty(0, dtype=BF16, device=DEV)
    rope(x, positions, meta)   # warm up outside the graph
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        cos, sin = rope(x, positions, meta)
    lengths = torch.tensor([5, 4096, 4097, 9000, 1, 4000, 5000, 2], dtype=torch.int32, device=DEV)
    kv.copy_(lengths)
    positions.copy_((lengths - 1).long()[None])
    graph.replay()
    eager_cos, eager_sin = rope(x, positions.clone(), meta)
    torch.testing.assert_close(cos, eager_cos, rtol=0, atol=0)
    short = rope(x, positions[:, :1].clone())[0]       # one sequence of 5: the short factors
    torch.testing.assert_close(cos[:, :1], short, rtol=0, atol=0)
