"""The decode GEMV kernel (`lmdp.kernels.triton.gemv`) against `F.linear` and the reference gated activation.

On the CPU it runs under the Triton interpreter (conftest) in float32/float16 on small shapes, each of its three
multiply-add modes; on a GPU (tests marked `gpu`) in bfloat16 on the layer shapes of Llama-3-8B, also captured in a
CUDA graph.
"""
import importlib

import pytest
import torch
import torch.nn.functional as F

from lmdp.kernels.linear import act_and_mul_linear as ref_act_linear
from lmdp.nn import SiluAndMul, build_rowwise_linear

tg = importlib.import_module('lmdp.kernels.triton.gemv')
HAS_CUDA = torch.cuda.is_available()
cpu_only = pytest.mark.skipif(HAS_CUDA, reason='interpreter tests (CPU); the GPU runs the gpu-marked ones')
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason='needs CUDA')

# (MODE, BLOCK_N, BLOCK_K, num_warps, num_stages): one of each mode, with tiles that leave ragged edges below
CONFIGS = [(0, 8, 64, 4, 1), (1, 4, 32, 4, 1), (2, 16, 32, 4, 2)]


def _tol(dtype):
    return dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)


@cpu_only
@pytest.mark.parametrize('config', CONFIGS)
@pytest.mark.parametrize('m', [1, 3, 4])
@pytest.mark.parametrize('n,k', [(40, 96), (37, 200)])
@pytest.mark.parametrize('dtype', [torch.float32, torch.float16])
def test_gemv_matches_linear(config, m, n, k, dtype):
    g = torch.Generator().manual_seed(m * 1000 + n)
    # rows with a stride larger than K (a view into a wider buffer), as a sliced activation would be
    x = torch.randn(m, k + 24, generator=g).to(dtype)[:, :k]
    w = (torch.randn(n, k, generator=g) / k ** 0.5).to(dtype)
    b = torch.randn(n, generator=g).to(dtype)
    y = tg.gemv(x, w, b, config=config)
    ref = F.linear(x.float(), w.float(), b.float())
    assert y.shape == (m, n) and y.dtype == dtype
    torch.testing.assert_close(y.float(), ref, **_tol(dtype))


@cpu_only
@pytest.mark.parametrize('config', CONFIGS)
@pytest.mark.parametrize('act', ['silu', 'gelu', 'gelu_tanh'])
@pytest.mark.parametrize('dtype', [torch.float32, torch.float16])
def test_gemv_fused_activation(config, act, dtype):
    g = torch.Generator().manual_seed(7)
    m, n, k = 2, 24, 80
    x = (torch.randn(m, 2 * k, generator=g) * 2).to(dtype)
    w = (torch.randn(n, k, generator=g) / k ** 0.5).to(dtype)
    y = tg.gemv(x, w, None, act=act, config=config)
    # the reference rounds act(gate) * up to x's dtype before the product: so must the kernel
    ref = ref_act_linear(x, w, None, act)
    torch.testing.assert_close(y.float(), ref.float(), **_tol(dtype))
    other = 'silu' if act != 'silu' else 'gelu'
    assert not torch.allclose(y.float(), ref_act_linear(x, w, None, other).float(), **_tol(dtype))


@cpu_only
def test_linear_wrappers_choose_by_rows(monkeypatch):
    """Up to GEMV_MAX_M rows of fp16/bf16 take the kernel; more rows, or float32, take F.linear."""
    calls = []
    real = tg.gemv
    monkeypatch.setattr(tg, 'gemv', lambda *a, **kw: calls.append(a[0].shape) or real(*a, **kw))
    w = torch.randn(16, 32).half()
    small = torch.randn(1, 1, 32).half()
    y = tg.linear(small, w)
    assert calls == [(1, 32)] and y.shape == (1, 1, 16)
    torch.testing.assert_close(y.float(), F.linear(small.float(), w.float()), atol=2e-2, rtol=2e-2)
    tg.linear(torch.randn(tg.GEMV_MAX_M + 1, 32).half(), w)
    tg.linear(torch.randn(1, 32), w.float())
    tg.act_and_mul_linear(torch.randn(tg.GEMV_MAX_M + 1, 64).half(), w)
    assert calls == [(1, 32)]
    tg.act_and_mul_linear(torch.randn(2, 64).half(), w)
    assert calls[-1] == (2, 64)


@pytest.mark.parametrize('fn', [ref_act_linear, tg.act_and_mul_linear])
def test_act_linear_bad_input(fn):
    w = torch.randn(16, 32)
    with pytest.raises(ValueError, match='expected 2 x 32'):
        fn(torch.randn(1, 32), w)
    with pytest.raises(ValueError, match='unknown gated activation'):
        fn(torch.randn(1, 64), w, None, 'relu')


def test_rowwise_linear_with_fused_act_equals_act_then_linear():
    down = build_rowwise_linear(32, 16, bias=True)
    torch.nn.init.normal_(down.weight)
    torch.nn.init.normal_(down.bias)
    x = torch.randn(3, 64)
    torch.testing.assert_close(down(x, act=SiluAndMul().fused_name), down(SiluAndMul()(x)))


# ----------------------------------------------------------------------------------------------------------------
# GPU: bf16, the linear layers of a Llama-3-8B decode step

SHAPES_8B = [(6144, 4096, None), (4096, 4096, None), (28672, 4096, None), (4096, 14336, 'silu'),
             (128256, 4096, None)]


@gpu
@needs_cuda
@pytest.mark.parametrize('n,k,act', SHAPES_8B)
@pytest.mark.parametrize('m', [1, 2, 4])
def test_gpu_gemv_real_shapes(n, k, act, m):
    g = torch.Generator(device='cuda').manual_seed(n + m)
    x = torch.randn(m, 2 * k if act else k, device='cuda', generator=g).bfloat16()
    w = (torch.randn(n, k, device='cuda', generator=g) / k ** 0.5).bfloat16()
    y = tg.act_and_mul_linear(x, w, None, act) if act else tg.linear(x, w)
    h = ref_act_linear(x, w, None, act) if act else None   # the reference's bf16 activation, then float32 math
    ref = F.linear((SiluAndMul()(x) if act else x).float(), w.float())
    rel = ((y.float() - ref).norm() / ref.norm()).item()
    assert rel < 4e-3, rel                      # bf16 output rounding is ~2e-3
    if h is not None:
        assert ((y.float() - h.float()).norm() / h.float().norm()).item() < 4e-3


@gpu
@needs_cuda
def test_gpu_gemv_in_cuda_graph():
    w = torch.randn(4096, 14336, device='cuda').bfloat16()
    x = torch.randn(1, 2 * 14336, device='cuda').bfloat16()
    eager = tg.act_and_mul_linear(x, w, None, 'silu')
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = tg.act_and_mul_linear(x, w, None, 'silu')
    for _ in range(3):
        x.copy_(torch.randn_like(x))
        graph.replay()
        assert torch.equal(out, tg.act_and_mul_linear(x, w, None, 'silu'))
    assert not torch.equal(out, eager)
