"""The Triton kernels of `lmdp.kernels.triton` against the pure-torch references of `lmdp.kernels`.

Without CUDA the kernels run under the Triton interpreter on CPU tensors (conftest sets TRITON_INTERPRET), in
float32/float16 and small shapes. The tests marked `gpu` run the compiled kernels on CUDA in bfloat16 at real
sizes and are skipped without a GPU.
"""
import importlib

import pytest
import torch

# the reference modules (`lmdp.kernels` re-exports functions under the same names, hence import_module)
ref_act = importlib.import_module('lmdp.kernels.activation')
ref_fill = importlib.import_module('lmdp.kernels.fill_kv_cache')
ref_attn = importlib.import_module('lmdp.kernels.paged_attention')
ref_norm = importlib.import_module('lmdp.kernels.rms_norm')
ref_rotary = importlib.import_module('lmdp.kernels.rotary')
tk = importlib.import_module('lmdp.kernels.triton')
prefill_attention_fwd = importlib.import_module('lmdp.kernels.triton.prefill_attention').prefill_attention_fwd
decode_mod = importlib.import_module('lmdp.kernels.triton.decode_attention')

HAS_CUDA = torch.cuda.is_available()
CPU_DTYPES = [torch.float32, torch.float16]
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason='needs CUDA')
cpu_only = pytest.mark.skipif(HAS_CUDA, reason='interpreter tests (CPU); the GPU runs the gpu-marked ones')


# ----------------------------------------------------------------------------------------------------------------
# helpers

def rel_l2(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-12)).item()


def assert_close(out, ref, dtype):
    """float32: tight; float16: fp16 rounding of the output and of P before the PV product; bfloat16: rel L2."""
    assert torch.isfinite(out.float()).all()
    if dtype == torch.float32:
        torch.testing.assert_close(out.float(), ref.float(), atol=2e-4, rtol=1e-3)
    elif dtype == torch.float16:
        torch.testing.assert_close(out.float(), ref.float(), atol=3e-3, rtol=1e-2)
        assert rel_l2(out, ref) < 2e-3
    else:
        assert rel_l2(out, ref) < 1e-2


