"""Skinny matrix products for decode: `y[M, N] = x[M, K] @ W[N, K]^T (+ b)` for a handful of rows M.

At batch 1-4 a decode step's linear layers are matrix-vector products: all the time goes into reading W once, and
cuBLAS's GEMM kernels leave bandwidth on the table at M = 1 (their tiles are built for large M, and K-heavy shapes
add a split-K reduce launch). Here each program owns BLOCK_N output features and streams their rows of W over K
in BLOCK_K chunks, so every byte of W is read exactly once and there is no second launch. Grid `cdiv(N, BLOCK_N)`,
which depends on the shape alone (CUDA-graph safe).

Three ways to do the multiply-adds (MODE), picked per shape by `_config`:
  0  keep a [BLOCK_M, BLOCK_N, BLOCK_K] float32 accumulator and reduce over K once at the end: the loop is loads
     and FMAs only (best at M = 1, where the accumulator is small);
  1  reduce each chunk into a [BLOCK_M, BLOCK_N] accumulator (fewer registers for larger M);
  2  `tl.dot` on x padded to 16 rows (tensor cores; Triton pipelines the loads of W across stages).

With ACT set, x is a fused `[gate | up]` projection `[M, 2K]` and the program computes `act(gate) * up` while
reading it, rounded to x's dtype exactly as the separate activation kernel rounds it: the MLP's activation costs no
launch. Accumulation is float32; the output is rounded once, like cuBLAS.
"""

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ... import envs
from ..linear import check_act_and_mul_linear
from ._common import next_pow2, pdl_launch, pdl_wait
from .activation import _gated, act_and_mul_f32

# rows up to which the GEMV kernel replaces cuBLAS (decode graphs of batch 1, 2, 4...)
GEMV_MAX_M = envs.LMDP_GEMV_MAX_M
_ACTS = {None: 0, 'silu': 1, 'gelu': 2, 'gelu_tanh': 3}


@triton.jit
def _load_x(x_ptrs, mask, K, ACT: tl.constexpr):
    """A chunk of the GEMV's input; with ACT, `act(gate) * up` from the fused gate/up row (gate at k, up at K + k)."""
    if ACT == 0:
        x = tl.load(x_ptrs, mask=mask, other=0.0)
    else:
        g = tl.load(x_ptrs, mask=mask, other=0.0)
        u = tl.load(x_ptrs + K, mask=mask, other=0.0)
        # rounded to x's dtype as the separate activation kernel's output is (ACT 1.. -> its codes 0..)
        x = act_and_mul_f32(g, u, ACT - 1).to(g.dtype)
    return x


@triton.jit
def _load_w(w_ptrs, n_mask, k_mask, EVEN_N: tl.constexpr, EVEN_K: tl.constexpr):
    if EVEN_K:
        if EVEN_N:
            return tl.load(w_ptrs)
        return tl.load(w_ptrs, mask=n_mask[:, None], other=0.0)
    return tl.load(w_ptrs, mask=n_mask[:, None] & k_mask[None, :], other=0.0)


@triton.jit
def _multiply_add(acc, x, w, MODE: tl.constexpr):
    """acc += x . w over a K chunk: acc is [BLOCK_M, BLOCK_N, BLOCK_K] in mode 0, [BLOCK_M, BLOCK_N] otherwise."""
    if MODE == 0:
        acc += x.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :]
    elif MODE == 1:
        acc += tl.sum(x.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :], axis=2)
    else:
        acc += tl.dot(x.to(w.dtype), tl.trans(w))
    return acc


