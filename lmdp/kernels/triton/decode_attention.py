"""Decode attention (one query token per sequence) over the paged KV cache: flash-decoding.

Grid `(Hk * head_blocks, batch, num_splits)`. Each program takes the query heads of one KV group (padded to a
tile of >= 16 rows so the scores are a tensor-core `tl.dot`) and one split of the sequence's keys, so every K/V
element is read from memory once per group. The split boundaries are computed in the kernel from the sequence's
own length, so the grid depends only on `num_splits`: the kernel is CUDA-graph safe, and the same graph serves any
context length. Inside a split the keys are walked in tiles of BLOCK_N; each key's physical block comes from the
block table (`pos // PAGE_SIZE`), so BLOCK_N is independent of the cache's block size.

With a single split the program writes the output directly. With several, each split leaves a normalised partial
output and its log-sum-exp (base 2), and `_reduce_kernel` merges them. Opt-in (`fused_reduce=True` or
`LMDP_DECODE_FUSED_REDUCE=1`), the partials are merged in the same launch instead: every split program of a
(sequence, head block) bumps an int32 arrival counter after its partial is stored, and the one that arrives last
merges all the partials of its heads, writes the output and puts the counter back to 0. It saves a launch, but the
serial merge in one program costs about as much as the launch it saves (measurements: notes/performance.md), so the
two-kernel path is the default.

The counters live in one persistent, zero-initialised buffer per device (`_arrival_counters`), which is never
memset again: every launch leaves all the counters it used at 0. It is allocated eagerly (the graph runner runs a
step eagerly before capturing it); a call that would have to grow it while a CUDA graph is being captured takes
the two-kernel path instead (also selectable with `fused_reduce=False`). Launches that share the buffer must not
run concurrently (two streams at once): they would count into the same counters.

Ordering: the partial stores of all threads of a program come before a CTA barrier, then one atomic add with
acquire-release semantics at GPU scope publishes them (release) and, in the last arriver, makes the other
programs' partials visible (acquire); the merge loads bypass L1 (see `_merge_splits`).
"""
import math

import torch
import triton
import triton.language as tl

from ... import envs
from ._common import dot_precision, next_pow2, num_sms, pdl_launch, pdl_wait, tanh

# a split gets at least this many keys (fewer splits for short contexts: the reduce isn't free)
_MIN_KEYS_PER_SPLIT = 256
_MAX_SPLITS = 64


