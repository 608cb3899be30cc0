"""AWQ 4-bit linear layers (W4A16) in lmdp's layout, as `lmdp.kernels.quant.awq_linear` (the reference).

lmdp repacks AWQ weights at load time so that each output row's codes are contiguous along K (`qweight [N, K/8]`,
input feature `8 j + i` in nibble i of word j; `scales`, `zeros [N, K / G]`): a decode GEMV then streams whole
rows, as the bf16 GEMV does, instead of AutoAWQ's layout, whose rows are input features and whose reads at M = 1
would be 32-byte scraps. Every code is dequantised in registers, `w = (q - z) * s`, exactly, in float32.

- **M = 1, GEMV.** Each program owns BLOCK_N rows and streams them over K in chunks of GROUPS groups, the chunk
  held as `[BLOCK_N, GROUPS, G / 8, 8]` so that a group's scale and zero broadcast over its codes without a gather.
  A code becomes a float by the exponent trick: `(q | 0x4B000000)` read as float32 is `2^23 + q`, and subtracting
  `2^23 + z` gives `q - z` exactly, two full-rate instructions instead of a quarter-rate conversion. Grid
  `cdiv(N, BLOCK_N)`: every weight byte, scale and zero read once.
- **Batches: GEMM.** `_awq_matmul` dequantises each `[BLOCK_N, BLOCK_K]` weight tile to x's dtype in registers
  and multiplies on the tensor cores (`tl.dot`, float32 accumulation); BLOCK_K divides the group, so one scale and
  zero per row per step.
- **Long prefill.** From DEQUANT_MIN_M rows the whole weight is dequantised to x's dtype once (`_awq_dequant`) and
  cuBLAS multiplies: at that size the product's FLOPs dwarf one pass over the weight.

With ACT, x is a fused `[gate | up]` `[M, 2K]` and the input is `act(gate) * up`, rounded to x's dtype as the
activation kernel rounds it (the MLP's activation costs no launch of its own at decode).
"""
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ..linear import gated_act
from ..quant import AWQ_PACK, check_awq_linear
from ._common import dot_precision, grouped_tile, next_pow2
from .activation import act_and_mul_f32

_ACTS = {None: 0, 'silu': 1, 'gelu': 2, 'gelu_tanh': 3}
DEQUANT_MIN_M = 1024
_MAGIC = tl.constexpr(0x4B000000)          # float32 bits of 2^23
_MAGIC_F = tl.constexpr(8388608.0)


@triton.jit
def _load_input(x_ptrs, mask, K, ACT: tl.constexpr):
    if ACT == 0:
        x = tl.load(x_ptrs, mask=mask, other=0.0)
    else:
        g = tl.load(x_ptrs, mask=mask, other=0.0)
        u = tl.load(x_ptrs + K, mask=mask, other=0.0)
        x = act_and_mul_f32(g, u, ACT - 1).to(g.dtype)
    return x


