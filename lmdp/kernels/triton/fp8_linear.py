"""FP8 linear layers with 128x128 block-scaled weights, as `lmdp.kernels.quant.fp8_block_linear` (the reference).

The input is quantised per token and group of 128 features (`sx = amax / 448`), then `y = sum over K blocks of
(xq . wq) * sx * sw`, accumulated in float32 and rounded once. Three paths, by the number of rows M (the shapes
fix the path, so each CUDA graph holds one):

- **M = 1, GEMV.** Memory-bound: all the time goes into reading W once. Each program owns BLOCK_N output rows and
  streams them over K in chunks of BLOCK_K (a multiple of 128), quantising the input chunk in registers (every
  program redoes it: the input is K values, a weight row is K bytes) and multiplying in float32, the chunk held
  as `[BLOCK_N, BLOCK_K / 128, 128]` so that each weight scale broadcasts over its block without a gather. Grid
  `cdiv(N, BLOCK_N)`, the bf16 GEMV's shape (`gemv.py`): every weight byte and scale read once, hundreds of
  programs in flight.
- **Small M (decode batches), fused.** `_fp8_matmul` with QUANT_A: a `[BLOCK_M, 128]` tile of the input is
  quantised in registers and multiplied by the weight tile on the FP8 tensor cores (`tl.dot` on float8e4nv),
  narrow BLOCK_N so that there are enough programs. No separate quantisation launch.
- **Prefill, two launches.** `_act_quant` writes the input's codes and scales once, then `_fp8_matmul` runs
  128x128 tiles on the FP8 tensor cores; re-quantising the input in every column tile would cost more CUDA-core
  work than the tensor cores' multiply.

With ACT, x is a fused `[gate | up]` `[M, 2K]` and the layer's input is `act(gate) * up`, rounded to x's dtype as
the activation kernel rounds it, then quantised: the MLP's down projection needs no activation launch.
`scale_per_row`: the weight keeps one scale row per output row (`[N, K / 128]`) instead of per 128 rows.
"""
import torch
import triton
import triton.language as tl

from ..quant import FP8_EPS, FP8_GROUP, FP8_MAX, check_fp8_linear
from ._common import grouped_tile, next_pow2
from .activation import act_and_mul_f32

_ACTS = {None: 0, 'silu': 1, 'gelu': 2, 'gelu_tanh': 3}
# rows from which the input is quantised by a kernel of its own before the GEMM (prefill)
PREQUANT_MIN_M = 128


@triton.jit
def _load_input(x_ptrs, mask, K, ACT: tl.constexpr):
    """A tile of the layer's input in float32; with ACT, `act(gate) * up` from the fused row (up at +K), rounded to
    x's dtype first."""
    if ACT == 0:
        x = tl.load(x_ptrs, mask=mask, other=0.0)
    else:
        g = tl.load(x_ptrs, mask=mask, other=0.0)
        u = tl.load(x_ptrs + K, mask=mask, other=0.0)
        x = act_and_mul_f32(g, u, ACT - 1).to(g.dtype)
    return x.to(tl.float32)


@triton.jit
def _quantize(x, axis: tl.constexpr):
    """(codes, scales) of float32 x, one scale per slice along `axis` (a group of 128)."""
    s = tl.maximum(tl.max(tl.abs(x), axis=axis), 1e-10) / 448.0
    q = tl.clamp(x / tl.expand_dims(s, axis), -448.0, 448.0).to(tl.float8e4nv)
    return q, s


