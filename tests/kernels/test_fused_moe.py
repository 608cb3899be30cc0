"""The mixture-of-experts Triton kernels (`lmdp.kernels.triton.moe_router`, `.moe_align`, `.fused_moe`) against
their references in `lmdp.kernels.moe`.

On the CPU they run under the Triton interpreter (conftest) in float32/float16 on small ragged shapes, each path
(GEMV and grouped GEMM, fused and three-launch align) forced in turn. On a GPU (tests marked `gpu`) in bfloat16 at
the real sizes the issue names: experts 8/64/128, top-k 2/8, 1 to 4096 tokens, and inside a CUDA graph.
"""
import importlib

import pytest
import torch

from lmdp.kernels import moe as ref

tmoe = importlib.import_module('lmdp.kernels.triton.fused_moe')
talign = importlib.import_module('lmdp.kernels.triton.moe_align')
trouter = importlib.import_module('lmdp.kernels.triton.moe_router')
HAS_CUDA = torch.cuda.is_available()
cpu_only = pytest.mark.skipif(HAS_CUDA, reason='interpreter tests (CPU); the GPU runs the gpu-marked ones')
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason='needs CUDA')
# the grouped GEMM with 16-wide tiles, so the small shapes below leave ragged edges in N and K
SMALL = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, GROUP_M=2, num_warps=4, num_stages=1)


def _routed(tokens, experts, top_k, hidden, inter, dtype, device='cpu', seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=g).to(device, dtype)
    gate_up = (torch.randn(experts, 2 * inter, hidden, generator=g) * scale / hidden ** 0.5).to(device, dtype)
    down = (torch.randn(experts, hidden, inter, generator=g) * scale / inter ** 0.5).to(device, dtype)
    logits = torch.randn(tokens, experts, generator=g).to(device, dtype)
    return x, gate_up, down, logits


def _assert_same_choice(logits, weights, ids, top_k):
    """The reference's choice, up to the order of experts whose probabilities tie (half-precision logits tie)."""
    want_w, want_ids = ref.softmax_topk(logits, top_k)
    assert ids.dtype == torch.int64 and weights.dtype == torch.float32
    torch.testing.assert_close(weights, want_w, atol=1e-6, rtol=1e-5)
    probs = torch.softmax(logits.float(), -1)
    differ = ids != want_ids
    assert torch.equal(probs.gather(1, ids)[differ], probs.gather(1, want_ids)[differ])
    assert differ.float().mean() < 0.2


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


@cpu_only
@pytest.mark.parametrize('experts,top_k', [(8, 1), (8, 2), (60, 4), (64, 8), (128, 8)])
@pytest.mark.parametrize('tokens', [1, 37])
@pytest.mark.parametrize('dtype', [torch.float32, torch.float16])
def test_softmax_topk_kernel(experts, top_k, tokens, dtype):
    logits = torch.randn(tokens, experts, generator=torch.Generator().manual_seed(tokens)).to(dtype)
    weights, ids = trouter.softmax_topk(logits, top_k)
    _assert_same_choice(logits, weights, ids, top_k)
    if dtype == torch.float32:
        assert torch.equal(ids, ref.softmax_topk(logits, top_k)[1])


@cpu_only
@pytest.mark.parametrize('fused_chunks', [talign.FUSED_CHUNKS, 0])
@pytest.mark.parametrize('tokens,experts,top_k,block_m', [(0, 8, 2, 16), (1, 8, 2, 16), (45, 60, 4, 16),
                                                          (300, 128, 8, 32), (90, 8, 2, 64)])
def test_moe_align_kernel_matches_reference(fused_chunks, tokens, experts, top_k, block_m):
    g = torch.Generator().manual_seed(tokens)
    ids = torch.stack([torch.randperm(experts, generator=g)[:top_k] for _ in range(tokens)]) if tokens else \
        torch.zeros(0, top_k, dtype=torch.int64)
    got = talign.moe_align(ids, experts, block_m, fused_chunks=fused_chunks)
    want = ref.moe_align(ids, experts, block_m)
    for name, a, b in zip(('sorted_pairs', 'block_experts', 'num_padded'), got, want):
        assert torch.equal(a, b), name


@cpu_only
@pytest.mark.parametrize('path', ['gemv', 'grouped'])
@pytest.mark.parametrize('tokens,experts,top_k,hidden,inter,renormalize,act', [
    (1, 8, 2, 64, 48, False, 'silu'),
    (3, 6, 2, 40, 24, True, 'gelu'),
    (19, 16, 4, 64, 32, True, 'silu'),
    (5, 8, 2, 48, 40, False, 'gelu_tanh'),
    # the expert counts and top-k (64 and 128 experts, top-8), narrow layers: most experts get no token
    (2, 64, 8, 32, 16, True, 'silu'),
    (3, 128, 8, 32, 24, False, 'silu'),
])
@pytest.mark.parametrize('dtype', [torch.float32, torch.float16])
def test_fused_moe_kernel_matches_reference(path, tokens, experts, top_k, hidden, inter, renormalize, act, dtype):
    if path == 'gemv' and tokens > 5:
        pytest.skip('the interpreter runs one GEMV program per (pair, 4 rows): too slow for many pairs')
    x, gate_up, down, logits = _routed(tokens, experts, top_k, hidden, inter, dtype, seed=tokens)
    weights, ids = ref.softmax_topk(logits, top_k)
    y = tmoe.fused_moe(x, gate_up, down, weights, ids, renormalize, act, path=path,
                       config=SMALL if path == 'grouped' else None)
    want = ref.fused_moe(x, gate_up, down, weights, ids, renormalize, act)
    assert y.shape == want.shape and y.dtype == dtype
    # float16: the grouped path rounds each expert's weighted row before the sum over k (one unit per row)
    tol = 1e-6 if dtype == torch.float32 else 2e-3
    assert _rel(y, want) < tol
    # the renormalisation flag reaches the kernel
    assert _rel(y, ref.fused_moe(x, gate_up, down, weights, ids, not renormalize, act)) > 100 * tol


