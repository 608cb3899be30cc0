"""The mixture-of-experts reference ops (`lmdp.kernels.moe`): against a token-by-token loop, against transformers'
own MoE blocks, and the sort/align step's invariants."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from lmdp.kernels import moe


def _naive(x, gate_up, down, weights, ids, renormalize, act):
    """Each token, each chosen expert, in float64: the definition, with no batching or index tricks."""
    acts = {'silu': F.silu, 'gelu': F.gelu, 'gelu_tanh': lambda g: F.gelu(g, approximate='tanh')}
    out = torch.zeros(x.shape, dtype=torch.float64)
    inter = gate_up.size(1) // 2
    for t in range(x.size(0)):
        w = weights[t].double()
        if renormalize:
            w = w / w.sum()
        for k in range(ids.size(1)):
            e = int(ids[t, k])
            gate = gate_up[e, :inter].double() @ x[t].double()
            up = gate_up[e, inter:].double() @ x[t].double()
            out[t] += w[k] * (down[e].double() @ (acts[act](gate) * up))
    return out


def _case(tokens, experts, top_k, hidden=16, inter=12, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=g).to(dtype)
    gate_up = (torch.randn(experts, 2 * inter, hidden, generator=g) / hidden ** 0.5).to(dtype)
    down = (torch.randn(experts, hidden, inter, generator=g) / inter ** 0.5).to(dtype)
    logits = torch.randn(tokens, experts, generator=g).to(dtype)
    weights, ids = moe.softmax_topk(logits, top_k)
    return x, gate_up, down, weights, ids


@settings(max_examples=25, deadline=None)
@given(tokens=st.integers(1, 9), experts=st.integers(1, 9), top_k=st.integers(1, 4), renormalize=st.booleans(),
       act=st.sampled_from(['silu', 'gelu', 'gelu_tanh']), seed=st.integers(0, 1000))
def test_fused_moe_reference_is_the_per_token_sum(tokens, experts, top_k, renormalize, act, seed):
    top_k = min(top_k, experts)
    x, gate_up, down, weights, ids = _case(tokens, experts, top_k, seed=seed)
    got = moe.fused_moe(x, gate_up, down, weights, ids, renormalize, act)
    want = _naive(x, gate_up, down, weights, ids, renormalize, act)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


def test_renormalize_matters_and_one_expert_is_its_weight_times_its_mlp():
    x, gate_up, down, weights, ids = _case(5, 6, 2)
    plain = moe.fused_moe(x, gate_up, down, weights, ids, renormalize=False)
    renorm = moe.fused_moe(x, gate_up, down, weights, ids, renormalize=True)
    assert not torch.allclose(plain, renorm, atol=1e-3)
    # top-1, renormalised: each token's output is exactly its expert's MLP
    w1, i1 = moe.softmax_topk(torch.randn(5, 6), 1)
    one = moe.fused_moe(x, gate_up, down, w1, i1, renormalize=True)
    e = int(i1[2, 0])
    mlp = F.linear(F.silu(F.linear(x[2], gate_up[e, :12])) * F.linear(x[2], gate_up[e, 12:]), down[e])
    torch.testing.assert_close(one[2], mlp, atol=1e-6, rtol=1e-6)


def test_softmax_topk_picks_the_largest_probabilities_in_order():
    logits = torch.tensor([[0.1, 3.0, -1.0, 2.0], [5.0, 5.5, 0.0, -2.0]])
    weights, ids = moe.softmax_topk(logits, 2)
    assert ids.tolist() == [[1, 3], [1, 0]] and ids.dtype == torch.int64 and weights.dtype == torch.float32
    probs = torch.softmax(logits, -1)
    torch.testing.assert_close(weights, probs.gather(1, ids))
    with pytest.raises(ValueError, match='top_k=5'):
        moe.softmax_topk(logits, 5)
    with pytest.raises(ValueError, match=r'\[tokens, experts\]'):
        moe.softmax_topk(logits[0], 1)


def test_fused_moe_names_bad_shapes():
    x, gate_up, down, weights, ids = _case(3, 4, 2)
    with pytest.raises(ValueError, match='hidden states have 15 features'):
        moe.fused_moe(x[:, :15], gate_up, down, weights, ids)
    with pytest.raises(ValueError, match=r'must be \[E, H, I\]'):
        moe.fused_moe(x, gate_up, down[:, :, :5], weights, ids)
    with pytest.raises(ValueError, match='expert ids must lie in'):
        moe.fused_moe(x, gate_up, down, weights, ids + 3)
    with pytest.raises(ValueError, match='unknown gated activation'):
        moe.fused_moe(x, gate_up, down, weights, ids, act='relu')


@settings(max_examples=40, deadline=None)
@given(tokens=st.integers(0, 40), experts=st.integers(1, 20), top_k=st.integers(1, 4),
       block_m=st.sampled_from([1, 2, 16]), seed=st.integers(0, 100))
def test_moe_align_invariants(tokens, experts, top_k, block_m, seed):
    top_k = min(top_k, experts)
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(experts, generator=g)[:top_k] for _ in range(tokens)]) if tokens else \
        torch.zeros(0, top_k, dtype=torch.int64)
    sorted_pairs, block_experts, num_padded = moe.moe_align(ids, experts, block_m)
    pairs = tokens * top_k
    used = int(num_padded)
    assert used % block_m == 0 and sorted_pairs.numel() >= used
    assert sorted_pairs.numel() == moe.max_padded_pairs(pairs, experts, block_m)
    real = sorted_pairs[:used][sorted_pairs[:used] < pairs]
    assert sorted(real.tolist()) == list(range(pairs))              # every pair exactly once
    assert (sorted_pairs[used:] == pairs).all()                      # the rest is padding
    flat = ids.flatten()
    for b in range(block_experts.numel()):
        rows = sorted_pairs[b * block_m:(b + 1) * block_m]
        rows = rows[rows < pairs]
        if b * block_m >= used:
            assert block_experts[b] == -1 and rows.numel() == 0
            continue
        assert rows.numel() > 0 and (flat[rows.long()] == block_experts[b]).all()
        assert rows.tolist() == sorted(rows.tolist())                # stable within an expert