@triton.jit
def _act_quant(X, Q, S, K, stride_xm, stride_qm, stride_sm, ACT: tl.constexpr, GROUP: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    g = tl.program_id(1)
    offs = g * GROUP + tl.arange(0, GROUP)
    mask = offs < K
    x = _load_input(X + row * stride_xm + offs, mask, K, ACT)
    q, s = _quantize(x[None, :], 1)
    tl.store(Q + row * stride_qm + offs[None, :], q, mask=mask[None, :])
    tl.store(S + row * stride_sm + g + tl.arange(0, 1), s)


@triton.jit
def _fp8_gemv(X, W, Ws, Bias, Y, N, K, stride_xm, stride_wn, stride_wsn,
              ACT: tl.constexpr, HAS_BIAS: tl.constexpr, SCALE_PER_ROW: tl.constexpr, BLOCK_N: tl.constexpr,
              GROUPS: tl.constexpr, GROUP: tl.constexpr):
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_g = tl.arange(0, GROUPS)
    offs_j = tl.arange(0, GROUP)
    kk = offs_g[:, None] * GROUP + offs_j[None, :]                        # [GROUPS, GROUP]: k within the chunk
    w_ptrs = W + offs_n.to(tl.int64)[:, None, None] * stride_wn + kk[None, :, :]
    srow = offs_n if SCALE_PER_ROW else offs_n // GROUP
    ws_ptrs = Ws + srow.to(tl.int64)[:, None] * stride_wsn + offs_g[None, :]
    acc = tl.zeros((BLOCK_N, GROUPS, GROUP), dtype=tl.float32)
    for k0 in range(0, K, GROUPS * GROUP):
        k_mask = (k0 + kk) < K
        x = _load_input(X + k0 + kk, k_mask, K, ACT)                     # one row: X already points at it
        xq, xs = _quantize(x, 1)
        xd = xq.to(tl.float32) * xs[:, None]
        g_mask = (k0 // GROUP + offs_g) * GROUP < K
        ws = tl.load(ws_ptrs + k0 // GROUP, mask=n_mask[:, None] & g_mask[None, :], other=0.0)
        w = tl.load(w_ptrs + k0, mask=n_mask[:, None, None] & k_mask[None, :, :], other=0.0)
        acc += w.to(tl.float32) * (ws[:, :, None] * xd[None, :, :])
    y = tl.sum(tl.sum(acc, axis=2), axis=1)
    if HAS_BIAS:
        y += tl.load(Bias + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    tl.store(Y + offs_n, y.to(Y.dtype.element_ty), mask=n_mask)


@triton.jit(do_not_specialize=['M'])
def _fp8_matmul(A, As, W, Ws, Bias, C, M, N, K, stride_am, stride_asm, stride_wn, stride_wsn, stride_cm,
                QUANT_A: tl.constexpr, ACT: tl.constexpr, HAS_BIAS: tl.constexpr, SCALE_PER_ROW: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    pid = tl.program_id(0)
    num_m, num_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    pid_m, pid_n = grouped_tile(pid, num_m, num_n, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask, n_mask = offs_m < M, offs_n < N
    a_ptrs = A + offs_m.to(tl.int64)[:, None] * stride_am + offs_k[None, :]
    w_ptrs = W + offs_n.to(tl.int64)[None, :] * stride_wn + offs_k[:, None]     # [BLOCK_K, BLOCK_N]
    srow = offs_n if SCALE_PER_ROW else offs_n // BLOCK_K
    ws_ptrs = Ws + srow.to(tl.int64) * stride_wsn
    as_ptrs = As + offs_m.to(tl.int64) * stride_asm
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(0, tl.cdiv(K, BLOCK_K)):
        k_mask = offs_k < K - kb * BLOCK_K
        if QUANT_A:
            a, a_s = _quantize(_load_input(a_ptrs, m_mask[:, None] & k_mask[None, :], K, ACT), 1)
        else:
            a = tl.load(a_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
            a_s = tl.load(as_ptrs + kb, mask=m_mask, other=0.0)
        w = tl.load(w_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        w_s = tl.load(ws_ptrs + kb, mask=n_mask, other=0.0)
        acc += tl.dot(a, w) * a_s[:, None] * w_s[None, :]
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    if HAS_BIAS:
        acc += tl.load(Bias + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    c_ptrs = C + offs_m.to(tl.int64)[:, None] * stride_cm + offs_n[None, :]
    tl.store(c_ptrs, acc.to(C.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


def act_quant(x: torch.Tensor, act: str | None = None):
    """`(codes float8 [M, K], scales float32 [M, K / 128])` of x `[M, K]` (`[M, 2K]` fused gate/up with act)."""
    m = x.size(0)
    k = x.size(1) // (2 if act else 1)
    q = torch.empty(m, k, dtype=torch.float8_e4m3fn, device=x.device)
    s = torch.empty(m, triton.cdiv(k, FP8_GROUP), dtype=torch.float32, device=x.device)
    if m:
        _act_quant[(m, s.size(1))](x, q, s, k, x.stride(0), q.stride(0), s.stride(0), ACT=_ACTS[act],
                                   GROUP=FP8_GROUP, num_warps=1)
    return q, s


def gemv_config(n: int, k: int, act: bool):
    """(BLOCK_N, groups of 128 per chunk, num_warps) of the M = 1 GEMV: 8 rows of 1024 bytes, as the bf16 GEMV's
    best tile moves 8 rows of 2048 bytes; half the chunk with a gated input (two loads per element)."""
    groups = min(4 if act else 8, next_pow2(triton.cdiv(k, FP8_GROUP)))
    return 8, groups, 4


def matmul_config(m: int, n: int):
    """Tiles of `_fp8_matmul`: narrow columns at decode sizes (enough programs to stream W), 128x128 for prefill."""
    if m <= 16:
        return dict(BLOCK_M=16, BLOCK_N=32 if n >= 2048 else 16, GROUP_M=1, num_warps=4, num_stages=4)
    if m <= 64:
        return dict(BLOCK_M=max(16, next_pow2(m)), BLOCK_N=64, GROUP_M=1, num_warps=4, num_stages=4)
    if m < PREQUANT_MIN_M:
        return dict(BLOCK_M=64, BLOCK_N=128, GROUP_M=8, num_warps=4, num_stages=3)
    return dict(BLOCK_M=128, BLOCK_N=128, GROUP_M=8, num_warps=8, num_stages=3)


def fp8_block_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None,
                     act: str | None = None, scale_per_row: bool = False, path: str | None = None,
                     config: dict | None = None) -> torch.Tensor:
    """The reference's op on the GPU. `path` ('gemv' | 'fused' | 'prequant') and `config` (tiles) override the
    choice by size (tests, sweeps)."""
    check_fp8_linear(x, weight, scale, scale_per_row, act)
    n, k = weight.shape
    x2 = x.reshape(-1, x.size(-1))
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.size(0)
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return y.view(*x.shape[:-1], n)
    weight = weight if weight.stride(-1) == 1 else weight.contiguous()
    path = path or ('gemv' if m == 1 else 'fused' if m < PREQUANT_MIN_M else 'prequant')
    code = _ACTS[act]
    if path == 'gemv':
        if m != 1:
            raise ValueError(f'fp8_block_linear: the gemv path takes one row, got {m}')
        block_n, groups, warps = config or gemv_config(n, k, act is not None)
        _fp8_gemv[(triton.cdiv(n, block_n),)](
            x2, weight, scale, bias if bias is not None else y, y, n, k, x2.stride(0), weight.stride(0),
            scale.stride(0), ACT=code, HAS_BIAS=bias is not None, SCALE_PER_ROW=scale_per_row, BLOCK_N=block_n,
            GROUPS=groups, GROUP=FP8_GROUP, num_warps=warps, num_stages=1)
        return y.view(*x.shape[:-1], n)
    cfg = dict(config or matmul_config(m, n))
    if path == 'fused':
        a, a_s, quant_a = x2, y, True            # a_s unused
    elif path == 'prequant':
        a, a_s = act_quant(x2, act)
        quant_a, code = False, 0
    else:
        raise ValueError(f"fp8_block_linear: path must be 'gemv', 'fused', 'prequant' or None, got {path!r}")
    grid = (triton.cdiv(m, cfg['BLOCK_M']) * triton.cdiv(n, cfg['BLOCK_N']),)
    _fp8_matmul[grid](
        a, a_s, weight, scale, bias if bias is not None else y, y, m, n, k, a.stride(0), a_s.stride(0),
        weight.stride(0), scale.stride(0), y.stride(0), QUANT_A=quant_a, ACT=code, HAS_BIAS=bias is not None,
        SCALE_PER_ROW=scale_per_row, BLOCK_K=FP8_GROUP, **cfg)
    return y.view(*x.shape[:-1], n)


__all__ = ['FP8_EPS', 'FP8_MAX', 'act_quant', 'fp8_block_linear']