class PagedBatch:
    """A batch of sequences on a shuffled, non-contiguous paged cache that already holds every token's K/V.

    `seqs` is a list of (q_len, kv_len): q_len new tokens after kv_len - q_len of history.
    """

    def __init__(self, seqs, num_heads, num_kv_heads, head_dim, page_size, dtype, device, head_dim_v=None,
                 spare_blocks=5, seed=0):
        g = torch.Generator(device='cpu').manual_seed(seed)
        head_dim_v = head_dim_v or head_dim
        self.seqs = seqs
        q_lens = [q for q, _ in seqs]
        kv_lens = [kv for _, kv in seqs]
        need = [(kv + page_size - 1) // page_size for kv in kv_lens]
        num_blocks = sum(need) + spare_blocks
        perm = torch.randperm(num_blocks, generator=g)
        max_blocks = max(need + [1]) + 2
        # padding entries point at real (wrong) blocks: reading past a sequence's end would show
        block_offsets = torch.randint(0, num_blocks, (len(seqs), max_blocks), generator=g)
        used = 0
        for b, n in enumerate(need):
            block_offsets[b, :n] = perm[used:used + n]
            used += n

        def rnd(*shape):
            return torch.randn(*shape, generator=g).to(dtype).to(device)

        self.k_cache = rnd(num_blocks, page_size, num_kv_heads, head_dim)
        self.v_cache = rnd(num_blocks, page_size, num_kv_heads, head_dim_v)
        self.q = rnd(sum(q_lens), num_heads, head_dim)
        self.block_offsets = block_offsets.to(torch.int32).to(device)
        self.q_seqlens = torch.tensor(q_lens, dtype=torch.int32, device=device)
        self.kv_seqlens = torch.tensor(kv_lens, dtype=torch.int32, device=device)
        starts = [0]
        for q in q_lens[:-1]:
            starts.append(starts[-1] + q)
        self.q_start_loc = torch.tensor(starts, dtype=torch.int32, device=device)
        self.max_q = max(q_lens)
        self.max_kv = max(kv_lens)

    def args(self):
        return (self.q, self.k_cache, self.v_cache, self.block_offsets, self.q_start_loc, self.q_seqlens,
                self.kv_seqlens)

    def reference(self, **kw):
        """The reference in float32 on the same (already rounded) inputs."""
        out = ref_attn.paged_attention_fwd(self.q.float(), self.k_cache.float(), self.v_cache.float(),
                                           self.block_offsets, self.q_start_loc, self.q_seqlens, self.kv_seqlens,
                                           **kw)
        return out

    def kv_bytes(self):
        kv = sum(kv for _, kv in self.seqs)
        per_tok = self.k_cache[0, 0].numel() * self.k_cache.element_size() + \
            self.v_cache[0, 0].numel() * self.v_cache.element_size()
        return kv * per_tok


# ----------------------------------------------------------------------------------------------------------------
# fill_kv_cache

def _check_fill(seqs, num_kv_heads, head_dim, head_dim_v, page_size, dtype, device, cache_dtype=None,
                padded_tokens=0):
    torch.manual_seed(0)
    cache_dtype = cache_dtype or dtype
    batch = PagedBatch(seqs, num_kv_heads, num_kv_heads, head_dim, page_size, cache_dtype, device,
                       head_dim_v=head_dim_v)
    num_tokens = sum(q for q, _ in seqs)
    # k and v as slices of one fused projection (non-contiguous views)
    qkv = torch.randn(num_tokens + padded_tokens, num_kv_heads * (2 * head_dim + head_dim_v), device=device)
    qkv = qkv.to(dtype)
    k = qkv[:, num_kv_heads * head_dim:2 * num_kv_heads * head_dim].view(-1, num_kv_heads, head_dim)
    v = qkv[:, 2 * num_kv_heads * head_dim:].view(-1, num_kv_heads, head_dim_v)
    # poison: every slot holds a sentinel, so any stray write shows
    k_cache = torch.full_like(batch.k_cache, 7.0)
    v_cache = torch.full_like(batch.v_cache, -7.0)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    ref_fill.fill_kv_cache(k[:num_tokens], v[:num_tokens], k_ref, v_ref, batch.q_start_loc, batch.q_seqlens,
                           batch.kv_seqlens, batch.block_offsets)
    tk.fill_kv_cache(k, v, k_cache, v_cache, batch.q_start_loc, batch.q_seqlens, batch.kv_seqlens,
                     batch.block_offsets)
    assert torch.equal(k_cache, k_ref)
    assert torch.equal(v_cache, v_ref)


@cpu_only
@pytest.mark.parametrize('dtype', CPU_DTYPES)
@pytest.mark.parametrize('num_kv_heads,head_dim,head_dim_v', [(2, 64, 64), (3, 40, 24), (1, 128, 128)])
def test_fill_kv_cache(dtype, num_kv_heads, head_dim, head_dim_v):
    # prefill without history, prefill with history, a zero-length sequence, decode tokens
    seqs = [(5, 5), (19, 40), (0, 13), (1, 33), (1, 1), (7, 16)]
    _check_fill(seqs, num_kv_heads, head_dim, head_dim_v, 16, dtype, 'cpu')


@cpu_only
def test_fill_kv_cache_padding_and_cast():
    # trailing padding tokens (as in a CUDA graph's padded batch) must not be written; fp32 states, fp16 cache
    _check_fill([(3, 10), (1, 8)], 2, 32, 32, 8, torch.float32, 'cpu', cache_dtype=torch.float16, padded_tokens=3)


# ----------------------------------------------------------------------------------------------------------------
# prefill attention

PREFILL_SEQS = [(37, 37), (20, 90), (70, 200), (1, 50)]  # no history, history, long history, a single token


@cpu_only
@pytest.mark.parametrize('dtype', CPU_DTYPES)
@pytest.mark.parametrize('group', [1, 4, 8])
@pytest.mark.parametrize('head_dim', [64, 128])
def test_prefill_attention(dtype, group, head_dim):
    num_kv_heads = 2 if group < 8 else 1
    b = PagedBatch(PREFILL_SEQS, num_kv_heads * group, num_kv_heads, head_dim, 16, dtype, 'cpu', seed=group)
    out = tk.paged_attention_fwd(*b.args())
    assert out.dtype == dtype and out.shape == b.q.shape
    assert_close(out, b.reference(), dtype)


@cpu_only
@pytest.mark.parametrize('dtype', CPU_DTYPES)
@pytest.mark.parametrize('kw', [dict(sliding_window=24), dict(logit_softcapping=5.0), dict(causal=False),
                                dict(sliding_window=40, logit_softcapping=2.0, scale=0.3),
                                dict(sliding_window=30, causal=False)],
                         ids=['window', 'softcap', 'noncausal', 'window-softcap-scale', 'window-noncausal'])
def test_prefill_attention_options(dtype, kw):
    b = PagedBatch(PREFILL_SEQS, 4, 2, 64, 16, dtype, 'cpu', seed=3)
    out = tk.paged_attention_fwd(*b.args(), max_q_seqlen=b.max_q, is_decoding=False, **kw)
    assert_close(out, b.reference(**kw), dtype)


@cpu_only
@pytest.mark.parametrize('kw', [dict(), dict(sliding_window=20), dict(sliding_window=33, causal=False),
                                dict(causal=False)], ids=['causal', 'window', 'window-noncausal', 'noncausal'])
@pytest.mark.parametrize('page_size', [8, 32])
def test_prefill_small_tiles(kw, page_size):
    """Tiles much smaller than the sequences: many query tiles, each with masked/unmasked/window key ranges,
    tiles spanning several cache blocks (page 8) and cache blocks spanning several tiles (page 32)."""
    b = PagedBatch([(45, 45), (33, 100), (16, 16), (2, 77)], 6, 2, 32, page_size, torch.float32, 'cpu', seed=5)
    out = torch.full_like(b.q, float('nan'))
    for bm, bn in [(16, 16), (32, 16), (16, 32)]:
        prefill_attention_fwd(*b.args(), out, b.max_q, block_m=bm, block_n=bn, **kw)
        assert_close(out, b.reference(**kw), torch.float32)


def _sweep_seqs(seed, n=14, max_hist=70, max_q=40):
    """Random (q_len, kv_len) pairs; histories and lengths land on every residue of a 16-key tile."""
    g = torch.Generator().manual_seed(seed)
    hist = torch.randint(0, max_hist, (n,), generator=g).tolist()
    q = torch.randint(1, max_q, (n,), generator=g).tolist()
    hist[:4] = [14, 15, 16, 31]
    return [(ql, ql + h) for ql, h in zip(q, hist)]


@cpu_only
@pytest.mark.parametrize('causal', [True, False])
@pytest.mark.parametrize('window', [None, 1, 5, 16, 17, 31])
def test_prefill_boundary_sweep(causal, window):
    """Off-by-one hunting: 16x16 tiles, many histories/lengths/windows, so that every tile-range boundary
    (causal diagonal, window start, sequence end) falls on each residue of the tile."""
    b = PagedBatch(_sweep_seqs(int(causal) * 100 + (window or 0)), 2, 1, 16, 8, torch.float32, 'cpu', seed=21)
    out = torch.full_like(b.q, float('nan'))
    kw = dict(causal=causal, sliding_window=window)
    prefill_attention_fwd(*b.args(), out, b.max_q, block_m=16, block_n=16, **kw)
    assert_close(out, b.reference(**kw), torch.float32)


@cpu_only
@pytest.mark.parametrize('window', [None, 1, 5, 16, 17, 63])
@pytest.mark.parametrize('num_splits', [1, 3, 8])
def test_decode_boundary_sweep(window, num_splits):
    g = torch.Generator().manual_seed(window or 0)
    kv = torch.randint(1, 300, (14,), generator=g).tolist()
    kv[:6] = [1, 63, 64, 65, 128, 129]
    b = PagedBatch([(1, n) for n in kv], 2, 1, 16, 8, torch.float32, 'cpu', seed=22)
    out = tk.paged_attention_fwd(*b.args(), is_decoding=True, num_splits=num_splits, sliding_window=window)
    assert_close(out, b.reference(sliding_window=window), torch.float32)


@cpu_only
def test_prefill_head_dim_256_and_odd_dims():
    b = PagedBatch([(20, 40), (9, 9)], 4, 1, 256, 16, torch.float16, 'cpu', seed=7)
    assert_close(tk.paged_attention_fwd(*b.args()), b.reference(), torch.float16)
    # head dims that are not powers of two, and Dv != D
    b = PagedBatch([(20, 40), (9, 9)], 4, 2, 80, 16, torch.float32, 'cpu', head_dim_v=48, seed=8)
    out = tk.paged_attention_fwd(*b.args())
    assert out.shape == (29, 4, 48)
    assert_close(out, b.reference(), torch.float32)


@cpu_only
@pytest.mark.parametrize('decode', [False, True])
def test_attention_strided_q_and_out(decode):
    """q as a slice of a fused qkv projection, out as a view into a wider buffer, a zero-length sequence."""
    seqs = [(1, 30), (0, 12), (1, 5)] if decode else [(10, 30), (0, 12), (5, 5)]
    b = PagedBatch(seqs, 4, 2, 64, 16, torch.float32, 'cpu', seed=9)
    qkv = torch.randn(b.q.size(0), 8 * 64)
    qkv[:, :4 * 64] = b.q.flatten(1)
    b.q = qkv[:, :4 * 64].view(-1, 4, 64)
    wide = torch.full((b.q.size(0), 4, 100), 5.0)
    out = wide[..., 10:74]
    ret = tk.paged_attention_fwd(*b.args(), out=out, **(dict(is_decoding=True, num_splits=2) if decode else {}))
    assert ret is out
    assert_close(out, b.reference(), torch.float32)
    assert (wide[..., :10] == 5.0).all() and (wide[..., 74:] == 5.0).all()


# ----------------------------------------------------------------------------------------------------------------
# decode attention

DECODE_KV = [1, 17, 300, 129, 64, 450]


@cpu_only
@pytest.mark.parametrize('dtype', CPU_DTYPES)
@pytest.mark.parametrize('group', [1, 4, 8])
@pytest.mark.parametrize('head_dim', [64, 128])
@pytest.mark.parametrize('num_splits', [1, 4, None])
def test_decode_attention(dtype, group, head_dim, num_splits):
    num_kv_heads = 2 if group < 8 else 1
    b = PagedBatch([(1, kv) for kv in DECODE_KV], num_kv_heads * group, num_kv_heads, head_dim, 16, dtype, 'cpu',
                   seed=group + head_dim)
    out = tk.paged_attention_fwd(*b.args(), is_decoding=True, max_kv_seqlen=b.max_kv, num_splits=num_splits)
    assert_close(out, b.reference(), dtype)


@cpu_only
@pytest.mark.parametrize('kw', [dict(sliding_window=100), dict(sliding_window=7), dict(logit_softcapping=3.0),
                                dict(sliding_window=64, logit_softcapping=10.0, scale=0.05)],
                         ids=['window100', 'window7', 'softcap', 'window-softcap-scale'])
@pytest.mark.parametrize('num_splits', [1, 8])
def test_decode_attention_options(kw, num_splits):
    b = PagedBatch([(1, kv) for kv in DECODE_KV], 8, 2, 64, 16, torch.float32, 'cpu', seed=11)
    out = tk.paged_attention_fwd(*b.args(), is_decoding=True, num_splits=num_splits, **kw)
    assert_close(out, b.reference(**kw), torch.float32)


@cpu_only
def test_decode_more_splits_than_tiles_and_derived_hints():
    """32 splits over sequences of a handful of tiles (most splits empty); and the dispatcher deriving
    is_decoding itself (host sync path), with a zero-length sequence in the batch."""
    b = PagedBatch([(1, 5), (1, 200), (1, 70)], 8, 1, 64, 32, torch.float32, 'cpu', seed=12)
    out = tk.paged_attention_fwd(*b.args(), is_decoding=True, num_splits=32)
    assert_close(out, b.reference(), torch.float32)
    b = PagedBatch([(1, 40), (0, 9), (1, 300)], 4, 2, 64, 16, torch.float16, 'cpu', seed=13)
    out = tk.paged_attention_fwd(*b.args())  # no hints: derives is_decoding, picks its own splits
    assert_close(out, b.reference(), torch.float16)


@cpu_only
def test_decode_large_group_and_head_dim_256():
    # group 32 > 16 rows per tile: several head blocks per kv head
    b = PagedBatch([(1, 90), (1, 33)], 32, 1, 64, 16, torch.float32, 'cpu', seed=14)
    assert_close(tk.paged_attention_fwd(*b.args(), is_decoding=True, num_splits=2), b.reference(), torch.float32)
    b = PagedBatch([(1, 90), (1, 33)], 8, 2, 256, 16, torch.float16, 'cpu', seed=15)
    assert_close(tk.paged_attention_fwd(*b.args(), is_decoding=True, num_splits=4), b.reference(), torch.float16)


@cpu_only
def test_no_host_sync_with_hints(monkeypatch):
    """With the hints given, the host wrappers never read device data (what a CUDA graph capture needs):
    any .item()/.tolist()/bool()/int() on a tensor called from lmdp.kernels.triton fails the test."""
    import sys

    def guard(name):
        original = getattr(torch.Tensor, name)

        def wrapper(self, *a, **kw):
            caller = sys._getframe(1).f_code.co_filename.replace('\\', '/')
            assert '/lmdp/kernels/triton/' not in caller, f'host sync: Tensor.{name} called from {caller}'
            return original(self, *a, **kw)
        monkeypatch.setattr(torch.Tensor, name, wrapper)

    for name in ('item', 'tolist', '__bool__', '__int__', '__index__', '__float__'):
        guard(name)
    b = PagedBatch([(1, 40), (1, 300)], 8, 2, 64, 16, torch.float32, 'cpu', seed=16)
    tk.fill_kv_cache(b.q[:, :2], b.q[:, 2:4], b.k_cache, b.v_cache, b.q_start_loc, b.q_seqlens, b.kv_seqlens,
                     b.block_offsets)
    tk.paged_attention_fwd(*b.args(), is_decoding=True, max_kv_seqlen=512)
    tk.paged_attention_fwd(*b.args(), is_decoding=True)
    b = PagedBatch([(10, 40), (3, 3)], 8, 2, 64, 16, torch.float32, 'cpu', seed=17)
    tk.paged_attention_fwd(*b.args(), is_decoding=False, max_q_seqlen=10, max_kv_seqlen=40)


# the split merge fused into the split kernel (arrival counters) vs the two-kernel path

class LaunchCounter:
    """Stands in for a @triton.jit kernel in its module and counts the launches (`kernel[grid](...)`)."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, 0

    def __getitem__(self, grid):
        self.launches += 1
        return self.kernel[grid]


@pytest.fixture
def fresh_counters(monkeypatch):
    """An empty arrival-counter cache for the test (the module's own is restored afterwards); returns it. The
    fused merge is opt-in (LMDP_DECODE_FUSED_REDUCE), so the tests that look at counters switch it on."""
    monkeypatch.setenv('LMDP_DECODE_FUSED_REDUCE', '1')
    monkeypatch.setattr(decode_mod, '_COUNTERS', {})
    monkeypatch.setattr(decode_mod, '_RETIRED_COUNTERS', [])
    return decode_mod._COUNTERS


@pytest.fixture
def reduce_launches(monkeypatch):
    spy = LaunchCounter(decode_mod._reduce_kernel)
    monkeypatch.setattr(decode_mod, '_reduce_kernel', spy)
    return spy


def decode_fwd(b, **kw):
    out = torch.full((b.q.size(0), b.q.size(1), b.v_cache.size(-1)), float('nan'), dtype=b.q.dtype, device=b.q.device)
    ret = decode_mod.decode_attention_fwd(*b.args(), out, **kw)
    assert ret is out
    return out


FUSED_CASES = {
    # seqs, Hq, Hk, D, Dv, page, dtype, num_splits, options
    'splits3': ([(1, kv) for kv in DECODE_KV], 8, 2, 64, 64, 16, torch.float32, 3, {}),
    'splits8-window7': ([(1, kv) for kv in DECODE_KV], 8, 2, 64, 64, 16, torch.float32, 8, dict(sliding_window=7)),
    # a q_len 0 row, and 32 splits over 1..4 tiles of 64 keys: most splits empty
    'qlen0-empty-splits': ([(1, 5), (0, 9), (1, 200), (1, 1)], 8, 1, 64, 64, 32, torch.float32, 32, {}),
    # group 32: two head blocks of 16 rows per kv head, each with its own counter
    'head-blocks-softcap': ([(1, 90), (1, 33)], 32, 1, 64, 64, 16, torch.float32, 2, dict(logit_softcapping=3.0)),
    # Dv 256: the merge goes over 32 splits in chunks of 16
    'chunked-merge': ([(1, 300), (1, 17)], 8, 2, 256, 256, 16, torch.float32, 32, {}),
    'fp16-odd-dims': ([(1, 300), (1, 40)], 4, 2, 80, 48, 16, torch.float16, 4,
                      dict(sliding_window=64, logit_softcapping=10.0, scale=0.05)),
}


@cpu_only
@pytest.mark.parametrize('case', list(FUSED_CASES))
def test_decode_fused_reduce_matches_two_kernels(case, fresh_counters, reduce_launches):
    """One launch (the last split program of each head block merges) gives the same bits as split kernel +
    `_reduce_kernel`: both store the same partials and merge them with the same `_merge_splits`, and the
    interpreter evaluates it deterministically (numpy). The counters are all back at 0 afterwards."""
    seqs, hq, hk, d, dv, page, dtype, splits, kw = FUSED_CASES[case]
    b = PagedBatch(seqs, hq, hk, d, page, dtype, 'cpu', head_dim_v=dv, seed=30)
    fused = decode_fwd(b, num_splits=splits, **kw)
    assert reduce_launches.launches == 0
    two = decode_fwd(b, num_splits=splits, fused_reduce=False, **kw)
    assert reduce_launches.launches == 1
    assert torch.equal(fused, two)
    assert_close(fused, b.reference(**kw), dtype)
    counters = fresh_counters[torch.device('cpu')]
    head_blocks = -(-(hq // hk) // 16)
    assert counters.numel() >= len(seqs) * hk * head_blocks
    assert not counters.any()


@cpu_only
def test_decode_merge_path_default_and_switch(reduce_launches, monkeypatch):
    """Two kernels by default (measured faster on an H100); LMDP_DECODE_FUSED_REDUCE=1 merges in the split kernel,
    with the same result."""
    b = PagedBatch([(1, 300), (1, 40)], 8, 2, 64, 16, torch.float32, 'cpu', seed=3)
    monkeypatch.delenv('LMDP_DECODE_FUSED_REDUCE', raising=False)
    two = decode_fwd(b, num_splits=4)
    assert reduce_launches.launches == 1
    monkeypatch.setenv('LMDP_DECODE_FUSED_REDUCE', '1')
    fused = decode_fwd(b, num_splits=4)
    assert reduce_launches.launches == 1
    torch.testing.assert_close(fused, two, atol=1e-6, rtol=1e-6)


@cpu_only
def test_decode_counters_reset_reused_and_grown(fresh_counters, monkeypatch):
    monkeypatch.setattr(decode_mod, '_MIN_COUNTERS', 4)
    cpu = torch.device('cpu')
    # one split: the output is written directly, no counters needed
    b = PagedBatch([(1, 5), (0, 9), (1, 200)], 8, 2, 64, 16, torch.float32, 'cpu', seed=31)
    ref = b.reference()
    assert_close(decode_fwd(b, num_splits=1), ref, torch.float32)
    assert cpu not in fresh_counters
    # 3 rows x 2 kv heads -> 6 counters, rounded up to 8; a q_len 0 row, 16 splits over at most 4 tiles
    assert_close(decode_fwd(b, num_splits=16), ref, torch.float32)
    counters = fresh_counters[cpu]
    assert counters.numel() == 8 and not counters.any()
    for splits in (2, 3, 16, 64):  # reused as is, and left at 0 by every call
        assert_close(decode_fwd(b, num_splits=splits), ref, torch.float32)
        assert fresh_counters[cpu] is counters and not counters.any()
    # 5 rows x 2 kv heads: grown to 16, zeroed; the old buffer is kept alive (a captured graph may use it)
    b2 = PagedBatch([(1, n) for n in (3, 70, 129, 1, 64)], 8, 2, 64, 16, torch.float32, 'cpu', seed=32)
    assert_close(decode_fwd(b2, num_splits=4), b2.reference(), torch.float32)
    grown = fresh_counters[cpu]
    assert grown is not counters and grown.numel() == 16 and not grown.any()
    assert decode_mod._RETIRED_COUNTERS[-1] is counters
    # a smaller call afterwards uses the bigger buffer
    assert_close(decode_fwd(b, num_splits=8), ref, torch.float32)
    assert fresh_counters[cpu] is grown and not grown.any()


@cpu_only
def test_decode_capture_without_counters_falls_back(fresh_counters, reduce_launches, monkeypatch):
    """During a CUDA-graph capture (simulated) the counter buffer is never allocated or replaced: a call that
    would need that runs the two-kernel path; one that finds a big enough buffer runs fused."""
    cpu = torch.device('cpu')
    monkeypatch.setattr(decode_mod, '_capturing', lambda device: True)
    b = PagedBatch([(1, 40), (1, 300), (0, 3)], 8, 2, 64, 16, torch.float32, 'cpu', seed=33)
    out = decode_fwd(b, num_splits=4)
    assert reduce_launches.launches == 1 and not fresh_counters
    assert_close(out, b.reference(), torch.float32)
    small = torch.zeros(5, dtype=torch.int32)  # 3 rows x 2 kv heads need 6
    fresh_counters[cpu] = small
    assert torch.equal(decode_fwd(b, num_splits=4), out)
    assert reduce_launches.launches == 2 and fresh_counters[cpu] is small and not small.any()
    enough = torch.zeros(6, dtype=torch.int32)
    fresh_counters[cpu] = enough
    assert torch.equal(decode_fwd(b, num_splits=4), out)
    assert reduce_launches.launches == 2 and fresh_counters[cpu] is enough and not enough.any()


# ----------------------------------------------------------------------------------------------------------------
# rms_norm

@cpu_only
@pytest.mark.parametrize('dtype', CPU_DTYPES)
@pytest.mark.parametrize('hidden', [64, 1000])
@pytest.mark.parametrize('with_residual', [False, True])
def test_rms_norm(dtype, hidden, with_residual):
    torch.manual_seed(0)
    x = torch.randn(3, 5, hidden).to(dtype)
    w = (torch.rand(hidden) + 0.5).to(dtype)
    res = torch.randn(3, 5, hidden).to(dtype) if with_residual else None
    out = tk.rms_norm(x, w, 1e-5, res)
    ref = ref_norm.rms_norm(x, w, 1e-5, res)
    if with_residual:
        assert out[1].dtype == ref[1].dtype
        torch.testing.assert_close(out[1], ref[1], atol=0, rtol=0)
        out, ref = out[0], ref[0]
    assert out.dtype == ref.dtype and out.shape == ref.shape
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(out, ref, atol=tol, rtol=tol)


@cpu_only
def test_rms_norm_float32_weight_and_strided_rows():
    torch.manual_seed(1)
    big = torch.randn(6, 300).half()
    x = big[:, 10:266]  # rows with a stride of 300
    w = torch.rand(256) + 0.5  # float32 gain on fp16 activations: Gemma's convention, one rounding at the end
    out = tk.rms_norm(x, w, 1e-6)
    ref = ref_norm.rms_norm(x, w, 1e-6)
    assert out.dtype == ref.dtype == torch.float16
    gemma = (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6) * w).half()
    assert torch.equal(ref, gemma)                  # transformers' Gemma RMSNorm, as written there
    torch.testing.assert_close(out, ref, atol=1e-3, rtol=1e-3)


@cpu_only
@pytest.mark.parametrize('dtype', [torch.float32, torch.float16])
def test_rms_norm_per_head_on_a_fused_qkv_view(dtype):
    """q/k norms (Qwen3) read each head of a `[T, H, D]` view of the fused qkv output in place."""
    torch.manual_seed(2)
    qkv = torch.randn(5, (4 + 2 + 2) * 16).to(dtype)
    k = qkv[:, 64:96].unflatten(-1, (2, 16))       # strides (128, 16, 1): no [rows, D] view exists
    w = (torch.rand(16) + 0.5).to(dtype)
    out = tk.rms_norm(k, w, 1e-6)
    assert out.shape == k.shape
    torch.testing.assert_close(out, ref_norm.rms_norm(k, w, 1e-6), atol=2e-3, rtol=2e-3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
def test_gpu_rms_norm_per_head_on_a_fused_qkv_view():
    qkv = torch.randn(33, (32 + 4 + 4) * 128, device='cuda', dtype=torch.bfloat16)
    q = qkv[:, :32 * 128].unflatten(-1, (32, 128))
    w = (torch.rand(128, device='cuda') + 0.5).to(torch.bfloat16)
    torch.testing.assert_close(tk.rms_norm(q, w, 1e-6), ref_norm.rms_norm(q, w, 1e-6), atol=2e-2, rtol=2e-2)


# ----------------------------------------------------------------------------------------------------------------
# rotary

def _rotary_inputs(num_tokens, num_heads, num_kv_heads, head_dim, rot_dim, dtype, device, seed=0):
    g = torch.Generator(device='cpu').manual_seed(seed)
    qkv = torch.randn(num_tokens, (num_heads + 2 * num_kv_heads) * head_dim, generator=g).to(dtype).to(device)
    q = qkv[:, :num_heads * head_dim].view(num_tokens, num_heads, head_dim)
    k = qkv[:, num_heads * head_dim:(num_heads + num_kv_heads) * head_dim].view(num_tokens, num_kv_heads, head_dim)
    pos = torch.randint(0, 4096, (num_tokens,), generator=g).float()
    inv_freq = 1.0 / (10000 ** (torch.arange(0, rot_dim, 2).float() / rot_dim))
    freqs = pos[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return qkv, q, k, emb.cos().to(device), emb.sin().to(device)


@cpu_only
@pytest.mark.parametrize('dtype', CPU_DTYPES)
@pytest.mark.parametrize('head_dim,rot_dim', [(64, 64), (128, 64), (80, 32)])
@pytest.mark.parametrize('inplace', [False, True])
def test_rotary(dtype, head_dim, rot_dim, inplace):
    qkv, q, k, cos, sin = _rotary_inputs(7, 6, 2, head_dim, rot_dim, dtype, 'cpu')
    q_ref, k_ref = ref_rotary.apply_rotary_pos_emb(q, k, cos, sin)
    v_before = qkv[:, 8 * head_dim:].clone()
    if inplace:
        q_out, k_out = tk.apply_rotary_pos_emb(q, k, cos, sin, q_out=q, k_out=k)
        assert q_out is q and k_out is k
    else:
        q_before, k_before = q.clone(), k.clone()
        q_out, k_out = tk.apply_rotary_pos_emb(q, k, cos, sin)
        assert torch.equal(q, q_before) and torch.equal(k, k_before)
    tol = 1e-5 if dtype == torch.float32 else 1e-3
    torch.testing.assert_close(q_out, q_ref, atol=tol, rtol=tol)
    torch.testing.assert_close(k_out, k_ref, atol=tol, rtol=tol)
    assert torch.equal(qkv[:, 8 * head_dim:], v_before)  # v untouched


@cpu_only
def test_rotary_into_strided_outputs():
    qkv, q, k, cos, sin = _rotary_inputs(5, 4, 1, 64, 32, torch.float32, 'cpu', seed=1)
    q_out = torch.zeros(5, 4, 96)[..., :64]
    k_out = torch.zeros(5, 1, 64)
    tk.apply_rotary_pos_emb(q, k, cos.half(), sin.half(), q_out=q_out, k_out=k_out)  # fp16 tables, too
    q_ref, k_ref = ref_rotary.apply_rotary_pos_emb(q, k, cos.half(), sin.half())
    torch.testing.assert_close(q_out, q_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(k_out, k_ref, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# activations

@cpu_only
@pytest.mark.filterwarnings('ignore:overflow encountered in exp:RuntimeWarning')  # sigmoid(-large) in numpy
@pytest.mark.parametrize('dtype', CPU_DTYPES)
@pytest.mark.parametrize('op', ['silu', 'gelu', 'gelu_tanh'])
@pytest.mark.parametrize('inter', [64, 1500])
def test_gated_activation(dtype, op, inter):
    torch.manual_seed(0)
    x = (torch.randn(2, 3, 2 * inter) * 3).to(dtype)
    if op == 'silu':
        out, ref = tk.silu_and_mul(x), ref_act.silu_and_mul(x)
    else:
        approx = 'tanh' if op == 'gelu_tanh' else 'none'
        out, ref = tk.gelu_and_mul(x, approx), ref_act.gelu_and_mul(x, approx)
    assert out.dtype == dtype and out.shape == ref.shape
    tol = 1e-5 if dtype == torch.float32 else 4e-3
    torch.testing.assert_close(out, ref, atol=tol, rtol=tol)


# ================================================================================================================
# GPU: compiled kernels, bfloat16, real sizes

GPU_DTYPE = torch.bfloat16


@gpu
@needs_cuda
@pytest.mark.parametrize('num_kv_heads,head_dim', [(8, 128), (4, 64), (2, 256), (8, 96)])
def test_gpu_fill_kv_cache(num_kv_heads, head_dim):
    seqs = [(1000, 1000), (300, 2000), (0, 17), (1, 4097), (1, 1), (513, 700)]
    _check_fill(seqs, num_kv_heads, head_dim, head_dim, 64, GPU_DTYPE, 'cuda')
    _check_fill(seqs, num_kv_heads, head_dim, head_dim, 16, GPU_DTYPE, 'cuda', padded_tokens=5)


@gpu
@needs_cuda
@pytest.mark.parametrize('group', [1, 4, 8])
@pytest.mark.parametrize('head_dim', [64, 128, 256])
@pytest.mark.parametrize('page_size', [16, 64])
def test_gpu_prefill_attention(group, head_dim, page_size):
    num_kv_heads = 2
    seqs = [(1024, 1024), (300, 2300), (77, 77), (1, 900), (2048, 5000)]
    b = PagedBatch(seqs, num_kv_heads * group, num_kv_heads, head_dim, page_size, GPU_DTYPE, 'cuda', seed=group)
    out = tk.paged_attention_fwd(*b.args(), max_q_seqlen=b.max_q, is_decoding=False)
    assert_close(out, b.reference(), GPU_DTYPE)


@gpu
@needs_cuda
@pytest.mark.parametrize('kw', [dict(sliding_window=512), dict(logit_softcapping=50.0),
                                dict(sliding_window=4096, logit_softcapping=30.0), dict(causal=False)],
                         ids=['window', 'softcap', 'window-softcap', 'noncausal'])
@pytest.mark.parametrize('head_dim', [128, 256])
def test_gpu_prefill_attention_options(kw, head_dim):
    seqs = [(1500, 1500), (700, 6000), (3, 40)]
    b = PagedBatch(seqs, 16, 4, head_dim, 32, GPU_DTYPE, 'cuda', seed=1)
    out = tk.paged_attention_fwd(*b.args(), **kw)
    assert_close(out, b.reference(**kw), GPU_DTYPE)


@gpu
@needs_cuda
def test_gpu_long_prefill_with_history():
    b = PagedBatch([(4096, 16384)], 16, 4, 128, 64, GPU_DTYPE, 'cuda', seed=2)
    out = tk.paged_attention_fwd(*b.args())
    assert_close(out, b.reference(), GPU_DTYPE)


@gpu
@needs_cuda
@pytest.mark.parametrize('group', [1, 4, 8])
@pytest.mark.parametrize('head_dim', [64, 128, 256])
@pytest.mark.parametrize('batch,max_kv', [(1, 32768), (8, 8192), (64, 2048)])
def test_gpu_decode_attention(group, head_dim, batch, max_kv):
    g = torch.Generator().manual_seed(batch)
    kv = torch.randint(1, max_kv + 1, (batch,), generator=g).tolist()
    kv[0] = max_kv
    num_kv_heads = 8 if group == 1 else 4
    b = PagedBatch([(1, n) for n in kv], num_kv_heads * group, num_kv_heads, head_dim, 64, GPU_DTYPE, 'cuda',
                   seed=group)
    ref = b.reference()
    for num_splits in (None, 1, 16):
        out = tk.paged_attention_fwd(*b.args(), is_decoding=True, max_kv_seqlen=b.max_kv, num_splits=num_splits)
        assert_close(out, ref, GPU_DTYPE)


@gpu
@needs_cuda
@pytest.mark.parametrize('kw', [dict(sliding_window=4096), dict(logit_softcapping=50.0),
                                dict(sliding_window=1000, logit_softcapping=30.0)],
                         ids=['window', 'softcap', 'window-softcap'])
def test_gpu_decode_attention_options(kw):
    b = PagedBatch([(1, n) for n in (32768, 5000, 900, 4096, 1)], 32, 8, 128, 16, GPU_DTYPE, 'cuda', seed=3)
    out = tk.paged_attention_fwd(*b.args(), is_decoding=True, max_kv_seqlen=b.max_kv, **kw)
    assert_close(out, b.reference(**kw), GPU_DTYPE)


@gpu
@needs_cuda
def test_gpu_decode_cuda_graph():
    """A decode step (fill_kv_cache + attention) captured in a CUDA graph, replayed on other context lengths:
    proves neither kernel syncs with the host and that the split bounds follow the sequences' lengths."""
    num_heads, num_kv_heads, head_dim, page = 32, 8, 128, 64
    capacity = [5000, 3001, 32000, 640]  # blocks are allocated for these lengths
    b = PagedBatch([(1, n) for n in capacity], num_heads, num_kv_heads, head_dim, page, GPU_DTYPE, 'cuda', seed=4)
    k_new = torch.randn(4, num_kv_heads, head_dim, device='cuda', dtype=GPU_DTYPE)
    v_new = torch.randn_like(k_new)
    out = torch.empty_like(b.q)

    def step():
        tk.fill_kv_cache(k_new, v_new, b.k_cache, b.v_cache, b.q_start_loc, b.q_seqlens, b.kv_seqlens,
                         b.block_offsets)
        tk.paged_attention_fwd(*b.args(), out=out, is_decoding=True, max_kv_seqlen=32768)

    b.kv_seqlens.copy_(torch.tensor([100, 3000, 20000, 7], dtype=torch.int32))
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # warm up: compile outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for kv in ([100, 3000, 20000, 7], [101, 3001, 20001, 8], [5000, 1, 32000, 640], [64, 65, 1, 129]):
        b.kv_seqlens.copy_(torch.tensor(kv, dtype=torch.int32))
        k_ref, v_ref = b.k_cache.clone(), b.v_cache.clone()
        ref_fill.fill_kv_cache(k_new, v_new, k_ref, v_ref, b.q_start_loc, b.q_seqlens, b.kv_seqlens,
                               b.block_offsets)
        out.fill_(float('nan'))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(k_ref, b.k_cache) and torch.equal(v_ref, b.v_cache)
        assert_close(out, b.reference(), GPU_DTYPE)


def assert_same_merge(fused, two):
    """The fused and two-kernel merges run the same `_merge_splits` on the same partials, but compiled into
    different kernels the float32 sums may be reduced in another order: allow a rare bfloat16 rounding flip."""
    torch.testing.assert_close(fused.float(), two.float(), rtol=2 ** -6, atol=1e-6)
    assert (fused == two).float().mean().item() > 0.999


def counters_idle(device) -> bool:
    counters = decode_mod._COUNTERS.get(device)
    return counters is None or not counters.any()


@gpu
@needs_cuda
@pytest.mark.parametrize('batch', [1, 64])
def test_gpu_decode_fused_reduce(batch):
    """Hq 32 / Hk 8 / D 128 over contexts 1..32k: the one-launch merge against the reference and against the
    two-kernel path, with the splits the heuristic picks and forced ones (64 splits: the chunked merge), the
    counters back at 0 after every call. The contexts change between calls, so a merge that ran before all the
    partials of its own call had landed would read another call's partials and show."""
    num_heads, num_kv_heads, head_dim, page = 32, 8, 128, 64
    if batch == 1:
        capacity = [32768]
        schedule = [[n] for n in (1, 2, 63, 64, 255, 256, 257, 1000, 4096, 8191, 16384, 32767, 32768)]
    else:
        kv = torch.logspace(0, 15, batch, base=2).round().long()  # 1 .. 32768, geometric
        capacity = kv[torch.randperm(batch, generator=torch.Generator().manual_seed(7))].tolist()
        schedule = [capacity, [max(1, n - 37) for n in capacity]]
    b = PagedBatch([(1, n) for n in capacity], num_heads, num_kv_heads, head_dim, page, GPU_DTYPE, 'cuda', seed=8)
    for kv in schedule:
        b.kv_seqlens.copy_(torch.tensor(kv, dtype=torch.int32))
        ref = b.reference()
        for num_splits in (None, 2, 16, 64):
            fused = decode_fwd(b, max_kv_seqlen=max(kv), num_splits=num_splits, fused_reduce=True)
            two = decode_fwd(b, max_kv_seqlen=max(kv), num_splits=num_splits, fused_reduce=False)
            assert_close(fused, ref, GPU_DTYPE)
            assert_same_merge(fused, two)
            assert counters_idle(b.q.device)
    assert decode_mod._COUNTERS[b.q.device].numel() >= batch * num_kv_heads


@gpu
@needs_cuda
@pytest.mark.parametrize('batch', [1, 3])
def test_gpu_decode_fused_cuda_graph(batch, fresh_counters, reduce_launches):
    """The one-launch decode captured in a CUDA graph after an eager warm-up (which allocates the counters), then
    replayed on changing contexts: bit-identical to the same call run eagerly, the counters back at 0 after every
    replay (the graph holds no memset), and no reduce kernel captured."""
    num_heads, num_kv_heads, head_dim, page = 32, 8, 128, 64
    capacity = [32768, 5000, 777][:batch]
    b = PagedBatch([(1, n) for n in capacity], num_heads, num_kv_heads, head_dim, page, GPU_DTYPE, 'cuda', seed=9)
    out = torch.empty_like(b.q)

    def step(o):
        tk.paged_attention_fwd(*b.args(), out=o, is_decoding=True, max_kv_seqlen=32768)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step(out)  # warm up: compiles, and allocates the counters outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    counters = fresh_counters[b.q.device]
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step(out)
    assert fresh_counters[b.q.device] is counters and reduce_launches.launches == 0
    eager = torch.empty_like(out)
    schedule = [(1, 1, 1), (100, 3000, 700), (32768, 5000, 777), (257, 64, 65), (20000, 4999, 2), (2, 1, 776),
                (32768, 5000, 777)]
    for kv in schedule:
        b.kv_seqlens.copy_(torch.tensor(kv[:batch], dtype=torch.int32))
        out.fill_(float('nan'))
        graph.replay()
        step(eager)
        torch.cuda.synchronize()
        assert torch.equal(out, eager)
        assert not counters.any()
        assert_close(out, b.reference(), GPU_DTYPE)
    assert reduce_launches.launches == 0


@gpu
@needs_cuda
def test_gpu_decode_capture_without_counters_falls_back(fresh_counters, reduce_launches):
    """No counter buffer yet when the capture starts (only the two-kernel path was warmed up): the captured call
    allocates nothing and records split kernel + reduce kernel, which replay correctly."""
    b = PagedBatch([(1, 4096)], 32, 8, 128, 64, GPU_DTYPE, 'cuda', seed=10)
    out = torch.empty_like(b.q)

    def step(o, **kw):
        decode_mod.decode_attention_fwd(*b.args(), o, max_kv_seqlen=4096, **kw)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step(out, fused_reduce=False)
    torch.cuda.current_stream().wait_stream(stream)
    assert not fresh_counters and reduce_launches.launches == 1
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step(out)  # fused asked for, but the buffer would have to be allocated inside the capture
    assert not fresh_counters and reduce_launches.launches == 2
    eager = torch.empty_like(out)
    for kv in (4096, 1, 300, 2049):
        b.kv_seqlens.copy_(torch.tensor([kv], dtype=torch.int32))
        out.fill_(float('nan'))
        graph.replay()
        step(eager, fused_reduce=False)
        torch.cuda.synchronize()
        assert torch.equal(out, eager)
        assert_close(out, b.reference(), GPU_DTYPE)


@gpu
@needs_cuda
@pytest.mark.parametrize('hidden', [2048, 4096, 5120, 8192])
@pytest.mark.parametrize('with_residual', [False, True])
def test_gpu_rms_norm(hidden, with_residual):
    x = torch.randn(333, hidden, device='cuda', dtype=GPU_DTYPE)
    w = (torch.rand(hidden, device='cuda') + 0.5).to(GPU_DTYPE)
    res = torch.randn_like(x) if with_residual else None
    out = tk.rms_norm(x, w, 1e-6, res)
    ref = ref_norm.rms_norm(x, w, 1e-6, res)
    if with_residual:
        assert torch.equal(out[1], ref[1])
        out, ref = out[0], ref[0]
    assert rel_l2(out, ref) < 1e-2
    torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)


@gpu
@needs_cuda
@pytest.mark.parametrize('head_dim,rot_dim', [(128, 128), (256, 256), (128, 64), (64, 64)])
@pytest.mark.parametrize('inplace', [False, True])
def test_gpu_rotary(head_dim, rot_dim, inplace):
    qkv, q, k, cos, sin = _rotary_inputs(2000, 32, 8, head_dim, rot_dim, GPU_DTYPE, 'cuda')
    q_ref, k_ref = ref_rotary.apply_rotary_pos_emb(q, k, cos, sin)
    if inplace:
        q_out, k_out = tk.apply_rotary_pos_emb(q, k, cos, sin, q_out=q, k_out=k)
    else:
        q_out, k_out = tk.apply_rotary_pos_emb(q, k, cos, sin)
    torch.testing.assert_close(q_out.float(), q_ref.float(), atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(k_out.float(), k_ref.float(), atol=1e-2, rtol=1e-2)


@gpu
@needs_cuda
@pytest.mark.parametrize('op', ['silu', 'gelu', 'gelu_tanh'])
@pytest.mark.parametrize('inter', [11008, 14336, 3000])
def test_gpu_gated_activation(op, inter):
    x = torch.randn(257, 2 * inter, device='cuda', dtype=GPU_DTYPE) * 3
    if op == 'silu':
        out, ref = tk.silu_and_mul(x), ref_act.silu_and_mul(x)
    else:
        approx = 'tanh' if op == 'gelu_tanh' else 'none'
        out, ref = tk.gelu_and_mul(x, approx), ref_act.gelu_and_mul(x, approx)
    assert rel_l2(out, ref) < 1e-2


# ----------------------------------------------------------------------------------------------------------------
# mixed steps: decode rows (q_len 1, with history) lead, prompt chunks follow (mixed_prefill)

class GridSpy(LaunchCounter):
    """A LaunchCounter that also keeps each launch's grid."""

    def __init__(self, kernel):
        super().__init__(kernel)
        self.grids = []

    def __getitem__(self, grid):
        self.grids.append(grid)
        return super().__getitem__(grid)


MIXED_SEQS = [(1, 1), (1, 40), (1, 129), (1, 17), (12, 12), (7, 70), (30, 33)]   # 4 decodes, then prompts


@cpu_only
@pytest.mark.parametrize('kw', [dict(), dict(sliding_window=9), dict(logit_softcapping=4.0)],
                         ids=['plain', 'window', 'softcap'])
@pytest.mark.parametrize('group', [1, 4])
def test_mixed_step_sends_its_decode_rows_to_the_decode_kernel(monkeypatch, kw, group):
    """Each row of a mixed step equals the reference, the decode kernel takes exactly the leading decode rows and
    the prefill kernel exactly the rest (one launch each), and no host sync is needed with the hints."""
    prefill_mod = importlib.import_module('lmdp.kernels.triton.prefill_attention')
    decode_spy, prefill_spy = GridSpy(decode_mod._decode_split_kernel), GridSpy(prefill_mod._prefill_kernel)
    monkeypatch.setattr(decode_mod, '_decode_split_kernel', decode_spy)
    monkeypatch.setattr(prefill_mod, '_prefill_kernel', prefill_spy)
    b = PagedBatch(MIXED_SEQS, 2 * group, 2, 32, 16, torch.float32, 'cpu', seed=31 + group)
    out = torch.full((b.q.size(0), b.q.size(1), b.v_cache.size(-1)), float('nan'))
    tk.paged_attention_fwd(*b.args(), out=out, is_decoding=False, max_q_seqlen=b.max_q, max_kv_seqlen=b.max_kv,
                           num_decodes=4, **kw)
    assert_close(out, b.reference(**kw), torch.float32)
    assert decode_spy.launches == 1 and decode_spy.grids[0][1] == 4
    assert prefill_spy.launches == 1 and prefill_spy.grids[0][1] == len(MIXED_SEQS) - 4


@cpu_only
def test_mixed_step_of_decodes_only_launches_no_prefill(monkeypatch):
    prefill_mod = importlib.import_module('lmdp.kernels.triton.prefill_attention')
    prefill_spy = GridSpy(prefill_mod._prefill_kernel)
    monkeypatch.setattr(prefill_mod, '_prefill_kernel', prefill_spy)
    b = PagedBatch(MIXED_SEQS[:4], 4, 2, 32, 16, torch.float32, 'cpu', seed=35)
    out = tk.paged_attention_fwd(*b.args(), is_decoding=False, max_q_seqlen=1, num_decodes=4)
    assert_close(out, b.reference(), torch.float32)
    assert prefill_spy.launches == 0


@gpu
@needs_cuda
@pytest.mark.parametrize('kw', [dict(), dict(sliding_window=512)], ids=['plain', 'window'])
def test_gpu_mixed_step(kw):
    """200 decodes at 100..3000 keys beside a 2048-token chunk after 1000 of history and a short prompt."""
    g = torch.Generator().manual_seed(5)
    decodes = [(1, n) for n in torch.randint(100, 3000, (200,), generator=g).tolist()]
    b = PagedBatch(decodes + [(2048, 3048), (300, 300)], 32, 8, 128, 64, GPU_DTYPE, 'cuda', seed=6)
    out = tk.paged_attention_fwd(*b.args(), is_decoding=False, max_q_seqlen=b.max_q, max_kv_seqlen=b.max_kv,
                                 num_decodes=200, **kw)
    assert_close(out, b.reference(**kw), GPU_DTYPE)
