"""Prefill attention through torch's fused kernels (`lmdp.kernels.torch_prefill`) and the one place that picks the
kernel (`lmdp.kernels.prefill_select`).

On the CPU: the gather of paged K/V into packed buffers, the log-sum-exp merge (reference and Triton under the
interpreter), the bookkeeping of both torch paths with reference stand-ins for the CUDA kernels, and the choice.
Marked `gpu`: the real kernels in bfloat16 against the reference, and the cache still written by a prefill.
"""
import importlib
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from lmdp import envs
from lmdp.errors import EnvError
from lmdp.kernels import prefill_select, torch_prefill
from lmdp.kernels.merge_attention import merge_attention_states
from lmdp.kernels.paged_attention import gather_kv, paged_attention_fwd as reference

HAS_CUDA = torch.cuda.is_available()
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason='needs CUDA')


def make_batch(q_lens, hist_lens, num_heads=4, num_kv_heads=2, head_dim=16, page=8, dtype=torch.float32,
               device='cpu', seed=0):
    """Packed queries and a shuffled paged cache holding every sequence's history and new keys."""
    g = torch.Generator().manual_seed(seed)
    kv_lens = [h + q for q, h in zip(q_lens, hist_lens)]
    need = [max(1, -(-n // page)) for n in kv_lens]
    perm = torch.randperm(sum(need) + 3, generator=g).to(torch.int32)     # spare blocks: ids are not 0..n-1
    block_offsets = torch.zeros(len(q_lens), max(need), dtype=torch.int32)
    used = 0
    for b, n in enumerate(need):
        block_offsets[b, :n] = perm[used:used + n]
        used += n
    k_cache = torch.randn(sum(need) + 3, page, num_kv_heads, head_dim, generator=g)
    v_cache = torch.randn(sum(need) + 3, page, num_kv_heads, head_dim, generator=g)
    q = torch.randn(sum(q_lens), num_heads, head_dim, generator=g)
    q_seqlens = torch.tensor(q_lens, dtype=torch.int32)
    kv_seqlens = torch.tensor(kv_lens, dtype=torch.int32)
    q_start_loc = (torch.cumsum(q_seqlens, 0) - q_seqlens).to(torch.int32)
    out = [q.to(dtype), k_cache.to(dtype), v_cache.to(dtype), block_offsets, q_start_loc, q_seqlens, kv_seqlens]
    return [t.to(device) for t in out]


def attend_reference(q4, k4, v4, causal, scale, need_lse):
    """Stand-in for cuDNN on `[1, H, S, D]` views: top-left causal mask, natural-log lse `[Hq, Sq]`."""
    q = q4[0].float()
    group = q.size(0) // k4.size(1)
    k = k4[0].float().repeat_interleave(group, 0)
    v = v4[0].float().repeat_interleave(group, 0)
    s = q @ k.transpose(1, 2) * scale
    if causal:
        s = s.masked_fill(~torch.ones(s.shape[-2:], dtype=torch.bool).tril(), float('-inf'))
    return (torch.softmax(s, -1) @ v)[None].to(q4.dtype), torch.logsumexp(s, -1) if need_lse else None


def varlen_reference(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, left, right):
    """Stand-in for flash varlen: masks aligned bottom-right, query i of sq sees key j of sk when
    i + sk - sq - left <= j <= i + sk - sq + right (a negative bound: unbounded; causal sets right to 0)."""
    out = torch.empty_like(q)
    right = 0 if causal else right
    for b in range(cu_q.numel() - 1):
        qs, qe, ks, ke = (int(x) for x in (cu_q[b], cu_q[b + 1], cu_k[b], cu_k[b + 1]))
        sq, sk = qe - qs, ke - ks
        group = q.size(1) // k.size(1)
        qb = q[qs:qe].float().transpose(0, 1)
        kb = k[ks:ke].float().transpose(0, 1).repeat_interleave(group, 0)
        vb = v[ks:ke].float().transpose(0, 1).repeat_interleave(group, 0)
        diag = torch.arange(sq)[:, None] + sk - sq
        j = torch.arange(sk)[None, :]
        mask = torch.ones(sq, sk, dtype=torch.bool)
        if right >= 0:
            mask &= j <= diag + right
        if left >= 0:
            mask &= j >= diag - left
        s = (qb @ kb.transpose(1, 2) * scale).masked_fill(~mask, float('-inf'))
        out[qs:qe] = (torch.softmax(s, -1) @ vb).transpose(0, 1).to(q.dtype)
    return out


lengths = st.lists(st.tuples(st.integers(1, 40), st.integers(0, 50)), min_size=1, max_size=4)


@settings(max_examples=25, deadline=None)
@given(lengths, st.sampled_from([4, 8, 16]))
def test_gather_packed_kv_lays_each_sequence_after_the_last(seqs, page):
    q_lens, hist = [q for q, _ in seqs], [h for _, h in seqs]
    q, kc, vc, bo, qsl, qs, kvs = make_batch(q_lens, hist, page=page)
    k, v, cu_k = torch_prefill.gather_packed_kv(kc, vc, bo, kvs, int(kvs.sum()))
    assert cu_k.tolist() == [0] + torch.cumsum(kvs, 0).tolist()
    for b, n in enumerate(kvs.tolist()):
        assert torch.equal(k[cu_k[b]:cu_k[b + 1]], gather_kv(kc, bo[b], n))
        assert torch.equal(v[cu_k[b]:cu_k[b + 1]], gather_kv(vc, bo[b], n))


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 12), st.integers(0, 30), st.integers(0, 30), st.integers(1, 3))
def test_merge_joins_two_key_sets_into_attention_over_both(seq, n_a, n_b, heads):
    """Attention over keys A ∪ B equals the merge of attention over A and over B; an empty part weighs nothing."""
    if n_a + n_b == 0:
        n_a = 1
    g = torch.Generator().manual_seed(seq * 1000 + n_a * 31 + n_b)
    q = torch.randn(heads, seq, 8, generator=g, dtype=torch.float64)
    k = torch.randn(heads, n_a + n_b, 8, generator=g, dtype=torch.float64) * 2
    v = torch.randn(heads, n_a + n_b, 8, generator=g, dtype=torch.float64)
    s = q @ k.transpose(1, 2)
    want = (torch.softmax(s, -1) @ v).transpose(0, 1)

    def part(sl):
        ss = s[..., sl]
        if ss.size(-1) == 0:
            return torch.zeros(seq, heads, 8, dtype=q.dtype), torch.full((heads, seq), float('-inf'))
        return (torch.softmax(ss, -1) @ v[:, sl]).transpose(0, 1), torch.logsumexp(ss, -1)
    out_a, lse_a = part(slice(0, n_a))
    out_b, lse_b = part(slice(n_a, n_a + n_b))
    got = merge_attention_states(out_a, lse_a, out_b, lse_b)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)      # the merge computes in float32


