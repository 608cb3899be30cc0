"""The pure-torch reference ops against independent dense computations."""
import math

import pytest
import torch

from lmdp.kernels.activation import gelu_and_mul, silu_and_mul
from lmdp.kernels.fill_kv_cache import fill_kv_cache
from lmdp.kernels.paged_attention import paged_attention_fwd
from lmdp.kernels.rms_norm import rms_norm


def _paged_setup(q_lens, hist_lens, hq, hk, d, block_size=4, seed=0):
    """Packed q/k/v for a step, a shuffled block table, and the dense per-sequence K/V (history + new)."""
    g = torch.Generator().manual_seed(seed)
    kv_lens = [h + q for h, q in zip(hist_lens, q_lens)]
    blocks_per = [-(-n // block_size) for n in kv_lens]
    num_blocks = sum(blocks_per) + 3
    perm = torch.randperm(num_blocks, generator=g).tolist()
    table = torch.zeros(len(q_lens), max(blocks_per), dtype=torch.int32)
    k_cache = torch.randn(num_blocks, block_size, hk, d, generator=g)
    v_cache = torch.randn(num_blocks, block_size, hk, d, generator=g)
    dense_k, dense_v, i = [], [], 0
    for b, n in enumerate(blocks_per):
        table[b, :n] = torch.tensor(perm[i:i + n])
        i += n
        dense_k.append(torch.randn(kv_lens[b], hk, d, generator=g))
        dense_v.append(torch.randn(kv_lens[b], hk, d, generator=g))
        # history already in the cache
        for p in range(hist_lens[b]):
            blk, slot = table[b, p // block_size], p % block_size
            k_cache[blk, slot], v_cache[blk, slot] = dense_k[b][p], dense_v[b][p]
    new_k = torch.cat([dk[h:] for dk, h in zip(dense_k, hist_lens)])
    new_v = torch.cat([dv[h:] for dv, h in zip(dense_v, hist_lens)])
    q = torch.randn(sum(q_lens), hq, d, generator=g)
    q_seqlens = torch.tensor(q_lens, dtype=torch.int32)
    q_start = torch.cumsum(q_seqlens, 0) - q_seqlens
    kv_seqlens = torch.tensor(kv_lens, dtype=torch.int32)
    return q, new_k, new_v, k_cache, v_cache, table, q_start, q_seqlens, kv_seqlens, dense_k, dense_v


def _dense_attention(q, k, v, hist, window=None, softcap=None):
    """Plain attention of one sequence's queries `[q, H, D]` over `[kv, Hk, D]`, float64."""
    hq, hk = q.size(1), k.size(1)
    k = k.double().repeat_interleave(hq // hk, 1)
    v = v.double().repeat_interleave(hq // hk, 1)
    s = torch.einsum('qhd,khd->hqk', q.double(), k) / math.sqrt(q.size(-1))
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    qpos = torch.arange(q.size(0))[:, None] + hist
    kpos = torch.arange(k.size(0))[None]
    allowed = kpos <= qpos
    if window:
        allowed &= kpos > qpos - window
    s = s.masked_fill(~allowed, float('-inf'))
    return torch.einsum('hqk,khd->qhd', s.softmax(-1), v)


@pytest.mark.parametrize('hq,hk', [(4, 4), (8, 2), (8, 1)])
@pytest.mark.parametrize('window,softcap', [(None, None), (5, None), (None, 20.0)])
def test_prefill_with_history_over_shuffled_blocks(hq, hk, window, softcap):
    q_lens, hist = [3, 9, 1], [0, 6, 13]
    (q, k, v, k_cache, v_cache, table, q_start, q_seqlens, kv_seqlens,
     dense_k, dense_v) = _paged_setup(q_lens, hist, hq, hk, 16)
    fill_kv_cache(k, v, k_cache, v_cache, q_start, q_seqlens, kv_seqlens, table)
    out = paged_attention_fwd(q, k_cache, v_cache, table, q_start, q_seqlens, kv_seqlens, sliding_window=window,
                              logit_softcapping=softcap)
    for b in range(3):
        s = q_start[b].item()
        ref = _dense_attention(q[s:s + q_lens[b]], dense_k[b], dense_v[b], hist[b], window, softcap)
        torch.testing.assert_close(out[s:s + q_lens[b]].double(), ref, rtol=1e-5, atol=1e-5)


def test_fill_kv_cache_writes_only_its_slots():
    q_lens, hist = [5, 2], [3, 7]
    (q, k, v, k_cache, v_cache, table, q_start, q_seqlens, kv_seqlens, dense_k, _) = _paged_setup(q_lens, hist, 2, 2, 8)
    before = k_cache.clone()
    fill_kv_cache(k, v, k_cache, v_cache, q_start, q_seqlens, kv_seqlens, table)
    changed = (k_cache != before).any(-1).any(-1)
    written = torch.zeros_like(changed)
    for b in range(2):
        for p in range(hist[b], hist[b] + q_lens[b]):
            blk, slot = table[b, p // 4], p % 4
            written[blk, slot] = True
            torch.testing.assert_close(k_cache[blk, slot], dense_k[b][p])
    assert torch.equal(changed, written)


def test_rms_norm_matches_transformers_and_fuses_the_residual():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    x, r = torch.randn(7, 32), torch.randn(7, 32)
    hf = LlamaRMSNorm(32, eps=1e-5)
    with torch.no_grad():
        hf.weight.normal_()
    torch.testing.assert_close(rms_norm(x, hf.weight, 1e-5), hf(x), rtol=0, atol=0)
    out, res = rms_norm(x, hf.weight, 1e-5, residual=r)
    torch.testing.assert_close(res, x + r, rtol=0, atol=0)
    torch.testing.assert_close(out, hf(x + r), rtol=0, atol=0)


def test_gated_activations():
    x = torch.randn(3, 10)
    torch.testing.assert_close(silu_and_mul(x), torch.nn.functional.silu(x[:, :5]) * x[:, 5:])
    gate, up = x[:, :5], x[:, 5:]
    tanh_gelu = 0.5 * gate * (1 + torch.tanh(math.sqrt(2 / math.pi) * (gate + 0.044715 * gate ** 3)))
    torch.testing.assert_close(gelu_and_mul(x, 'tanh'), tanh_gelu * up)
    assert not torch.allclose(gelu_and_mul(x, 'none'), tanh_gelu * up, atol=1e-6)