@triton.jit
def _merge_splits(PartO, PartLse, part_row, offs_dv, dv_mask, stride_ps,
                  HEAD_DIM_V: tl.constexpr, BLOCK_DV: tl.constexpr, NUM_SPLITS: tl.constexpr, SPLITS_P2: tl.constexpr,
                  CHUNK_S: tl.constexpr):
    """The merged output `[BLOCK_DV]` (float32) of one query head from its NUM_SPLITS partials, which start at
    `part_row` (split s at `part_row + s * stride_ps` in PartLse, times HEAD_DIM_V in PartO): max of the lse,
    weights exp2(lse - max), divided by their sum. Empty splits (lse = -inf) weigh 0; with none live the output is 0.

    In the split kernel the partials were stored by other programs of the same launch, running on other SMs. The
    memory model already orders these loads after those stores (their CTA barrier + release atomic, our acquire
    atomic + the CTA barrier that broadcasts its result), but the atomic is executed by one thread and these loads
    are plain weak loads of the other threads, so they are also made `.cg`: served by L2, where every SM's stores
    land, never by this SM's L1, which is not coherent with other SMs. That way correctness does not hinge on how
    the acquire treats L1 for loads of other threads. (From `_reduce_kernel`, a later launch, `.cg` is harmless.)
    Up to CHUNK_S splits, the lse and the partial outputs are loaded at once (one L2 round trip); beyond, the lse
    first, then the weighted sum over chunks of CHUNK_S splits, which bounds the registers of the
    `[CHUNK_S, BLOCK_DV]` tile. Both paths (fused and `_reduce_kernel`) call this same function, so they give the
    same numbers."""
    if CHUNK_S == SPLITS_P2:
        offs_s = tl.arange(0, SPLITS_P2)
        s_mask = offs_s < NUM_SPLITS
        part = part_row + offs_s * stride_ps
        lse = tl.load(PartLse + part, mask=s_mask, other=float('-inf'), cache_modifier='.cg')
        # masked on s_mask only (not on lse > -inf), so that this load need not wait for the lse load; an empty
        # split stored zeros, and tl.where (not a multiply by w = 0) keeps any non-finite value out regardless
        o = tl.load(PartO + part[:, None] * HEAD_DIM_V + offs_dv[None, :], mask=s_mask[:, None] & dv_mask[None, :],
                    other=0.0, cache_modifier='.cg')
        live = lse > float('-inf')
        mx = tl.max(lse, 0)
        mx = tl.where(mx > float('-inf'), mx, 0.0)
        w = tl.where(live, tl.exp2(lse - mx), 0.0)
        denom = tl.sum(w, 0)
        res = tl.sum(tl.where(live[:, None], o * w[:, None], 0.0), 0)
    else:
        offs_s = tl.arange(0, SPLITS_P2)
        lse_all = tl.load(PartLse + part_row + offs_s * stride_ps, mask=offs_s < NUM_SPLITS, other=float('-inf'),
                          cache_modifier='.cg')
        mx = tl.max(lse_all, 0)
        mx = tl.where(mx > float('-inf'), mx, 0.0)
        denom = tl.sum(tl.where(lse_all > float('-inf'), tl.exp2(lse_all - mx), 0.0), 0)
        res = tl.zeros([BLOCK_DV], dtype=tl.float32)
        for s0 in range(0, NUM_SPLITS, CHUNK_S):
            offs_c = s0 + tl.arange(0, CHUNK_S)
            c_mask = offs_c < NUM_SPLITS
            part = part_row + offs_c * stride_ps
            lse = tl.load(PartLse + part, mask=c_mask, other=float('-inf'), cache_modifier='.cg')
            o = tl.load(PartO + part[:, None] * HEAD_DIM_V + offs_dv[None, :],
                        mask=c_mask[:, None] & dv_mask[None, :], other=0.0, cache_modifier='.cg')
            live = lse > float('-inf')
            w = tl.where(live, tl.exp2(lse - mx), 0.0)
            res += tl.sum(tl.where(live[:, None], o * w[:, None], 0.0), 0)
    return res / tl.where(denom > 0, denom, 1.0)