@pytest.mark.parametrize('dtype', [torch.float32, torch.float16])
def test_triton_merge_matches_reference_on_strided_views(dtype):
    tk = importlib.import_module('lmdp.kernels.triton')
    device = 'cuda' if HAS_CUDA else 'cpu'
    g = torch.Generator().manual_seed(1)
    seq, heads, dv = 19, 3, 24                                  # Dv not a power of two: the masked tail
    a4 = torch.randn(1, heads, seq, dv, generator=g).to(device, dtype)       # cuDNN-like [1, H, S, D] outputs
    b4 = torch.randn(1, heads, seq, dv, generator=g).to(device, dtype)
    lse_a = (torch.randn(heads, seq, generator=g) * 3).to(device)
    lse_b = (torch.randn(heads, seq, generator=g) * 3).to(device)
    lse_b[0, :4] = float('-inf')                               # rows whose second part saw no key
    lse_a[1, :2] = lse_b[1, :2] = float('-inf')                # rows that saw no key at all: zeros, not NaN
    out_a, out_b = a4[0].transpose(0, 1), b4[0].transpose(0, 1)
    want = merge_attention_states(out_a.cpu(), lse_a.cpu(), out_b.cpu(), lse_b.cpu())
    big = torch.zeros(seq + 5, heads, dv, device=device, dtype=dtype)
    got = tk.merge_attention_states(out_a, lse_a, out_b, lse_b, big[2:2 + seq])
    tol = 1e-6 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(got.cpu().float(), want.float(), rtol=tol, atol=tol)
    assert (got[:2, 1] == 0).all()
    assert big[:2].abs().sum() == 0 and big[2 + seq:].abs().sum() == 0