@cpu_only
def test_path_choice_by_pairs(monkeypatch):
    calls = []
    monkeypatch.setattr(tmoe, '_fused_moe_gemv', lambda *a: calls.append('gemv') or a[5])
    monkeypatch.setattr(tmoe, '_fused_moe_grouped', lambda *a: calls.append('grouped') or a[5])
    x, gate_up, down, logits = _routed(4, 16, 2, 16, 16, torch.float32)
    for tokens in (1, 2, 3):      # up to E / 4 = 4 pairs: GEMV
        tmoe.fused_moe(x[:tokens], gate_up, down, *ref.softmax_topk(logits[:tokens], 2))
    assert calls == ['gemv', 'gemv', 'grouped']
    with pytest.raises(ValueError, match="path must be 'gemv', 'grouped'"):
        tmoe.fused_moe(x, gate_up, down, *ref.softmax_topk(logits, 2), path='dense')


# --- on the GPU, bfloat16, real sizes ---------------------------------------------------------------------------

GPU_SHAPES = [(8, 2, 4096, 1792), (64, 8, 2048, 1408), (128, 8, 2048, 768)]   # Mixtral-, Qwen2-, Qwen3-MoE-like
GPU_TOKENS = [1, 2, 3, 4, 8, 16, 64, 256, 1024, 4096]


def _check_bf16(y, x, gate_up, down, weights, ids, renormalize):
    """The kernel's bf16 error against float32 truth stays within the bf16 reference's own (and ~1%)."""
    truth = ref.fused_moe(x.float(), gate_up.float(), down.float(), weights, ids, renormalize)
    ref_bf16 = ref.fused_moe(x, gate_up, down, weights, ids, renormalize)
    err, floor = _rel(y, truth), _rel(ref_bf16, truth)
    assert err <= 1.5 * floor + 2e-3, (err, floor)
    assert err < 1e-2


@gpu
@needs_cuda
@pytest.mark.parametrize('experts,top_k,hidden,inter', GPU_SHAPES)
@pytest.mark.parametrize('tokens', GPU_TOKENS)
def test_fused_moe_bf16_gpu(experts, top_k, hidden, inter, tokens):
    x, gate_up, down, logits = _routed(tokens, experts, top_k, hidden, inter, torch.bfloat16, 'cuda', seed=tokens)
    weights, ids = trouter.softmax_topk(logits, top_k)
    for renormalize in (False, True):
        y = tmoe.fused_moe(x, gate_up, down, weights, ids, renormalize)
        _check_bf16(y, x, gate_up, down, weights, ids, renormalize)


@gpu
@needs_cuda
@pytest.mark.parametrize('path', ['gemv', 'grouped'])
@pytest.mark.parametrize('tokens', [1, 5, 33])
def test_both_paths_bf16_gpu(path, tokens):
    x, gate_up, down, logits = _routed(tokens, 128, 8, 2048, 768, torch.bfloat16, 'cuda', seed=3)
    weights, ids = trouter.softmax_topk(logits, 8)
    y = tmoe.fused_moe(x, gate_up, down, weights, ids, True, path=path)
    _check_bf16(y, x, gate_up, down, weights, ids, True)


@gpu
@needs_cuda
@pytest.mark.parametrize('experts,top_k', [(8, 2), (64, 8), (128, 8)])
@pytest.mark.parametrize('tokens', [1, 7, 256, 4096])
def test_router_and_align_gpu(experts, top_k, tokens):
    logits = torch.randn(tokens, experts, device='cuda').to(torch.bfloat16)
    weights, ids = trouter.softmax_topk(logits, top_k)
    _assert_same_choice(logits, weights, ids, top_k)
    want_ids = ref.softmax_topk(logits, top_k)[1]
    for block_m in (16, 64, 128):
        got, want = talign.moe_align(want_ids, experts, block_m), ref.moe_align(want_ids, experts, block_m)
        assert all(torch.equal(a, b) for a, b in zip(got, want))


@gpu
@needs_cuda
@pytest.mark.parametrize('tokens', [1, 4, 64, 256])
def test_fused_moe_in_a_cuda_graph(tokens):
    """Replay equals the eager call bit for bit, and follows new routing written into the same buffers."""
    x, gate_up, down, logits = _routed(tokens, 128, 8, 2048, 768, torch.bfloat16, 'cuda')

    def step():
        w, i = trouter.softmax_topk(logits, 8)
        return tmoe.fused_moe(x, gate_up, down, w, i, True)
    eager = step()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    graph.replay()
    assert torch.equal(out, eager)
    logits.copy_(torch.randn_like(logits))
    x.copy_(torch.randn_like(x))
    graph.replay()
    assert torch.equal(out, step())
