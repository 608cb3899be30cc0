"""Fused mixture-of-experts: every token through its top-k experts, as `lmdp.kernels.moe.fused_moe` (the reference).

Two paths, chosen by the number of (token, expert) pairs, which the shapes fix (so each CUDA graph has one):

- **Decode (few pairs): GEMV.** At batch 1 the layer is memory-bound and only the k chosen experts' weights may be
  read. `_gemv_gate_up` has one program per (pair, BLOCK_N rows of I): it streams those rows of the expert's gate
  and up matrices against the token's hidden state and writes `act(gate) * up`; `_gemv_down` has one program per
  (token, BLOCK_N rows of H): it streams the rows of each of the token's k experts' down matrices, weighting and
  summing the k results in registers. Two launches, every weight byte of the chosen experts read once.
- **Batches: grouped GEMM.** `moe_align` sorts the pairs by expert into row blocks of BLOCK_M (one expert per
  block); `_grouped_gate_up` gathers each block's token rows and multiplies them by the block's expert with
  `tl.dot`, keeping gate and up tiles side by side so the gated activation is applied before anything is
  written; `_grouped_down` multiplies that by the expert's down matrix and scales each row by its routing weight;
  `_sum_topk` adds each token's k rows. The grids are sized for the worst case and blocks past the used length
  return at once.

Rounding follows the reference: gate and up round to the model dtype before the activation, as a linear layer's
output would; `act(gate) * up` rounds to the dtype (the down projection's input); each expert's down output rounds
to the dtype before its float32 weight multiplies it. `renormalize` divides each token's weights by their sum
inside the down kernels (no launch of its own).
"""

import torch
import triton
import triton.language as tl

from ... import envs
from ..linear import GATED_ACTS
from ..moe import check_fused_moe
from ._common import dot_precision, grouped_tile, next_pow2, pdl_launch, pdl_wait
from .activation import act_and_mul_f32
from .moe_align import moe_align

_ACT_CODES = {act: i for i, act in enumerate(GATED_ACTS)}   # act_and_mul_f32's codes: silu 0, gelu 1, gelu_tanh 2
# pairs (tokens x top_k) up to which the GEMV path runs; `LMDP_MOE_GEMV_MAX_PAIRS` overrides the default below
GEMV_MAX_PAIRS = envs.LMDP_MOE_GEMV_MAX_PAIRS


