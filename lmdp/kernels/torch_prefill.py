"""Prefill attention through torch's own fused attention kernels (CUDA), reading lmdp's paged KV cache.

Two paths, both bf16/fp16 only, both after `fill_kv_cache` has written the step's keys and values (the kernels
read the cache, they never write it):

- `flash_varlen_prefill`: torch's flash-attention varlen kernel (`aten._flash_attention_forward`), one call for the
  whole step. Each sequence's keys/values (history and new) are gathered from the cache blocks into packed
  contiguous `[sum_kv, Hk, D]` buffers; the kernel aligns its causal mask bottom-right when a sequence has more
  keys than queries (query i of n sits at key position kv_len - n + i), which is what prefill with history needs,
  and takes GQA, a sliding window and the softmax scale.
- `cudnn_prefill`: torch's cuDNN attention (`aten._scaled_dot_product_cudnn_attention`), one call per sequence.
  Its causal mask is top-left aligned, so a sequence with history is attended in two parts, the history without
  a mask and the new tokens with the square causal mask, joined by their log-sum-exps
  (`lmdp.kernels.merge_attention`). cuDNN builds an execution plan per new shape (tens of ms), so it pays only
  where shapes recur; `lmdp.kernels.prefill_select` decides where it runs.
"""
import torch

from .merge_attention import merge_attention_states as _merge_reference


def packed_kv_index(block_offsets: torch.Tensor, kv_seqlens: torch.Tensor, sum_kv: int, page_size: int):
    """(block, slot) of every key of every sequence, packed sequence after sequence, and `cu_seqlens_k` `[B+1]`
    int32. Device-side only: `sum_kv` (the total key count) is the one fact taken from the host."""
    device = kv_seqlens.device
    cu_k = torch.zeros(kv_seqlens.numel() + 1, dtype=torch.int32, device=device)
    cu_k[1:] = torch.cumsum(kv_seqlens, 0, dtype=torch.int32)
    token = torch.arange(sum_kv, dtype=torch.int32, device=device)
    seq = torch.searchsorted(cu_k[1:], token, right=True)
    pos = (token - cu_k[seq]).long()
    block = block_offsets[seq, pos // page_size].long()
    return block, pos % page_size, cu_k


def gather_packed_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, block_offsets: torch.Tensor,
                     kv_seqlens: torch.Tensor, sum_kv: int):
    """Every sequence's cached keys and values as packed contiguous `[sum_kv, Hk, D]` buffers, and cu_seqlens_k."""
    block, slot, cu_k = packed_kv_index(block_offsets, kv_seqlens, sum_kv, k_cache.size(1))
    return k_cache[block, slot], v_cache[block, slot], cu_k


def window_bounds(sliding_window: int | None, causal: bool) -> tuple[int, int]:
    """Flash attention's (window_size_left, window_size_right) for lmdp's mask: a query sees itself and the
    sliding_window - 1 keys before it (transformers' rule), so the left bound is sliding_window - 1."""
    left = sliding_window - 1 if sliding_window else -1
    right = 0 if causal else -1
    return left, right


def flash_varlen(q, k, v, cu_q, cu_k, max_q: int, max_k: int, causal: bool, scale: float, left: int, right: int):
    """torch's flash-attention varlen forward on packed `[T, H, D]` q/k/v (GQA: k/v with fewer heads)."""
    window = {} if left < 0 and right < 0 else dict(window_size_left=left, window_size_right=right)
    return torch.ops.aten._flash_attention_forward(q, k, v, cu_q, cu_k, max_q, max_k, 0.0, causal, False,
                                                   scale=scale, **window)[0]


def flash_varlen_prefill(q, k_cache, v_cache, block_offsets, q_start_loc, q_seqlens, kv_seqlens, out,
                         max_q_seqlen: int, max_kv_seqlen: int, sum_kv_seqlen: int, scale: float,
                         sliding_window: int | None = None, causal: bool = True, varlen=flash_varlen) -> torch.Tensor:
    """Attention of packed queries `[T, Hq, D]` over the cache with torch's flash varlen kernel; `[T, Hq, D]`.
    `varlen` is the kernel (swappable so the CPU can test the bookkeeping with a reference stand-in)."""
    k, v, cu_k = gather_packed_kv(k_cache, v_cache, block_offsets, kv_seqlens, sum_kv_seqlen)
    cu_q = torch.zeros_like(cu_k)
    cu_q[1:] = torch.cumsum(q_seqlens, 0, dtype=torch.int32)
    left, right = window_bounds(sliding_window, causal)
    result = varlen(q, k, v, cu_q, cu_k, max_q_seqlen, max_kv_seqlen, causal, scale, left, right)
    if out is None:
        return result
    return out.copy_(result)


def cudnn_attend(q4, k4, v4, causal: bool, scale: float, need_lse: bool):
    """One cuDNN attention call on `[1, H, S, D]` views; returns (out `[1, Hq, Sq, Dv]`, lse `[Hq, Sq]` or None)."""
    result = torch.ops.aten._scaled_dot_product_cudnn_attention(q4, k4, v4, None, need_lse, 0.0, causal, False,
                                                                scale=scale)
    lse = result[1].reshape(q4.size(1), q4.size(2)) if need_lse else None
    return result[0], lse


def _heads_first(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(0, 1).unsqueeze(0)           # [S, H, D] -> [1, H, S, D] (a view)


def _tokens_first(x: torch.Tensor) -> torch.Tensor:
    return x[0].transpose(0, 1)                     # [1, H, S, D] -> [S, H, D] (a view)


def cudnn_prefill(q, k_cache, v_cache, block_offsets, seqlens: list[tuple[int, int, int]], out, scale: float,
                  causal: bool = True, attend=cudnn_attend, merge=None) -> torch.Tensor:
    """Attention of packed queries over the cache, one sequence at a time; `seqlens` holds each sequence's
    (q_start, q_len, kv_len) on the host. `attend` and `merge` are the kernels (swappable so the CPU can test the
    bookkeeping with reference stand-ins)."""
    from .paged_attention import gather_kv
    merge = merge or _merge_reference
    if out is None:
        out = q.new_empty(q.size(0), q.size(1), v_cache.size(-1))
    for b, (start, q_len, kv_len) in enumerate(seqlens):
        if q_len == 0:
            continue
        history = kv_len - q_len
        k = gather_kv(k_cache, block_offsets[b], kv_len)
        v = gather_kv(v_cache, block_offsets[b], kv_len)
        q4 = _heads_first(q[start:start + q_len])
        rows = out[start:start + q_len]
        if history == 0 or not causal:
            o, _ = attend(q4, _heads_first(k), _heads_first(v), causal, scale, False)
            rows.copy_(_tokens_first(o))
            continue
        o_hist, lse_hist = attend(q4, _heads_first(k[:history]), _heads_first(v[:history]), False, scale, True)
        o_new, lse_new = attend(q4, _heads_first(k[history:]), _heads_first(v[history:]), True, scale, True)
        merge(_tokens_first(o_hist), lse_hist, _tokens_first(o_new), lse_new, rows)
    return out