@triton.jit
def _decode_split_kernel(
    Q, K, V, BlockOffsets, QStartLoc, QSeqlens, KVSeqlens, Out, PartO, PartLse, Counters,
    sm_scale, softcap, window,
    stride_qt, stride_qh, stride_qd,
    stride_kb, stride_ks, stride_kh, stride_kd,
    stride_vb, stride_vs, stride_vh, stride_vd,
    stride_bo,
    stride_ot, stride_oh, stride_od,
    stride_pb, stride_ph, stride_ps,
    GROUP: tl.constexpr, HEAD_BLOCKS: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_N: tl.constexpr,
    PAGE_SIZE: tl.constexpr, NUM_SPLITS: tl.constexpr, FUSED_REDUCE: tl.constexpr,
    SPLITS_P2: tl.constexpr, CHUNK_S: tl.constexpr,
    USE_SOFTCAP: tl.constexpr, USE_WINDOW: tl.constexpr, DOT_PRECISION: tl.constexpr, USE_PDL: tl.constexpr,
):
    if USE_PDL:
        pdl_wait()     # q and this step's keys were written by the kernels just before
    pid_h = tl.program_id(0)
    b = tl.program_id(1)
    split = tl.program_id(2)
    kv_head = pid_h // HEAD_BLOCKS
    head_block = pid_h % HEAD_BLOCKS

    q_len = tl.load(QSeqlens + b)
    if q_len == 0:
        # every split of this row returns here, so none of them counts and its counter stays at 0
        return
    kv_len = tl.load(KVSeqlens + b).to(tl.int32)
    tok = tl.load(QStartLoc + b).to(tl.int64)

    # this split's key range
    lo = 0
    if USE_WINDOW:
        lo = tl.maximum(kv_len - window, 0)
    lo_aligned = (lo // BLOCK_N) * BLOCK_N
    per_split = tl.cdiv(tl.cdiv(kv_len - lo_aligned, NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = lo_aligned + split * per_split
    end = tl.minimum(start + per_split, kv_len)

    offs_g = head_block * BLOCK_H + tl.arange(0, BLOCK_H)
    h_mask = offs_g < GROUP
    heads = kv_head * GROUP + offs_g
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    d_mask = offs_d < HEAD_DIM
    dv_mask = offs_dv < HEAD_DIM_V

    q = tl.load(Q + tok * stride_qt + heads[:, None] * stride_qh + offs_d[None, :] * stride_qd,
                mask=h_mask[:, None] & d_mask[None, :], other=0.0)

    k_base = K + kv_head * stride_kh + offs_d[None, :] * stride_kd
    v_base = V + kv_head * stride_vh + offs_dv[None, :] * stride_vd
    bo_base = BlockOffsets + b.to(tl.int64) * stride_bo

    m_i = tl.zeros([BLOCK_H], dtype=tl.float32) - 1.0e30
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_DV], dtype=tl.float32)
    qk_scale = sm_scale * 1.4426950408889634

    # an empty split (start >= end: splits are fixed by the batch size, so short contexts leave some empty) skips
    # this loop but still stores lse = -inf below and still counts as arrived
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_mask = offs_n < end
        block = tl.load(bo_base + offs_n // PAGE_SIZE, mask=n_mask, other=0).to(tl.int64)
        slot = offs_n % PAGE_SIZE
        k = tl.load(k_base + block[:, None] * stride_kb + slot[:, None] * stride_ks,
                    mask=n_mask[:, None] & d_mask[None, :], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        if USE_SOFTCAP:
            s = softcap * tanh(s * (sm_scale / softcap)) * 1.4426950408889634
        else:
            s = s * qk_scale
        valid = n_mask
        if USE_WINDOW:
            valid = valid & (offs_n >= lo)
        s = tl.where(valid[None, :], s, float('-inf'))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + block[:, None] * stride_vb + slot[:, None] * stride_vs,
                    mask=n_mask[:, None] & dv_mask[None, :], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    has = l_i > 0
    o = acc / tl.where(has, l_i, 1.0)[:, None]
    if NUM_SPLITS == 1:
        tl.store(Out + tok * stride_ot + heads[:, None] * stride_oh + offs_dv[None, :] * stride_od,
                 o.to(Out.dtype.element_ty), mask=h_mask[:, None] & dv_mask[None, :])
    else:
        lse = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float('-inf'))
        part = b.to(tl.int64) * stride_pb + heads * stride_ph + split * stride_ps
        tl.store(PartLse + part, lse, mask=h_mask)
        tl.store(PartO + part[:, None] * HEAD_DIM_V + offs_dv[None, :], o,
                 mask=h_mask[:, None] & dv_mask[None, :])
        if FUSED_REDUCE:
            # One counter per (sequence, head block), i.e. per grid cell of axes 0/1. The atomic is done by one
            # thread of the program, so first wait until every thread has issued its partial stores above (CTA
            # barrier); the release half of the acq_rel atomic (GPU scope, the default) then publishes all of them
            # before the increment can be seen.
            counter = Counters + b.to(tl.int64) * tl.num_programs(0) + pid_h
            tl.debug_barrier()
            arrived = tl.atomic_add(counter, 1, sem='acq_rel')
            if arrived == NUM_SPLITS - 1:
                # Last of the NUM_SPLITS programs: every other one incremented before us, after storing its
                # partial, and our acquire orders the merge loads after those increments.
                n_heads = tl.minimum(GROUP - head_block * BLOCK_H, BLOCK_H)
                for i in range(0, n_heads):
                    h = kv_head * GROUP + head_block * BLOCK_H + i
                    res = _merge_splits(PartO, PartLse, b.to(tl.int64) * stride_pb + h * stride_ph, offs_dv,
                                        dv_mask, stride_ps, HEAD_DIM_V, BLOCK_DV, NUM_SPLITS, SPLITS_P2, CHUNK_S)
                    tl.store(Out + tok * stride_ot + h * stride_oh + offs_dv * stride_od,
                             res.to(Out.dtype.element_ty), mask=dv_mask)
                # All NUM_SPLITS arrivals of this launch have happened, so nothing else touches the counter in
                # this launch: a plain store leaves it at 0 for the next launch (or CUDA-graph replay).
                tl.store(counter, 0)


@triton.jit
def _reduce_kernel(
    PartO, PartLse, QStartLoc, QSeqlens, Out,
    stride_pb, stride_ph, stride_ps,
    stride_ot, stride_oh, stride_od,
    HEAD_DIM_V: tl.constexpr, BLOCK_DV: tl.constexpr, NUM_SPLITS: tl.constexpr, SPLITS_P2: tl.constexpr,
    CHUNK_S: tl.constexpr, USE_PDL: tl.constexpr,
):
    """The separate merge of the two-kernel path (`fused_reduce=False`, or no counter buffer during a capture)."""
    if USE_PDL:
        pdl_wait()
    b = tl.program_id(0)
    h = tl.program_id(1)
    q_len = tl.load(QSeqlens + b)
    if q_len == 0:
        return
    tok = tl.load(QStartLoc + b).to(tl.int64)
    offs_dv = tl.arange(0, BLOCK_DV)
    dv_mask = offs_dv < HEAD_DIM_V
    res = _merge_splits(PartO, PartLse, b.to(tl.int64) * stride_pb + h * stride_ph, offs_dv, dv_mask, stride_ps,
                        HEAD_DIM_V, BLOCK_DV, NUM_SPLITS, SPLITS_P2, CHUNK_S)
    tl.store(Out + tok * stride_ot + h * stride_oh + offs_dv * stride_od, res.to(Out.dtype.element_ty), mask=dv_mask)


# device -> the int32 arrival counters of the fused reduce (see `_arrival_counters`)
_COUNTERS: dict = {}
# buffers replaced by a bigger one: kept alive for good, since a CUDA graph captured earlier may still count in them
_RETIRED_COUNTERS: list = []
_MIN_COUNTERS = 1024


def _capturing(device: torch.device) -> bool:
    return device.type == 'cuda' and torch.cuda.is_current_stream_capturing()


def _arrival_counters(device: torch.device, needed: int) -> torch.Tensor | None:
    """A zero-filled int32 buffer of at least `needed` counters on `device`, reused by every call; None if it
    would have to be (re)allocated while a CUDA graph is being captured.

    Allocating then would take the memory from the graph's private pool and record the zero-fill as a node of the
    graph, i.e. a memset per replay and a buffer that is not the one eager calls use; so the caller falls back to
    the two-kernel path. The kernels leave every counter they use at 0, so no memset is ever needed again."""
    buf = _COUNTERS.get(device)
    if buf is not None and buf.numel() >= needed:
        return buf
    if _capturing(device):
        return None
    if buf is not None:
        _RETIRED_COUNTERS.append(buf)
    buf = torch.zeros(max(next_pow2(needed), _MIN_COUNTERS), dtype=torch.int32, device=device)
    if device.type == 'cuda':
        # The zero-fill runs on the current stream; wait for it once here, so that a later call from another
        # stream (e.g. a graph replayed on a different stream) cannot overtake it.
        torch.cuda.current_stream(device).synchronize()
    _COUNTERS[device] = buf
    return buf


def choose_num_splits(batch: int, num_kv_heads: int, head_blocks: int, device: torch.device,
                      max_kv_seqlen: int | None = None) -> int:
    """Enough splits to put ~2 programs on every SM, no split shorter than _MIN_KEYS_PER_SPLIT keys (when the
    longest context is known), a power of two so that few distinct kernels/graphs arise."""
    programs = max(1, batch * num_kv_heads * head_blocks)
    splits = triton.cdiv(2 * num_sms(device), programs)
    if max_kv_seqlen is not None:
        splits = min(splits, triton.cdiv(max(int(max_kv_seqlen), 1), _MIN_KEYS_PER_SPLIT))
    splits = max(1, min(splits, _MAX_SPLITS))
    return 1 << (splits.bit_length() - 1)  # the power of two at or below


def decode_attention_fwd(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_offsets: torch.Tensor,
                         q_start_loc: torch.Tensor, q_seqlens: torch.Tensor, kv_seqlens: torch.Tensor,
                         out: torch.Tensor, scale: float | None = None, sliding_window: int | None = None,
                         logit_softcapping: float | None = None, max_kv_seqlen: int | None = None,
                         num_splits: int | None = None, block_n: int | None = None,
                         num_warps: int = 4, num_stages: int | None = None,
                         fused_reduce: bool | None = None) -> torch.Tensor:
    """Every sequence has q_seqlen 0 or 1 (its query is the token at q_start_loc[b]). No host sync.

    block_n / num_warps / num_stages override the tile config (benchmark sweeps). fused_reduce=True merges the
    splits in the split kernel (last arriver) instead of a second kernel; None reads `LMDP_DECODE_FUSED_REDUCE`
    (`lmdp.envs`, default off: it measured no faster, see notes/performance.md). The fused path also falls back to
    two kernels when the counter buffer would have to be allocated during a capture."""
    if fused_reduce is None:
        fused_reduce = envs.LMDP_DECODE_FUSED_REDUCE
    num_tokens, num_heads, head_dim = q.shape
    batch = q_seqlens.numel()
    _, page_size, num_kv_heads, _ = k_cache.shape
    head_dim_v = v_cache.size(-1)
    group = num_heads // num_kv_heads
    scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
    if batch == 0 or num_tokens == 0:
        return out

    block_h = min(max(16, next_pow2(group)), 64)
    head_blocks = triton.cdiv(group, block_h)
    block_d = max(16, next_pow2(head_dim))
    block_dv = max(16, next_pow2(head_dim_v))
    block_n = block_n or (64 if max(block_d, block_dv) <= 128 else 32)
    if num_stages is None:
        num_stages = 3 if block_n * max(block_d, block_dv) <= 64 * 128 else 2
    if num_splits is None:
        num_splits = choose_num_splits(batch, num_kv_heads, head_blocks, q.device, max_kv_seqlen)
    use_window = sliding_window is not None and sliding_window > 0
    use_softcap = bool(logit_softcapping)

    grid = (num_kv_heads * head_blocks, batch, num_splits)
    counters = None
    if num_splits > 1:
        part_o = torch.empty(batch, num_heads, num_splits, head_dim_v, dtype=torch.float32, device=q.device)
        part_lse = torch.empty(batch, num_heads, num_splits, dtype=torch.float32, device=q.device)
        if fused_reduce:
            counters = _arrival_counters(q.device, grid[0] * grid[1])
    else:
        part_o = part_lse = out  # unused
    fused = counters is not None
    stride_pb, stride_ph, stride_ps = (num_heads * num_splits, num_splits, 1)
    # the merge: all lse of a head at once (SPLITS_P2), the weighted sum of the partial outputs in chunks of CHUNK_S
    # splits, a [CHUNK_S, BLOCK_DV] float32 tile of at most 4096 elements (32 registers a thread at 4 warps)
    splits_p2 = max(2, next_pow2(num_splits))
    chunk_s = max(2, min(splits_p2, 4096 // block_dv))

    _decode_split_kernel[grid](
        q, k_cache, v_cache, block_offsets, q_start_loc, q_seqlens, kv_seqlens, out, part_o, part_lse,
        counters if fused else q_seqlens,  # unused unless fused
        scale, float(logit_softcapping) if use_softcap else 1.0, int(sliding_window) if use_window else 0,
        q.stride(0), q.stride(1), q.stride(2),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), k_cache.stride(3),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), v_cache.stride(3),
        block_offsets.stride(0),
        out.stride(0), out.stride(1), out.stride(2),
        stride_pb, stride_ph, stride_ps,
        GROUP=group, HEAD_BLOCKS=head_blocks, HEAD_DIM=head_dim, HEAD_DIM_V=head_dim_v,
        BLOCK_H=block_h, BLOCK_D=block_d, BLOCK_DV=block_dv, BLOCK_N=block_n,
        PAGE_SIZE=page_size, NUM_SPLITS=num_splits, FUSED_REDUCE=fused, SPLITS_P2=splits_p2, CHUNK_S=chunk_s,
        USE_SOFTCAP=use_softcap, USE_WINDOW=use_window,
        DOT_PRECISION=dot_precision(q), num_warps=num_warps, num_stages=num_stages, **pdl_launch(q.device),
    )
    if num_splits > 1 and not fused:
        _reduce_kernel[(batch, num_heads)](
            part_o, part_lse, q_start_loc, q_seqlens, out,
            stride_pb, stride_ph, stride_ps,
            out.stride(0), out.stride(1), out.stride(2),
            HEAD_DIM_V=head_dim_v, BLOCK_DV=block_dv, NUM_SPLITS=num_splits, SPLITS_P2=splits_p2, CHUNK_S=chunk_s,
            num_warps=num_warps, **pdl_launch(q.device),
        )
    return out
