"""The quantised linear kernels (`lmdp.kernels.triton.fp8_linear`, `awq_linear`) against their pure-torch
references (`lmdp.kernels.quant`): every path (GEMV, fused small-M GEMM, pre-quantised / dequantised prefill), with
and without bias and the fused gated activation, on ragged shapes under the Triton interpreter (float32/float16),
and in bfloat16 at real layer sizes on the GPU (tests marked `gpu`)."""
import importlib

import pytest
import torch

from lmdp.kernels import quant

tf = importlib.import_module('lmdp.kernels.triton.fp8_linear')
ta = importlib.import_module('lmdp.kernels.triton.awq_linear')
HAS_CUDA = torch.cuda.is_available()
cpu_only = pytest.mark.skipif(HAS_CUDA, reason='interpreter tests (CPU); the GPU runs the gpu-marked ones')
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason='needs CUDA')


def _fp8_weight(n, k, g, device='cpu'):
    w = torch.randn(n, k, generator=g) / k ** 0.5
    w[: n // 2] *= 4            # blocks of different scale, so a scale read from the wrong block shows
    return [t.to(device) for t in quant.fp8_quantize_blocks(w)]


def _awq_weight(n, k, group, g, device='cpu'):
    w = torch.randn(n, k, generator=g) / k ** 0.5
    codes, scales, zeros = quant.awq_quantize(w, group)
    return quant.pack_rows(codes).to(device), scales.to(device), zeros.to(device)


def _exact_fp8_input(m, k, g, dtype):
    """x whose every group of 128 quantises without rounding: FP8 codes with a group amax of exactly 448 times a
    power-of-two scale. The Triton interpreter rounds float32 -> float8e4nv wrongly near powers of two (126 -> 64,
    ties away from even), as it mis-computes bfloat16 dots; on these inputs the conversion is exact on every
    implementation, so the interpreter tests check the kernels' own arithmetic (scales, blocks, sums, masks)."""
    codes = (torch.randn(m, k, generator=g) * 100).clamp(-440, 440).to(quant.FP8_DTYPE).float()
    codes[:, ::128] = 448.0
    scale = 2.0 ** torch.randint(-6, 2, (m, -(-k // 128)), generator=g).float()
    return (codes * scale.repeat_interleave(128, -1)[:, :k]).to(dtype)


def _rel(y, ref):
    return ((y.float() - ref.float()).norm() / ref.float().norm()).item()


# --- interpreter (CPU) ---

@cpu_only
@pytest.mark.parametrize('path,m', [('gemv', 1), ('fused', 3), ('prequant', 5)])
@pytest.mark.parametrize('n,k', [(200, 256), (72, 320)])      # ragged N, K with a partial last block
@pytest.mark.parametrize('dtype', [torch.float32, torch.float16])
def test_fp8_linear_matches_reference(path, m, n, k, dtype):
    """(The fused gated activation feeds the FP8 rounding values the interpreter would round wrongly: it is
    tested on the GPU, `test_fp8_linear_fused_activation_bf16`.)"""
    act = None
    g = torch.Generator().manual_seed(n * 10 + m)
    weight, scale = _fp8_weight(n, k, g)
    x = _exact_fp8_input(m, k, g, dtype)
    bias = torch.randn(n, generator=g).to(dtype)
    config = (8, 2, 4) if path == 'gemv' else dict(BLOCK_M=16, BLOCK_N=32, GROUP_M=1, num_warps=4, num_stages=1)
    y = tf.fp8_block_linear(x, weight, scale, bias, act, path=path, config=config)
    ref = quant.fp8_block_linear(x, weight, scale, bias, act)
    assert y.shape == ref.shape and y.dtype == dtype
    # the same codes on both sides: the float32 sums differ in order only (float16: one rounding of the output)
    assert _rel(y, ref) < (1e-5 if dtype == torch.float32 else 2e-3)
    # and a weight read with the wrong block scales is far off (the test can see a scale bug)
    assert _rel(quant.fp8_block_linear(x, weight, scale.flatten().roll(1).view_as(scale), bias, act), ref) > 1e-2


@cpu_only
@pytest.mark.parametrize('m', [1, 4])
def test_fp8_linear_per_row_scales(m):
    g = torch.Generator().manual_seed(3)
    n, k = 48, 256
    weight, _ = _fp8_weight(n, k, g)
    scale = torch.rand(n, 2, generator=g) + 0.5         # one scale per output row and 128 inputs
    x = _exact_fp8_input(m, k, g, torch.float32)
    y = tf.fp8_block_linear(x, weight, scale, scale_per_row=True,
                            config=(8, 2, 4) if m == 1 else dict(BLOCK_M=16, BLOCK_N=16, GROUP_M=1, num_warps=4,
                                                                 num_stages=1))
    ref = quant.fp8_block_linear(x, weight, scale, scale_per_row=True)
    assert _rel(y, ref) < 1e-5


@cpu_only
def test_act_quant_matches_reference():
    g = torch.Generator().manual_seed(5)
    x = _exact_fp8_input(6, 300, g, torch.float32) * 3
    q, s = tf.act_quant(x)
    rq, rs = quant.fp8_quantize_groups(x)
    torch.testing.assert_close(s, rs)
    assert torch.equal(q.float(), rq.float())


@cpu_only
@pytest.mark.parametrize('path,m', [('gemv', 1), ('gemm', 3), ('dequant', 5)])
@pytest.mark.parametrize('group', [32, 128])
@pytest.mark.parametrize('act', [None, 'gelu_tanh'])
@pytest.mark.parametrize('dtype', [torch.float32, torch.float16])
def test_awq_linear_matches_reference(path, m, group, act, dtype):
    g = torch.Generator().manual_seed(group + m)
    n, k = 72, 256
    qweight, scales, zeros = _awq_weight(n, k, group, g)
    x = torch.randn(m, 2 * k if act else k, generator=g).to(dtype)
    bias = torch.randn(n, generator=g).to(dtype)
    if path == 'gemv':
        config = (8, 2, 4) if group == 32 else (8, 1, 4)
    elif path == 'gemm':
        config = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=min(group, 64), GROUP_M=1, num_warps=4, num_stages=1)
    else:
        config = None
    y = ta.awq_linear(x, qweight, scales, zeros, bias, act, path=path, config=config)
    ref = quant.awq_linear(x, qweight, scales, zeros, bias, act)
    assert y.shape == ref.shape and y.dtype == dtype
    assert _rel(y, ref) < (1e-5 if dtype == torch.float32 else 2e-3)
    # zero points matter: the same codes read as symmetric (zero 8) are far off
    assert _rel(quant.awq_linear(x, qweight, scales, torch.full_like(zeros, 8), bias, act), ref) > 1e-2


@cpu_only
def test_fp8_moe_reference_is_the_dequantised_experts():
    """fused_moe_fp8 = fused_moe over dequantised experts (per-row scales), and it refuses mismatched scales."""
    from lmdp.kernels.moe import fused_moe
    g = torch.Generator().manual_seed(0)
    e, h, i, t = 4, 128, 48, 5
    gu, gus = quant.fp8_quantize_blocks(torch.randn(e, 2 * i, h, generator=g))
    dn, dns = quant.fp8_quantize_blocks(torch.randn(e, h, i, generator=g))
    gus_rows = gus.repeat_interleave(128, 1)[:, :2 * i]
    dns_rows = dns.repeat_interleave(128, 1)[:, :h]
    x = torch.randn(t, h, generator=g)
    w, ids = torch.rand(t, 2, generator=g), torch.randint(0, e, (t, 2), generator=g)
    y = quant.fused_moe_fp8(x, gu, gus_rows, dn, dns_rows, w, ids, True, 'silu')
    ref = fused_moe(x, quant.fp8_block_dequant(gu, gus), quant.fp8_block_dequant(dn, dns), w, ids, True, 'silu')
    torch.testing.assert_close(y, ref)
    with pytest.raises(ValueError, match='scales'):
        quant.fused_moe_fp8(x, gu, gus, dn, dns_rows, w, ids)


# --- GPU, bfloat16, real sizes ---

SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336)]     # (N, K): q/o, gate|up, down of an 8B layer
MS = [1, 2, 8, 32, 100, 512]


@gpu
@needs_cuda
@pytest.mark.parametrize('n,k', SHAPES)
@pytest.mark.parametrize('m', MS)
def test_fp8_linear_bf16_real_sizes(n, k, m):
    g = torch.Generator().manual_seed(m)
    weight, scale = _fp8_weight(n, k, g, 'cuda')
    x = torch.randn(m, k, generator=g).to('cuda', torch.bfloat16)
    y = tf.fp8_block_linear(x, weight, scale)
    ref = quant.fp8_block_linear(x, weight, scale)
    # bf16 input: both sides quantise the same bf16 values; the float32 sums differ in order, a code may flip at
    # a rounding tie, and the output rounds once to bf16
    assert _rel(y, ref) < 1e-2


@gpu
@needs_cuda
@pytest.mark.parametrize('n,k', SHAPES)
@pytest.mark.parametrize('m', MS)
def test_awq_linear_bf16_real_sizes(n, k, m):
    g = torch.Generator().manual_seed(m)
    qweight, scales, zeros = _awq_weight(n, k, 128, g, 'cuda')
    x = torch.randn(m, k, generator=g).to('cuda', torch.bfloat16)
    y = ta.awq_linear(x, qweight, scales, zeros)
    ref = quant.awq_linear(x, qweight, scales, zeros)
    assert _rel(y, ref) < 1e-2


@gpu
@needs_cuda
@pytest.mark.parametrize('act', ['silu'])
def test_quant_gemv_fused_activation_bf16(act):
    g = torch.Generator().manual_seed(1)
    n, k = 4096, 14336
    x = torch.randn(1, 2 * k, generator=g).to('cuda', torch.bfloat16)
    weight, scale = _fp8_weight(n, k, g, 'cuda')
    assert _rel(tf.fp8_block_linear(x, weight, scale, act=act), quant.fp8_block_linear(x, weight, scale, act=act)) \
        < 1e-2
    qweight, scales, zeros = _awq_weight(n, k, 128, g, 'cuda')
    assert _rel(ta.awq_linear(x, qweight, scales, zeros, act=act),
                quant.awq_linear(x, qweight, scales, zeros, act=act)) < 1e-2


@gpu
@needs_cuda
@pytest.mark.parametrize('m', [1, 4, 200])
def test_fp8_linear_fused_activation_bf16(m):
    g = torch.Generator().manual_seed(m)
    n, k = 4096, 14336
    x = torch.randn(m, 2 * k, generator=g).to('cuda', torch.bfloat16)
    weight, scale = _fp8_weight(n, k, g, 'cuda')
    ref = quant.fp8_block_linear(x, weight, scale, act='silu')
    assert _rel(tf.fp8_block_linear(x, weight, scale, act='silu'), ref) < 1e-2
    assert _rel(tf.fp8_block_linear(x, weight, scale, act='gelu'), ref) > 1e-2


@gpu
@needs_cuda
def test_quant_linear_in_a_cuda_graph():
    g = torch.Generator().manual_seed(2)
    n, k = 4096, 4096
    weight, scale = _fp8_weight(n, k, g, 'cuda')
    qweight, scales, zeros = _awq_weight(n, k, 128, g, 'cuda')
    x = torch.randn(1, k, generator=g).to('cuda', torch.bfloat16)
    eager = (tf.fp8_block_linear(x, weight, scale), ta.awq_linear(x, qweight, scales, zeros))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = (tf.fp8_block_linear(x, weight, scale), ta.awq_linear(x, qweight, scales, zeros))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out[0], eager[0]) and torch.equal(out[1], eager[1])