CASES = [([9], [0]), ([7, 12, 3], [0, 20, 5]), ([16, 2], [33, 2]), ([5], [40])]


@pytest.mark.parametrize('q_lens,hist', CASES)
def test_cudnn_path_bookkeeping_equals_reference(q_lens, hist):
    """Per sequence: history without a mask, new tokens with the square causal mask, joined by lse."""
    q, kc, vc, bo, qsl, qs, kvs = make_batch(q_lens, hist)
    scale = 0.3
    seqlens = prefill_select.host_seqlens(qsl, qs, kvs)
    got = torch_prefill.cudnn_prefill(q, kc, vc, bo, seqlens, None, scale, attend=attend_reference)
    want = reference(q, kc, vc, bo, qsl, qs, kvs, scale=scale)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('window', [None, 1, 6, 25])
@pytest.mark.parametrize('q_lens,hist', CASES)
def test_flash_path_bookkeeping_equals_reference(q_lens, hist, window):
    """Packed K/V and cu_seqlens from the cache, transformers' window as flash's left bound."""
    q, kc, vc, bo, qsl, qs, kvs = make_batch(q_lens, hist)
    scale = 0.3
    got = torch_prefill.flash_varlen_prefill(q, kc, vc, bo, qsl, qs, kvs, None, max(q_lens), int(kvs.max()),
                                             int(kvs.sum()), scale, window, varlen=varlen_reference)
    want = reference(q, kc, vc, bo, qsl, qs, kvs, scale=scale, sliding_window=window)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_cudnn_takes_no_key_run_of_one():
    assert prefill_select.cudnn_fits([(0, 5, 5), (5, 4, 10)])
    assert not prefill_select.cudnn_fits([(0, 1, 1)])              # a one-token prompt
    assert not prefill_select.cudnn_fits([(0, 5, 6)])              # one token of history
    assert not prefill_select.cudnn_fits([(0, 5, 5), (5, 1, 9)])   # one new token


def _tensors(dtype=torch.bfloat16, head_dim=128, head_dim_v=None):
    q = torch.empty(4, 8, head_dim, dtype=dtype)
    kc = torch.empty(2, 16, 2, head_dim, dtype=dtype)
    vc = torch.empty(2, 16, 2, head_dim_v or head_dim, dtype=dtype)
    return q, kc, vc


@pytest.fixture
def probes(monkeypatch):
    """Make the start-up check answer from a table: {kind: None (passes) or why it failed}."""
    table = {'cudnn': None, 'flash': None}
    monkeypatch.setattr(prefill_select, 'probe', lambda kind, *a: table[kind])
    return table


@pytest.mark.parametrize('setting,want', [('auto', 'triton'), ('flash', 'flash'), ('cudnn', 'cudnn'),
                                          ('triton', 'triton')])
def test_choice_follows_the_setting_where_the_kernel_can_serve(monkeypatch, probes, setting, want):
    monkeypatch.setenv('LMDP_PREFILL_ATTENTION', setting)
    assert prefill_select.choose(*_tensors(), None, None, batch=1)[0] == want


