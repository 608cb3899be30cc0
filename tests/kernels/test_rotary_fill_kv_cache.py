"""The fused rotary + cache fill (`lmdp.kernels.triton.rotary_fill_kv_cache`) against its reference, which is
the composition of the reference rotary and the reference fill.

Without CUDA the kernel runs under the Triton interpreter (conftest sets TRITON_INTERPRET) in float32/float16,
where it must match the reference bit for bit. The `gpu` tests run the compiled kernel in bfloat16 at real
sizes against the reference run on the same CUDA tensors.
"""
import importlib

import pytest
import torch

ref = importlib.import_module('lmdp.kernels.rotary_fill_kv_cache')
ref_fill = importlib.import_module('lmdp.kernels.fill_kv_cache')
tk = importlib.import_module('lmdp.kernels.triton')

HAS_CUDA = torch.cuda.is_available()
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason='needs CUDA')
cpu_only = pytest.mark.skipif(HAS_CUDA, reason='interpreter tests (CPU); the GPU runs the gpu-marked ones')


class Step:
    """One forward step's inputs: q/k/v as views of one fused qkv projection, cos/sin rows, and a shuffled,
    non-contiguous paged cache filled with random values (so any stray or missing write shows).

    `seqs` is a list of (q_len, kv_len); `padding` tokens follow the last sequence, as in a CUDA-graph batch.
    """

    def __init__(self, seqs, num_heads, num_kv_heads, head_dim, rot_dim, dtype, device, head_dim_v=None,
                 page_size=16, padding=0, cache_dtype=None, strided_tables=False, random_tables=False, seed=0):
        g = torch.Generator(device='cpu').manual_seed(seed)
        self.dims = num_heads, num_kv_heads, head_dim, head_dim_v or head_dim
        head_dim_v = self.dims[3]
        self.seqs, self.page_size = seqs, page_size
        cache_dtype = cache_dtype or dtype
        num_tokens = sum(q for q, _ in seqs) + padding

        need = [(kv + page_size - 1) // page_size for _, kv in seqs]
        num_blocks = sum(need) + 3
        perm = torch.randperm(num_blocks, generator=g)
        # entries past a sequence's blocks point at real (wrong) blocks, so a bad block index writes somewhere
        block_offsets = torch.randint(0, num_blocks, (len(seqs), max(need + [0]) + 2), generator=g)
        used = 0
        for b, n in enumerate(need):
            block_offsets[b, :n] = perm[used:used + n]
            used += n
        self.block_offsets = block_offsets.to(torch.int32).to(device)
        starts = torch.tensor([0] + [q for q, _ in seqs], dtype=torch.int32).cumsum(0)[:-1]
        self.q_start_loc = starts.to(torch.int32).to(device)
        self.q_seqlens = torch.tensor([q for q, _ in seqs], dtype=torch.int32, device=device)
        self.kv_seqlens = torch.tensor([kv for _, kv in seqs], dtype=torch.int32, device=device)

        width = (num_heads + num_kv_heads) * head_dim + num_kv_heads * head_dim_v
        self.qkv = torch.randn(num_tokens, width, generator=g).to(dtype).to(device)
        pos = torch.randint(0, 4096, (num_tokens,), generator=g).float()
        inv_freq = 1.0 / (10000 ** (torch.arange(0, rot_dim, 2).float() / max(rot_dim, 1)))
        freqs = pos[:, None] * inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        if random_tables:  # halves that differ, so that mixing up cos[:R/2] and cos[R/2:] shows
            emb = torch.rand(num_tokens, rot_dim, generator=g) * 6.3
        if strided_tables:  # cos/sin as column slices of wider tables
            emb = torch.cat((emb, torch.full_like(emb, 9.0)), dim=-1)[:, :rot_dim]
        self.cos, self.sin = emb.cos().to(dtype).to(device), emb.sin().to(dtype).to(device)
        self.k_cache = torch.randn(num_blocks, page_size, num_kv_heads, head_dim, generator=g)
        self.v_cache = torch.randn(num_blocks, page_size, num_kv_heads, head_dim_v, generator=g)
        self.k_cache = self.k_cache.to(cache_dtype).to(device)
        self.v_cache = self.v_cache.to(cache_dtype).to(device)

    def views(self):
        hq, hk, d, dv = self.dims
        t = self.qkv.size(0)
        q = self.qkv[:, :hq * d].view(t, hq, d)
        k = self.qkv[:, hq * d:(hq + hk) * d].view(t, hk, d)
        v = self.qkv[:, (hq + hk) * d:].view(t, hk, dv)
        return q, k, v

    def args(self):
        return (*self.views(), self.cos, self.sin, self.k_cache, self.v_cache, self.q_start_loc, self.q_seqlens,
                self.kv_seqlens, self.block_offsets)

    def clone(self):
        other = object.__new__(Step)
        other.__dict__.update(self.__dict__)
        other.qkv, other.k_cache, other.v_cache = self.qkv.clone(), self.k_cache.clone(), self.v_cache.clone()
        return other

    def written_slots(self):
        """(token, block, slot) of every real token, computed on the host from the batch layout."""
        tokens, blocks, slots = [], [], []
        start = 0
        offsets = self.block_offsets.cpu()
        for b, (q_len, kv_len) in enumerate(self.seqs):
            for i in range(q_len):
                pos = kv_len - q_len + i
                tokens.append(start + i)
                blocks.append(int(offsets[b, pos // self.page_size]))
                slots.append(pos % self.page_size)
            start += q_len
        return [torch.tensor(x, dtype=torch.long, device=self.qkv.device) for x in (tokens, blocks, slots)]


def check_writes(step, before):
    """Independently of any reference: exactly the real tokens' slots changed, and they hold this step's
    (rotated) k and v in the cache dtype; v itself is untouched, q and k were rotated."""
    tokens, blocks, slots = step.written_slots()
    q, k, v = step.views()
    q0, k0, v0 = before.views()
    for cache, cache0, x in ((step.k_cache, before.k_cache, k), (step.v_cache, before.v_cache, v)):
        changed = (cache != cache0).flatten(2).any(-1)
        expected = torch.zeros_like(changed)
        expected[blocks, slots] = True
        assert torch.equal(changed, expected)
        assert torch.equal(cache[blocks, slots], x[tokens].to(cache.dtype))
    assert torch.equal(v, v0)
    assert not torch.equal(q, q0) and not torch.equal(k, k0)


def run_both(step):
    """The Triton op on `step`, the reference on a copy; returns (step, reference copy, untouched copy)."""
    before, expect = step.clone(), step.clone()
    ref.rotary_fill_kv_cache(*expect.args())
    assert tk.rotary_fill_kv_cache(*step.args()) is None
    return step, expect, before


def assert_same(step, expect):
    assert torch.equal(step.qkv, expect.qkv)  # q, k rotated in place exactly as the reference; v unchanged
    assert torch.equal(step.k_cache, expect.k_cache)
    assert torch.equal(step.v_cache, expect.v_cache)


# (seqs, Hq, Hk, D, R, extra Step kwargs)
CPU_CASES = {
    # prefill without and with history, a zero-length sequence in the middle, decode tokens; GQA 4:1
    'prefill-gqa': ([(5, 5), (19, 40), (0, 13), (1, 33), (1, 1), (7, 16)], 8, 2, 64, 64, {}),
    # partial rotary, D not a power of two, cos/sin strided, padding, single kv head
    'partial-rotary': ([(3, 10), (0, 4), (6, 6)], 4, 1, 80, 32, dict(page_size=8, padding=2, strided_tables=True)),
    # Dv != D, non-power-of-two head counts, partial rotary, cos/sin halves that differ
    'dv-differs': ([(4, 20), (1, 9)], 6, 3, 64, 32, dict(head_dim_v=40, padding=1, random_tables=True)),
    # a decode batch, positions on page boundaries, padded like a captured graph; zero-length last sequence
    'decode': ([(1, 1), (1, 17), (1, 64), (1, 65), (1, 130), (0, 7)], 8, 2, 32, 32, dict(page_size=8, padding=3)),
}


@cpu_only
@pytest.mark.parametrize('dtype', [torch.float32, torch.float16])
@pytest.mark.parametrize('case', list(CPU_CASES))
def test_matches_reference(case, dtype):
    seqs, hq, hk, d, r, kw = CPU_CASES[case]
    step, expect, before = run_both(Step(seqs, hq, hk, d, r, dtype, 'cpu', **kw))
    assert_same(step, expect)
    check_writes(step, before)


@cpu_only
@pytest.mark.parametrize('dtype,cache_dtype', [(torch.float32, torch.float16), (torch.float16, torch.float32)])
def test_cache_dtype_cast(dtype, cache_dtype):
    # the rotated k is rounded to its own dtype first, then to the cache's: into a wider cache this shows
    step, expect, before = run_both(Step([(3, 10), (1, 8)], 4, 2, 32, 16, dtype, 'cpu', page_size=8,
                                         padding=2, cache_dtype=cache_dtype))
    assert_same(step, expect)
    check_writes(step, before)


@cpu_only
def test_only_padding():
    # an empty batch: every token is padding, so it is rotated but nothing reaches the cache
    step = Step([], 4, 2, 16, 16, torch.float32, 'cpu', padding=3)
    step, expect, before = run_both(step)
    assert_same(step, expect)
    assert torch.equal(step.k_cache, before.k_cache) and torch.equal(step.v_cache, before.v_cache)
    assert not torch.equal(step.qkv, before.qkv)
    # and no tokens at all is a no-op
    empty = Step([(0, 5)], 4, 2, 16, 16, torch.float32, 'cpu')
    tk.rotary_fill_kv_cache(*empty.args())


@pytest.mark.parametrize('impl', ['reference', 'triton'])
@pytest.mark.parametrize('bad', ['odd-rot', 'rot-too-big', 'kv-heads', 'cache-dim', 'tokens', 'batch'])
def test_rejects_bad_shapes(impl, bad):
    op = ref.rotary_fill_kv_cache if impl == 'reference' else tk.rotary_fill_kv_cache
    step = Step([(2, 4)], 4, 2, 16, 16, torch.float32, 'cpu')
    args = list(step.args())  # q, k, v, cos, sin, k_cache, v_cache, q_start_loc, q_seqlens, kv_seqlens, offsets
    if bad == 'odd-rot':
        args[3], args[4] = args[3][:, :15], args[4][:, :15]
    elif bad == 'rot-too-big':
        args[3], args[4] = torch.cat([args[3]] * 2, -1), torch.cat([args[4]] * 2, -1)
    elif bad == 'kv-heads':
        args[2] = torch.zeros(2, 3, 16)
    elif bad == 'cache-dim':
        args[5] = args[5][..., :8]
    elif bad == 'tokens':
        args[1] = args[1][:1]
    else:
        args[9] = torch.tensor([4, 4], dtype=torch.int32)
    with pytest.raises(ValueError):
        op(*args)


# ----------------------------------------------------------------------------------------------------------------
# GPU: compiled kernel, bfloat16, real sizes

GPU_DTYPE = torch.bfloat16


def assert_gpu_close(step, expect, before):
    q, k, _ = step.views()
    q_ref, k_ref, _ = expect.views()
    # the kernel may contract x1*c1 - x2*s1 into an FMA: at most one bf16 ulp (2^-7 relative) off, plus slack
    # for float32 cancellation near zero
    torch.testing.assert_close(q, q_ref, atol=1e-5, rtol=2 ** -7)
    torch.testing.assert_close(k, k_ref, atol=1e-5, rtol=2 ** -7)
    # the cache holds exactly what the unfused fill makes of the k this kernel left behind, and nothing else
    k_cache, v_cache = before.k_cache.clone(), before.v_cache.clone()
    real = int(step.q_seqlens.sum())
    ref_fill.fill_kv_cache(k[:real], step.views()[2][:real], k_cache, v_cache, step.q_start_loc,
                           step.q_seqlens, step.kv_seqlens, step.block_offsets)
    assert torch.equal(step.k_cache, k_cache) and torch.equal(step.v_cache, v_cache)
    torch.testing.assert_close(step.k_cache, expect.k_cache, atol=1e-5, rtol=2 ** -7)
    assert torch.equal(step.v_cache, expect.v_cache)
    check_writes(step, before)


GPU_SEQS = {
    # 2048 tokens: long prefill with history, zero-length sequence, a decode token, prefill without history
    'prefill': ([(1000, 1500), (0, 9), (1, 700), (1047, 1047)], 0),
    'decode': ([(1, n) for n in (1, 17, 300, 129, 64, 4000, 65, 16)], 4),
}


@gpu
@needs_cuda
@pytest.mark.parametrize('page_size', [16, 64])
@pytest.mark.parametrize('rot_dim', [128, 64])
@pytest.mark.parametrize('batch', list(GPU_SEQS))
def test_gpu_matches_reference(batch, rot_dim, page_size):
    seqs, padding = GPU_SEQS[batch]
    step = Step(seqs, 32, 8, 128, rot_dim, GPU_DTYPE, 'cuda', page_size=page_size, padding=padding, seed=1)
    step, expect, before = run_both(step)
    torch.cuda.synchronize()
    assert_gpu_close(step, expect, before)


@gpu
@needs_cuda
def test_gpu_cuda_graph_replay():
    # captured once, replayed with new lengths: the launch reads the batch only on the device
    # built at each sequence's largest length over the replays, so that every replay's blocks are assigned
    step = Step([(1, n) for n in (5000, 3001, 32000, 640)], 32, 8, 128, 128, GPU_DTYPE, 'cuda', page_size=64,
                padding=2, seed=2)
    fresh = step.qkv.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        tk.rotary_fill_kv_cache(*step.args())  # compile outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        tk.rotary_fill_kv_cache(*step.args())
    for kv in ([101, 3001, 20001, 8], [5000, 1, 32000, 640], [64, 65, 1, 129]):
        step.kv_seqlens.copy_(torch.tensor(kv, dtype=torch.int32))
        step.seqs = [(1, n) for n in kv]
        step.qkv.copy_(fresh)  # the op works in place: start each replay from the unrotated projection
        # fresh cache contents: a slot an earlier run wrote with the same token and position would look unwritten
        step.k_cache.normal_()
        step.v_cache.normal_()
        before, expect = step.clone(), step.clone()
        ref.rotary_fill_kv_cache(*expect.args())
        graph.replay()
        torch.cuda.synchronize()
        assert_gpu_close(step, expect, before)