@triton.jit
def _gemv_kernel(X, W, Bias, Y, M, N, K,
                 stride_xm, stride_wn, stride_ym,
                 ACT: tl.constexpr, HAS_BIAS: tl.constexpr, MODE: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 EVEN_N: tl.constexpr, EVEN_K: tl.constexpr, USE_PDL: tl.constexpr):
    pid = tl.program_id(0)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask = offs_m < M
    n_mask = offs_n < N
    w_ptrs = W + offs_n.to(tl.int64)[:, None] * stride_wn + offs_k[None, :]
    x_ptrs = X + offs_m.to(tl.int64)[:, None] * stride_xm + offs_k[None, :]
    if MODE == 0:
        acc = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_K), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # The first K chunk is peeled: as a programmatic dependent, its weights (which no kernel writes) are read
    # while the kernel before drains, and only x waits for it.
    k_mask = offs_k < K
    w = _load_w(w_ptrs, n_mask, k_mask, EVEN_N, EVEN_K)
    if USE_PDL:
        pdl_wait()
    if EVEN_K:
        x = _load_x(x_ptrs, m_mask[:, None], K, ACT)
    else:
        x = _load_x(x_ptrs, m_mask[:, None] & k_mask[None, :], K, ACT)
    acc = _multiply_add(acc, x, w, MODE)
    for k0 in range(BLOCK_K, K, BLOCK_K):
        w_ptrs += BLOCK_K
        x_ptrs += BLOCK_K
        k_mask = (k0 + offs_k) < K
        if EVEN_K:
            x = _load_x(x_ptrs, m_mask[:, None], K, ACT)
        else:
            x = _load_x(x_ptrs, m_mask[:, None] & k_mask[None, :], K, ACT)
        w = _load_w(w_ptrs, n_mask, k_mask, EVEN_N, EVEN_K)
        acc = _multiply_add(acc, x, w, MODE)
    if MODE == 0:
        acc = tl.sum(acc, axis=2)
    if HAS_BIAS:
        acc += tl.load(Bias + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    y_ptrs = Y + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :]
    tl.store(y_ptrs, acc.to(Y.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


def _config(m: int, n: int, k: int, act: bool = False):
    """(MODE, BLOCK_N, BLOCK_K, num_warps, num_stages) for an M x N x K product, from `bench_gemv --sweep` on an
    H100 (Llama-3-8B layer shapes; `notes/performance.md`)."""
    if m == 1:
        # 8 rows of W per program, 1024-wide chunks (the sweep's best at M = 1)
        return (0, 4, 512, 8, 1) if act else (0, 8, 1024, 4, 1)
    if act or n <= 4096:
        return 0, 4 if m <= 2 else 8, 512, 4, 1
    return 2, 32, 128, 4, 4  # tensor cores on x padded to 16 rows


def gemv_eligible(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the GEMV kernel serves this product: few rows, half precision, unit stride on K."""
    k = weight.size(-1)
    return (x.dtype in (torch.float16, torch.bfloat16) and weight.dtype == x.dtype and weight.dim() == 2
            and weight.stride(-1) == 1 and x.stride(-1) == 1 and x.numel() // max(x.size(-1), 1) <= GEMV_MAX_M
            and k % 8 == 0)


def gemv(x2: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, act: str | None = None,
         config=None) -> torch.Tensor:
    """`[M, K] x [N, K]^T` (x2 `[M, 2K]` with act); `config` overrides `_config` (benchmark sweeps)."""
    m = x2.size(0)
    n, k = weight.shape
    y = torch.empty(m, n, dtype=x2.dtype, device=x2.device)
    if m == 0 or n == 0:
        return y
    mode, block_n, block_k, num_warps, num_stages = config or _config(m, n, k, act is not None)
    block_k = min(block_k, max(16, next_pow2(k)))
    block_m = 16 if mode == 2 else max(1, next_pow2(m))
    _gemv_kernel[(triton.cdiv(n, block_n),)](
        x2, weight, bias if bias is not None else y, y, m, n, k,
        x2.stride(0), weight.stride(0), y.stride(0),
        ACT=_ACTS[act], HAS_BIAS=bias is not None, MODE=mode,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        EVEN_N=n % block_n == 0, EVEN_K=k % block_k == 0,
        num_warps=num_warps, num_stages=num_stages, **pdl_launch(x2.device),
    )
    return y


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear` with the GEMV kernel for decode-sized inputs, cuBLAS otherwise."""
    if not gemv_eligible(x, weight) or x.size(-1) != weight.size(-1):
        return F.linear(x, weight, bias)
    y = gemv(x.reshape(-1, x.size(-1)), weight, bias)
    return y.view(*x.shape[:-1], weight.size(0))


def act_and_mul_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                       act: str = 'silu') -> torch.Tensor:
    """`F.linear(act(gate) * up, W, b)` for x = [gate | up]: one launch for decode-sized inputs."""
    check_act_and_mul_linear(x, weight, act)
    if not gemv_eligible(x, weight):
        return F.linear(_gated(x, _ACTS[act] - 1), weight, bias)
    y = gemv(x.reshape(-1, x.size(-1)), weight, bias, act=act)
    return y.view(*x.shape[:-1], weight.size(0))