@pytest.mark.parametrize('setting', ['cudnn', 'flash'])
@pytest.mark.parametrize('layer,why', [(dict(dtype=torch.float32), 'float32'), (dict(softcap=30.0), 'softcap'),
                                       (dict(head_dim=264), 'at most 256'),
                                       (dict(head_dim=100), 'multiples of 8')])
def test_what_torch_kernels_cannot_do_stays_on_triton(monkeypatch, probes, setting, layer, why):
    monkeypatch.setenv('LMDP_PREFILL_ATTENTION', setting)
    layer = dict(layer)
    softcap = layer.pop('softcap', None)
    kind, reason = prefill_select.choose(*_tensors(**layer), None, softcap, batch=1)
    assert kind == 'triton' and why in reason


def test_value_head_dim_unlike_key_head_dim_is_cudnn_or_triton(monkeypatch, probes):
    layer = _tensors(head_dim=72, head_dim_v=64)
    monkeypatch.setenv('LMDP_PREFILL_ATTENTION', 'flash')
    kind, reason = prefill_select.choose(*layer, None, None, batch=1)
    assert kind == 'triton' and 'value head_dim' in reason
    monkeypatch.setenv('LMDP_PREFILL_ATTENTION', 'cudnn')
    assert prefill_select.choose(*layer, None, None, batch=1)[0] == 'cudnn'


def test_window_moves_cudnn_to_flash_and_many_sequences_too(monkeypatch, probes):
    monkeypatch.setenv('LMDP_PREFILL_ATTENTION', 'cudnn')
    kind, reason = prefill_select.choose(*_tensors(), 4096, None, batch=1)
    assert kind == 'flash' and 'sliding window' in reason
    kind, reason = prefill_select.choose(*_tensors(), None, None, batch=prefill_select.CUDNN_MAX_SEQS + 1)
    assert kind == 'flash' and 'sequences' in reason
    assert prefill_select.choose(*_tensors(), None, None, batch=prefill_select.CUDNN_MAX_SEQS)[0] == 'cudnn'


def test_a_failed_start_up_check_falls_to_the_next_kernel(monkeypatch, probes):
    monkeypatch.setenv('LMDP_PREFILL_ATTENTION', 'cudnn')
    probes['cudnn'] = 'RuntimeError: no plan'
    kind, reason = prefill_select.choose(*_tensors(), None, None, batch=1)
    assert kind == 'flash' and 'no plan' in reason
    probes['flash'] = 'max error 0.8 against the reference'
    kind, reason = prefill_select.choose(*_tensors(), None, None, batch=1)
    assert kind == 'triton' and 'no plan' in reason and 'max error' in reason


def test_the_start_up_check_rules_out_a_kernel_that_cannot_run_here():
    """On the CPU torch's flash kernel does not exist: the real check says so instead of raising."""
    prefill_select.probe.cache_clear()
    why = prefill_select.probe('flash', torch.device('cpu'), torch.float16, 16, 16, True, False)
    assert why is not None and 'Error' in why


def test_a_bad_setting_is_refused_with_the_choices(monkeypatch):
    monkeypatch.setenv('LMDP_PREFILL_ATTENTION', 'fa3')
    with pytest.raises(EnvError, match='cudnn'):
        envs.LMDP_PREFILL_ATTENTION


# ----------------------------------------------------------------------------------------------------------------
# GPU: the real kernels in bfloat16

GPU_CASES = [([4096], [0]), ([1000, 37, 513], [0, 0, 0]), ([2048], [6000]), ([300, 64, 129], [700, 0, 1500]),
             ([77], [1])]


def _bf16_close(got, want):
    err = (got.float() - want.float()).abs().max().item()
    rel = ((got.float() - want.float()).norm() / want.float().norm()).item()
    assert err < 3e-2 and rel < 1e-2, (err, rel)


