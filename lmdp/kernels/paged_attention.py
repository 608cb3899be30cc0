"""Reference op: attention of packed queries over the paged KV cache (prefill with history, and decode).

Ground truth for the Triton kernels, and the CPU path. It loops over sequences and computes in float32, casting
the result back to the query's dtype, so it is slow but as exact as the arithmetic allows.
"""
import math

import torch


def gather_kv(cache: torch.Tensor, block_ids: torch.Tensor, kv_len: int) -> torch.Tensor:
    """The first kv_len tokens of one sequence, `[kv_len, Hk, D]`, read from its blocks."""
    block_size = cache.size(1)
    num_blocks = (kv_len + block_size - 1) // block_size
    blocks = cache[block_ids[:num_blocks].long()]
    return blocks.flatten(0, 1)[:kv_len]


def attention_mask(q_len: int, kv_len: int, causal: bool, sliding_window: int | None, device) -> torch.Tensor:
    """`[q_len, kv_len]` bool, True where query i (at absolute position kv_len - q_len + i) may see key j."""
    q_pos = torch.arange(kv_len - q_len, kv_len, device=device)[:, None]
    k_pos = torch.arange(kv_len, device=device)[None, :]
    mask = torch.ones(q_len, kv_len, dtype=torch.bool, device=device)
    if causal:
        mask &= k_pos <= q_pos
    if sliding_window is not None and sliding_window > 0:
        # the same window as transformers: a query sees itself and the sliding_window - 1 tokens before it
        mask &= k_pos > q_pos - sliding_window
    return mask


def paged_attention_fwd(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_offsets: torch.Tensor,
                        q_start_loc: torch.Tensor, q_seqlens: torch.Tensor, kv_seqlens: torch.Tensor,
                        scale: float | None = None, sliding_window: int | None = None,
                        logit_softcapping: float | None = None, causal: bool = True,
                        out: torch.Tensor | None = None, is_decoding: bool | None = None,
                        max_q_seqlen: int | None = None, max_kv_seqlen: int | None = None,
                        sum_kv_seqlen: int | None = None, num_decodes: int = 0) -> torch.Tensor:
    """Attend packed queries `q [T, Hq, D]` to their sequences' cached keys and values.

    The cache must already hold this step's K/V (see `fill_kv_cache`). Returns `[T, Hq, Dv]` in q's dtype.
    GQA: query head h reads kv head `h // (Hq // Hk)`. is_decoding / max_q_seqlen / max_kv_seqlen / sum_kv_seqlen
    are hints that let the CUDA kernels size their grids and buffers without a host sync; num_decodes (the leading
    sequences of a mixed step that have one query each) lets them run those rows on the decode kernel. The
    reference needs none of them.
    """
    num_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads = k_cache.size(2)
    group = num_heads // num_kv_heads
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    if out is None:
        out = q.new_empty(q.size(0), num_heads, v_cache.size(-1))
    starts, q_lens, kv_lens = q_start_loc.tolist(), q_seqlens.tolist(), kv_seqlens.tolist()
    for b, (start, q_len, kv_len) in enumerate(zip(starts, q_lens, kv_lens)):
        if q_len == 0:
            continue
        qb = q[start:start + q_len].float().transpose(0, 1)                           # [Hq, q, D]
        kb = gather_kv(k_cache, block_offsets[b], kv_len).float().transpose(0, 1)     # [Hk, kv, D]
        vb = gather_kv(v_cache, block_offsets[b], kv_len).float().transpose(0, 1)
        kb = kb.repeat_interleave(group, dim=0)
        vb = vb.repeat_interleave(group, dim=0)
        scores = qb @ kb.transpose(1, 2) * scale
        if logit_softcapping:
            scores = torch.tanh(scores / logit_softcapping) * logit_softcapping
        mask = attention_mask(q_len, kv_len, causal, sliding_window, q.device)
        scores = scores.masked_fill(~mask, float('-inf'))
        probs = torch.softmax(scores, dim=-1)
        out[start:start + q_len] = (probs @ vb).transpose(0, 1).to(out.dtype)
    return out