@triton.jit
def _awq_gemv(X, Q, S, Z, Bias, Y, N, K, stride_qn, stride_sn,
              ACT: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, GROUPS: tl.constexpr,
              GROUP: tl.constexpr):
    WORDS: tl.constexpr = GROUP // 8
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_g = tl.arange(0, GROUPS)
    offs_w = tl.arange(0, WORDS)
    offs_i = tl.arange(0, 8)
    words = offs_g[:, None] * WORDS + offs_w[None, :]                          # [GROUPS, WORDS]
    q_ptrs = Q + offs_n.to(tl.int64)[:, None, None] * stride_qn + words[None, :, :]
    kk = words[:, :, None] * 8 + offs_i[None, None, :]                         # [GROUPS, WORDS, 8]
    s_ptrs = S + offs_n.to(tl.int64)[:, None] * stride_sn + offs_g[None, :]
    z_ptrs = Z + offs_n.to(tl.int64)[:, None] * stride_sn + offs_g[None, :]
    shifts = (offs_i * 4)[None, None, None, :]
    acc = tl.zeros((BLOCK_N, GROUPS, WORDS, 8), dtype=tl.float32)
    for k0 in range(0, K, GROUPS * GROUP):
        k_mask = (k0 + kk) < K
        x = _load_input(X + k0 + kk, k_mask, K, ACT).to(tl.float32)
        g_mask = n_mask[:, None] & ((k0 // GROUP + offs_g) * GROUP < K)[None, :]
        s = tl.load(s_ptrs + k0 // GROUP, mask=g_mask, other=0.0).to(tl.float32)
        z = tl.load(z_ptrs + k0 // GROUP, mask=g_mask, other=0).to(tl.float32) + _MAGIC_F
        w_mask = n_mask[:, None, None] & ((k0 // 8 + words) * 8 < K)[None, :, :]
        packed = tl.load(q_ptrs + k0 // 8, mask=w_mask, other=0)
        codes = ((packed[:, :, :, None] >> shifts) & 0xF) | _MAGIC
        q = codes.to(tl.float32, bitcast=True) - z[:, :, None, None]          # q - z, exact
        acc += q * (s[:, :, None, None] * x[None, :, :, :])
    y = tl.sum(tl.sum(tl.sum(acc, axis=3), axis=2), axis=1)
    if HAS_BIAS:
        y += tl.load(Bias + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    tl.store(Y + offs_n, y.to(Y.dtype.element_ty), mask=n_mask)


@triton.jit
def _dequant_tile(packed, s, z, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, dtype: tl.constexpr):
    """`[BLOCK_N, BLOCK_K]` weights in `dtype` from packed words `[BLOCK_N, BLOCK_K / 8]`, one scale and zero per
    row `[BLOCK_N]`."""
    shifts = (tl.arange(0, 8) * 4)[None, None, :]
    codes = ((packed[:, :, None] >> shifts) & 0xF) | _MAGIC
    q = codes.to(tl.float32, bitcast=True) - (z.to(tl.float32) + _MAGIC_F)[:, None, None]
    w = q * s.to(tl.float32)[:, None, None]
    return tl.reshape(w, (BLOCK_N, BLOCK_K)).to(dtype)


@triton.jit(do_not_specialize=['M'])
def _awq_matmul(X, Q, S, Z, Bias, C, M, N, K, stride_xm, stride_qn, stride_sn, stride_cm,
                ACT: tl.constexpr, HAS_BIAS: tl.constexpr, GROUP: tl.constexpr, DOT_PRECISION: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    pid = tl.program_id(0)
    num_m, num_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    pid_m, pid_n = grouped_tile(pid, num_m, num_n, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    offs_w = tl.arange(0, BLOCK_K // 8)
    m_mask, n_mask = offs_m < M, offs_n < N
    x_ptrs = X + offs_m.to(tl.int64)[:, None] * stride_xm + offs_k[None, :]
    q_ptrs = Q + offs_n.to(tl.int64)[:, None] * stride_qn + offs_w[None, :]
    s_ptrs = S + offs_n.to(tl.int64) * stride_sn
    z_ptrs = Z + offs_n.to(tl.int64) * stride_sn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):       # K is a multiple of the group, and BLOCK_K divides the group
        x = _load_input(x_ptrs, m_mask[:, None], K, ACT)
        packed = tl.load(q_ptrs, mask=n_mask[:, None], other=0)
        s = tl.load(s_ptrs + k0 // GROUP, mask=n_mask, other=0.0)
        z = tl.load(z_ptrs + k0 // GROUP, mask=n_mask, other=0)
        w = _dequant_tile(packed, s, z, BLOCK_N, BLOCK_K, x.dtype)
        acc = tl.dot(x, tl.trans(w), acc, input_precision=DOT_PRECISION)
        x_ptrs += BLOCK_K
        q_ptrs += BLOCK_K // 8
    if HAS_BIAS:
        acc += tl.load(Bias + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    c_ptrs = C + offs_m.to(tl.int64)[:, None] * stride_cm + offs_n[None, :]
    tl.store(c_ptrs, acc.to(C.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def _awq_dequant(Q, S, Z, W, N, K, stride_qn, stride_sn, stride_wn, GROUP: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = tl.program_id(1) * BLOCK_K
    n_mask = offs_n < N
    packed = tl.load(Q + offs_n.to(tl.int64)[:, None] * stride_qn + k0 // 8 + tl.arange(0, BLOCK_K // 8)[None, :],
                     mask=n_mask[:, None], other=0)
    s = tl.load(S + offs_n.to(tl.int64) * stride_sn + k0 // GROUP, mask=n_mask, other=0.0)
    z = tl.load(Z + offs_n.to(tl.int64) * stride_sn + k0 // GROUP, mask=n_mask, other=0)
    w = _dequant_tile(packed, s, z, BLOCK_N, BLOCK_K, W.dtype.element_ty)
    offs_k = k0 + tl.arange(0, BLOCK_K)
    tl.store(W + offs_n.to(tl.int64)[:, None] * stride_wn + offs_k[None, :], w, mask=n_mask[:, None])


def gemv_config(n: int, k: int, group: int, act: bool):
    """(BLOCK_N, groups per chunk, num_warps) of the M = 1 GEMV: 8 rows of 512 codes (256 bytes) per chunk."""
    per_chunk = (256 if act else 512) // group if group <= 256 else 1
    return 8, max(1, min(per_chunk, next_pow2(triton.cdiv(k, group)))), 4


def matmul_config(m: int, n: int, group: int):
    """Tiles of `_awq_matmul`; BLOCK_K divides the group (one scale and zero per row per step)."""
    block_k = min(group, 64)
    if m <= 16:
        return dict(BLOCK_M=16, BLOCK_N=32 if n >= 2048 else 16, BLOCK_K=block_k, GROUP_M=1, num_warps=4,
                    num_stages=4)
    if m <= 64:
        return dict(BLOCK_M=max(16, next_pow2(m)), BLOCK_N=64, BLOCK_K=block_k, GROUP_M=1, num_warps=4,
                    num_stages=4)
    return dict(BLOCK_M=64 if m <= 256 else 128, BLOCK_N=128, BLOCK_K=block_k, GROUP_M=8, num_warps=8,
                num_stages=3)


def awq_dequant(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, dtype: torch.dtype):
    """The whole weight `[N, K]` in `dtype` (for cuBLAS at long prefills)."""
    n, k = qweight.size(0), qweight.size(1) * AWQ_PACK
    group = k // scales.size(1)
    w = torch.empty(n, k, dtype=dtype, device=qweight.device)
    block_k = min(group, 128)
    _awq_dequant[(triton.cdiv(n, 32), k // block_k)](qweight, scales, zeros, w, n, k, qweight.stride(0),
                                                     scales.stride(0), w.stride(0), GROUP=group, BLOCK_N=32,
                                                     BLOCK_K=block_k, num_warps=4)
    return w


def awq_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
               bias: torch.Tensor | None = None, act: str | None = None, path: str | None = None,
               config=None) -> torch.Tensor:
    """The reference's op on the GPU. `path` ('gemv' | 'gemm' | 'dequant') and `config` override the choice by
    size (tests, sweeps)."""
    check_awq_linear(x, qweight, scales, zeros, act)
    n, k = qweight.size(0), qweight.size(1) * AWQ_PACK
    group = k // scales.size(1)
    x2 = x.reshape(-1, x.size(-1))
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.size(0)
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return y.view(*x.shape[:-1], n)
    path = path or ('gemv' if m == 1 else 'gemm' if m < DEQUANT_MIN_M else 'dequant')
    code = _ACTS[act]
    if path == 'gemv':
        if m != 1:
            raise ValueError(f'awq_linear: the gemv path takes one row, got {m}')
        block_n, groups, warps = config or gemv_config(n, k, group, act is not None)
        _awq_gemv[(triton.cdiv(n, block_n),)](
            x2, qweight, scales, zeros, bias if bias is not None else y, y, n, k, qweight.stride(0),
            scales.stride(0), ACT=code, HAS_BIAS=bias is not None, BLOCK_N=block_n, GROUPS=groups, GROUP=group,
            num_warps=warps, num_stages=1)
    elif path == 'gemm':
        cfg = dict(config or matmul_config(m, n, group))
        grid = (triton.cdiv(m, cfg['BLOCK_M']) * triton.cdiv(n, cfg['BLOCK_N']),)
        _awq_matmul[grid](x2, qweight, scales, zeros, bias if bias is not None else y, y, m, n, k, x2.stride(0),
                          qweight.stride(0), scales.stride(0), y.stride(0), ACT=code, HAS_BIAS=bias is not None,
                          GROUP=group, DOT_PRECISION=dot_precision(x2), **cfg)
    elif path == 'dequant':
        inp = gated_act(x2, act) if act is not None else x2
        return F.linear(inp, awq_dequant(qweight, scales, zeros, x.dtype), bias).view(*x.shape[:-1], n)
    else:
        raise ValueError(f"awq_linear: path must be 'gemv', 'gemm', 'dequant' or None, got {path!r}")
    return y.view(*x.shape[:-1], n)