@triton.jit
def _gemv_gate_up(X, W, Ids, Inter, stride_xm, stride_we, stride_wn, stride_im,
                  INTER: tl.constexpr, HIDDEN: tl.constexpr, TOP_K: tl.constexpr, ACT: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, USE_PDL: tl.constexpr):
    if USE_PDL:
        pdl_wait()     # the expert ids, and so which weights to read, come from the kernel before
    pair = tl.program_id(0)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < INTER
    offs_k = tl.arange(0, BLOCK_K)
    expert = tl.load(Ids + pair).to(tl.int64)
    g_ptrs = W + expert * stride_we + offs_n.to(tl.int64)[:, None] * stride_wn + offs_k[None, :]
    u_ptrs = g_ptrs + INTER * stride_wn
    x_ptrs = X + (pair // TOP_K).to(tl.int64) * stride_xm + offs_k
    acc_g = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    # HIDDEN is a compile-time constant: the loop unrolls into straight-line loads the compiler can issue early
    for k0 in tl.static_range(0, HIDDEN, BLOCK_K):
        k_mask = offs_k < HIDDEN - k0
        x = tl.load(x_ptrs + k0, mask=k_mask, other=0.0).to(tl.float32)[None, :]
        g = tl.load(g_ptrs + k0, mask=n_mask[:, None] & k_mask[None, :], other=0.0)
        u = tl.load(u_ptrs + k0, mask=n_mask[:, None] & k_mask[None, :], other=0.0)
        # per-lane FMAs; one reduction over K at the end
        acc_g += g.to(tl.float32) * x
        acc_u += u.to(tl.float32) * x
    dtype = Inter.dtype.element_ty
    gate = tl.sum(acc_g, axis=1).to(dtype)
    up = tl.sum(acc_u, axis=1).to(dtype)
    h = act_and_mul_f32(gate, up, ACT)
    tl.store(Inter + pair.to(tl.int64) * stride_im + offs_n, h.to(dtype), mask=n_mask)


@triton.jit
def _routing_weight_scale(TopkWeights, token, TOP_K: tl.constexpr, TOP_K_P2: tl.constexpr, RENORMALIZE: tl.constexpr):
    """1 / (the sum of the token's top-k weights) when renormalising, else 1."""
    if RENORMALIZE:
        slots = tl.arange(0, TOP_K_P2)
        w = tl.load(TopkWeights + token[:, None] * TOP_K + slots[None, :], mask=slots[None, :] < TOP_K, other=0.0)
        return 1.0 / tl.sum(w, axis=1)
    else:
        return tl.full(token.shape, 1.0, tl.float32)


@triton.jit
def _gemv_down(Inter, W, Ids, TopkWeights, Out, stride_im, stride_we, stride_wn, stride_om,
               HIDDEN: tl.constexpr, INTER: tl.constexpr, TOP_K: tl.constexpr, TOP_K_P2: tl.constexpr,
               RENORMALIZE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, USE_PDL: tl.constexpr):
    if USE_PDL:
        pdl_wait()
    token = tl.program_id(0).to(tl.int64)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < HIDDEN
    offs_k = tl.arange(0, BLOCK_K)
    scale = tl.sum(_routing_weight_scale(TopkWeights, tl.full((1, ), 0, tl.int64) + token, TOP_K, TOP_K_P2,
                                         RENORMALIZE), axis=0)
    out = tl.zeros((BLOCK_N, ), dtype=tl.float32)
    # the k experts and the chunks of each are unrolled: every weight load of the program can be in flight at once
    for slot in tl.static_range(TOP_K):
        pair = token * TOP_K + slot
        expert = tl.load(Ids + pair).to(tl.int64)
        weight = tl.load(TopkWeights + pair) * scale
        w_ptrs = W + expert * stride_we + offs_n.to(tl.int64)[:, None] * stride_wn + offs_k[None, :]
        a_ptrs = Inter + pair * stride_im + offs_k
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for k0 in tl.static_range(0, INTER, BLOCK_K):
            k_mask = offs_k < INTER - k0
            a = tl.load(a_ptrs + k0, mask=k_mask, other=0.0).to(tl.float32)[None, :]
            w = tl.load(w_ptrs + k0, mask=n_mask[:, None] & k_mask[None, :], other=0.0)
            acc += w.to(tl.float32) * a
        y = tl.sum(acc, axis=1).to(Out.dtype.element_ty).to(tl.float32)   # the expert's output, rounded
        out += weight * y
    tl.store(Out + token * stride_om + offs_n, out.to(Out.dtype.element_ty), mask=n_mask)


@triton.jit(do_not_specialize=['num_pairs', 'num_blocks'])
def _grouped_gate_up(X, W, Inter, SortedPairs, BlockExperts, NumPadded, num_pairs, inter_size, hidden,
                     num_blocks, stride_xm, stride_we, stride_wn, stride_im,
                     TOP_K: tl.constexpr, ACT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, EVEN_K: tl.constexpr,
                     DOT_PRECISION: tl.constexpr):
    pid_m, pid_n = grouped_tile(tl.program_id(0), num_blocks, tl.cdiv(inter_size, BLOCK_N), GROUP_M)
    if pid_m * BLOCK_M >= tl.load(NumPadded):
        return
    expert = tl.load(BlockExperts + pid_m).to(tl.int64)
    pairs = tl.load(SortedPairs + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    row_mask = pairs < num_pairs
    # padding rows read token 0 and are never stored: no row mask inside the loop
    tokens = tl.where(row_mask, pairs // TOP_K, 0).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < inter_size
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = X + tokens[:, None] * stride_xm + offs_k[None, :]
    g_ptrs = W + expert * stride_we + offs_n.to(tl.int64)[None, :] * stride_wn + offs_k[:, None]
    u_ptrs = g_ptrs + inter_size * stride_wn
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, hidden, BLOCK_K):
        if EVEN_K:
            x = tl.load(x_ptrs)
            g = tl.load(g_ptrs, mask=n_mask[None, :], other=0.0)
            u = tl.load(u_ptrs, mask=n_mask[None, :], other=0.0)
        else:
            k_mask = offs_k < hidden - k0
            x = tl.load(x_ptrs, mask=k_mask[None, :], other=0.0)
            g = tl.load(g_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
            u = tl.load(u_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        acc_g = tl.dot(x, g, acc_g, input_precision=DOT_PRECISION)
        acc_u = tl.dot(x, u, acc_u, input_precision=DOT_PRECISION)
        x_ptrs += BLOCK_K
        g_ptrs += BLOCK_K
        u_ptrs += BLOCK_K
    dtype = Inter.dtype.element_ty
    h = act_and_mul_f32(acc_g.to(dtype), acc_u.to(dtype), ACT)
    out_ptrs = Inter + pairs.to(tl.int64)[:, None] * stride_im + offs_n[None, :]
    tl.store(out_ptrs, h.to(dtype), mask=row_mask[:, None] & n_mask[None, :])


@triton.jit(do_not_specialize=['num_pairs', 'num_blocks'])
def _grouped_down(Inter, W, TopkWeights, PairOut, SortedPairs, BlockExperts, NumPadded, num_pairs, hidden,
                  inter_size, num_blocks, stride_im, stride_we, stride_wn, stride_pm,
                  TOP_K: tl.constexpr, TOP_K_P2: tl.constexpr, RENORMALIZE: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                  EVEN_K: tl.constexpr, DOT_PRECISION: tl.constexpr):
    pid_m, pid_n = grouped_tile(tl.program_id(0), num_blocks, tl.cdiv(hidden, BLOCK_N), GROUP_M)
    if pid_m * BLOCK_M >= tl.load(NumPadded):
        return
    expert = tl.load(BlockExperts + pid_m).to(tl.int64)
    pairs = tl.load(SortedPairs + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    row_mask = pairs < num_pairs
    rows = tl.where(row_mask, pairs, 0).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < hidden
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = Inter + rows[:, None] * stride_im + offs_k[None, :]
    w_ptrs = W + expert * stride_we + offs_n.to(tl.int64)[None, :] * stride_wn + offs_k[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, inter_size, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs)
            w = tl.load(w_ptrs, mask=n_mask[None, :], other=0.0)
        else:
            k_mask = offs_k < inter_size - k0
            a = tl.load(a_ptrs, mask=k_mask[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        acc = tl.dot(a, w, acc, input_precision=DOT_PRECISION)
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    dtype = PairOut.dtype.element_ty
    weight = tl.load(TopkWeights + rows) * _routing_weight_scale(TopkWeights, rows // TOP_K, TOP_K, TOP_K_P2,
                                                                 RENORMALIZE)
    y = acc.to(dtype).to(tl.float32) * weight[:, None]
    tl.store(PairOut + rows[:, None] * stride_pm + offs_n[None, :], y.to(dtype),
             mask=row_mask[:, None] & n_mask[None, :])


@triton.jit
def _sum_topk(PairOut, Out, hidden, stride_pm, stride_om, TOP_K: tl.constexpr, BLOCK: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < hidden
    acc = tl.zeros((BLOCK, ), dtype=tl.float32)
    for slot in tl.static_range(TOP_K):
        acc += tl.load(PairOut + (token * TOP_K + slot) * stride_pm + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(Out + token * stride_om + offs, acc.to(Out.dtype.element_ty), mask=mask)


def gemv_max_pairs(num_experts: int, top_k: int) -> int:
    """Pairs up to which the GEMV path runs: while few pairs share an expert (up to E / 4 pairs, under 12% of
    them do), reading each pair's expert on its own costs little more than the grouped GEMM's one read per expert,
    and the GEMV streams it faster."""
    if GEMV_MAX_PAIRS is not None:
        return GEMV_MAX_PAIRS
    return max(top_k, num_experts // 4)


def gemm_config(num_tokens: int, num_experts: int, top_k: int, n: int, k: int) -> dict:
    """Tiles of a grouped GEMM producing n columns from k inputs, by the expected rows per expert.

    Few rows per expert (decode batches) make the GEMM a stream of expert weights: a row block is sized so that
    nearly every expert's rows fit in one (mean + 3 standard deviations of its count), since a second block reads
    the expert's weights again; K tiles are wide and the loads pipelined. Many rows (prefill) take 128-row tiles for
    tensor-core throughput. `gate_up` keeps two BLOCK_N-wide accumulators, so the caller halves its BLOCK_N."""
    rows = num_tokens * top_k / max(num_experts, 1)
    block_m = min(128, max(16, next_pow2(int(rows + 3 * rows ** 0.5))))
    if rows <= 32:       # memory-bound: stream the weights
        cfg = dict(BLOCK_M=block_m, BLOCK_N=64 if rows <= 4 else 128, BLOCK_K=128, GROUP_M=1, num_warps=4,
                   num_stages=3)
    elif rows <= 96:
        cfg = dict(BLOCK_M=block_m, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8 if block_m >= 128 else 4,
                   num_stages=4)
    else:                # compute-bound (prefill)
        cfg = dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=4)
    cfg['BLOCK_N'] = min(cfg['BLOCK_N'], max(16, next_pow2(n)))
    cfg['BLOCK_K'] = min(cfg['BLOCK_K'], max(16, next_pow2(k)))
    return cfg


def _gemv_config(k: int, act: bool):
    """(BLOCK_N, BLOCK_K, num_warps) of the decode GEMVs: 4 rows (gate_up: 4 of gate and 4 of up) per program
    and chunks of up to 512/1024 along K, about `lmdp.kernels.triton.gemv`'s M = 1 tiles; narrow row blocks give
    down (N = hidden, often 2048) enough programs to keep every SM's loads in flight."""
    return 4, min(512 if act else 1024, max(16, next_pow2(k))), 4


def _fused_moe_gemv(x, gate_up, down, weights, ids, out, renormalize, act_code):
    num_tokens, top_k = ids.shape
    _, two_inter, hidden = gate_up.shape
    inter_size = two_inter // 2
    inter = torch.empty(num_tokens * top_k, inter_size, dtype=x.dtype, device=x.device)
    block_n, block_k, warps = _gemv_config(hidden, act=True)
    _gemv_gate_up[(num_tokens * top_k, triton.cdiv(inter_size, block_n))](
        x, gate_up, ids, inter, x.stride(0), gate_up.stride(0), gate_up.stride(1), inter.stride(0),
        INTER=inter_size, HIDDEN=hidden, TOP_K=top_k, ACT=act_code, BLOCK_N=block_n, BLOCK_K=block_k,
        num_warps=warps, num_stages=1, **pdl_launch(x.device))
    block_n, block_k, warps = _gemv_config(inter_size, act=False)
    _gemv_down[(num_tokens, triton.cdiv(hidden, block_n))](
        inter, down, ids, weights, out, inter.stride(0), down.stride(0), down.stride(1), out.stride(0),
        HIDDEN=hidden, INTER=inter_size, TOP_K=top_k, TOP_K_P2=next_pow2(top_k), RENORMALIZE=renormalize,
        BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps, num_stages=1, **pdl_launch(x.device))
    return out


def _fused_moe_grouped(x, gate_up, down, weights, ids, out, renormalize, act_code, config=None):
    num_tokens, top_k = ids.shape
    num_experts, two_inter, hidden = gate_up.shape
    inter_size = two_inter // 2
    num_pairs = num_tokens * top_k
    up_cfg = dict(config or gemm_config(num_tokens, num_experts, top_k, inter_size, hidden))
    down_cfg = dict(config or gemm_config(num_tokens, num_experts, top_k, hidden, inter_size))
    if config is None:   # gate_up holds two accumulators: half-width tiles keep its registers and smem in bounds
        up_cfg['BLOCK_N'] = max(16, up_cfg['BLOCK_N'] // 2)
    block_m = up_cfg['BLOCK_M']
    sorted_pairs, block_experts, num_padded = moe_align(ids, num_experts, block_m)
    num_blocks = block_experts.numel()
    precision = dot_precision(x)
    inter = torch.empty(num_pairs, inter_size, dtype=x.dtype, device=x.device)
    grid = (num_blocks * triton.cdiv(inter_size, up_cfg['BLOCK_N']), )
    _grouped_gate_up[grid](
        x, gate_up, inter, sorted_pairs, block_experts, num_padded, num_pairs, inter_size, hidden, num_blocks,
        x.stride(0), gate_up.stride(0), gate_up.stride(1), inter.stride(0), TOP_K=top_k, ACT=act_code,
        EVEN_K=hidden % up_cfg['BLOCK_K'] == 0, DOT_PRECISION=precision, **up_cfg)
    pair_out = torch.empty(num_pairs, hidden, dtype=x.dtype, device=x.device)
    grid = (num_blocks * triton.cdiv(hidden, down_cfg['BLOCK_N']), )
    _grouped_down[grid](
        inter, down, weights, pair_out, sorted_pairs, block_experts, num_padded, num_pairs, hidden, inter_size,
        num_blocks, inter.stride(0), down.stride(0), down.stride(1), pair_out.stride(0), TOP_K=top_k,
        TOP_K_P2=next_pow2(top_k), RENORMALIZE=renormalize, EVEN_K=inter_size % down_cfg['BLOCK_K'] == 0,
        DOT_PRECISION=precision, **down_cfg)
    block = min(1024, next_pow2(hidden))
    _sum_topk[(num_tokens, triton.cdiv(hidden, block))](pair_out, out, hidden, pair_out.stride(0), out.stride(0),
                                                        TOP_K=top_k, BLOCK=block, num_warps=4)
    return out


def fused_moe(hidden_states: torch.Tensor, gate_up_weights: torch.Tensor, down_weights: torch.Tensor,
              topk_weights: torch.Tensor, topk_ids: torch.Tensor, renormalize: bool = False, act: str = 'silu',
              path: str | None = None, config: dict | None = None) -> torch.Tensor:
    """The reference's op on the GPU. `path` ('gemv' | 'grouped') and `config` (grouped GEMM tiles for both
    GEMMs: BLOCK_M/N/K, GROUP_M, num_warps, num_stages) override the choice by size (tests, sweeps)."""
    check_fused_moe(hidden_states, gate_up_weights, down_weights, topk_weights, topk_ids, act)
    num_tokens, top_k = topk_ids.shape
    out = torch.empty_like(hidden_states)
    if num_tokens == 0:
        return out
    x = hidden_states if hidden_states.stride(-1) == 1 else hidden_states.contiguous()
    gate_up = gate_up_weights if gate_up_weights.stride(-1) == 1 else gate_up_weights.contiguous()
    down = down_weights if down_weights.stride(-1) == 1 else down_weights.contiguous()
    weights = topk_weights.float().contiguous()
    ids = topk_ids.contiguous()
    act_code = _ACT_CODES[act]
    if path is None:
        path = 'gemv' if num_tokens * top_k <= gemv_max_pairs(gate_up.size(0), top_k) else 'grouped'
    if path == 'gemv':
        return _fused_moe_gemv(x, gate_up, down, weights, ids, out, renormalize, act_code)
    if path == 'grouped':
        return _fused_moe_grouped(x, gate_up, down, weights, ids, out, renormalize, act_code, config)
    raise ValueError(f"fused_moe: path must be 'gemv', 'grouped' or None, got {path!r}")