@gpu
@needs_cuda
@pytest.mark.parametrize('kind', ['flash', 'cudnn'])
@pytest.mark.parametrize('heads', [(32, 8, 128), (16, 16, 64), (8, 2, 256)])
@pytest.mark.parametrize('q_lens,hist', GPU_CASES)
def test_gpu_torch_kernel_matches_reference(kind, heads, q_lens, hist):
    num_heads, num_kv_heads, head_dim = heads
    q, kc, vc, bo, qsl, qs, kvs = make_batch(q_lens, hist, num_heads, num_kv_heads, head_dim, page=64,
                                             dtype=torch.bfloat16, device='cuda')
    why = prefill_select.probe(kind, q.device, q.dtype, head_dim, head_dim, num_heads != num_kv_heads, False)
    if kind == 'cudnn' and why is not None:
        pytest.skip(f'cuDNN attention unavailable here: {why}')
    assert why is None, why                       # torch's flash kernel must pass on an sm80+ CUDA build
    seqlens = prefill_select.host_seqlens(qsl, qs, kvs)
    if kind == 'cudnn' and not prefill_select.cudnn_fits(seqlens):
        pytest.skip('a key run of one: the dispatcher sends this batch elsewhere')
    scale = 1 / math.sqrt(head_dim)
    got = prefill_select.run(kind, q, kc, vc, bo, qsl, qs, kvs, None, max(q_lens), int(kvs.max()), int(kvs.sum()),
                             scale, None, True)
    want = reference(q, kc, vc, bo, qsl, qs, kvs, scale=scale)
    _bf16_close(got, want)


@gpu
@needs_cuda
@pytest.mark.parametrize('window', [1, 128, 1000])
def test_gpu_flash_sliding_window_matches_reference(window):
    q, kc, vc, bo, qsl, qs, kvs = make_batch([700, 300], [0, 900], 16, 4, 128, page=64, dtype=torch.bfloat16,
                                             device='cuda')
    scale = 1 / math.sqrt(128)
    got = prefill_select.run('flash', q, kc, vc, bo, qsl, qs, kvs, None, 700, 1200, int(kvs.sum()), scale, window,
                             True)
    _bf16_close(got, reference(q, kc, vc, bo, qsl, qs, kvs, scale=scale, sliding_window=window))


@gpu
@needs_cuda
@pytest.mark.parametrize('setting', ['auto', 'cudnn', 'triton'])
def test_gpu_prefill_through_attention_still_writes_the_cache(monkeypatch, setting):
    """torch's kernels only read the cache: the layer's fill must still write this step's keys and values."""
    from lmdp.model_inputs import AttentionMetadata
    from lmdp.nn import Attention
    monkeypatch.setenv('LMDP_PREFILL_ATTENTION', setting)
    q_lens, hist = [300, 130], [0, 200]
    q, kc, vc, bo, qsl, qs, kvs = make_batch(q_lens, hist, 16, 4, 128, page=64, dtype=torch.bfloat16, device='cuda')
    key = torch.randn(q.size(0), 4, 128, device='cuda', dtype=torch.bfloat16)
    value = torch.randn_like(key)
    meta = AttentionMetadata(is_decoding=False, block_offsets=bo, q_start_loc=qsl, q_seqlens=qs, kv_seqlens=kvs,
                             max_q_seqlen=max(q_lens), max_kv_seqlen=int(kvs.max()), sum_kv_seqlen=int(kvs.sum()))
    out = Attention(16, 128, num_kv_heads=4)(q, key, value, kc, vc, meta)
    for b, (start, n, kv) in enumerate(prefill_select.host_seqlens(qsl, qs, kvs)):
        assert torch.equal(gather_kv(kc, bo[b], kv)[kv - n:], key[start:start + n])
        assert torch.equal(gather_kv(vc, bo[b], kv)[kv - n:], value[start:start + n])
    _bf16_close(out, reference(q, kc, vc, bo, qsl, qs, kvs))
