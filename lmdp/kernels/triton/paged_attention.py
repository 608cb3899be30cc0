"""`paged_attention_fwd` for CUDA tensors: the decode kernel when every sequence has one query token, else the
prefill kernel. Same signature and semantics as `lmdp.kernels.paged_attention.paged_attention_fwd`, plus hints:

    is_decoding   True if every q_seqlen is 1 (or 0): picks the flash-decoding kernel without looking at the data
    max_q_seqlen  longest q_seqlen of the batch: sizes the prefill grid
    max_kv_seqlen longest kv_seqlen: lets decode use fewer splits on short contexts
    sum_kv_seqlen total kv_seqlen: sizes the packed K/V buffers of torch's flash path for prefill
    num_splits    force the number of decode splits (tests, benchmarks)
    num_decodes   a prefill step's leading sequences that have one query each (a mixed step's decodes): they go to
                  the decode kernel, which reads each K/V element once per KV group rather than once per query
                  head, and the rest to the prefill kernel; both write their own rows of `out`

With `is_decoding` given (and `max_q_seqlen` for prefill) nothing here reads device memory from the host, so a
decode step can be captured in a CUDA graph. Without them the missing facts are derived with a host sync.
Prefill runs the kernel `lmdp.kernels.prefill_select` picks (torch's flash or cuDNN attention, or lmdp's Triton
kernel).
"""

import torch

from ..prefill_select import prefill_attention
from .decode_attention import decode_attention_fwd


def paged_attention_fwd(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_offsets: torch.Tensor,
                        q_start_loc: torch.Tensor, q_seqlens: torch.Tensor, kv_seqlens: torch.Tensor,
                        scale: float | None = None, sliding_window: int | None = None,
                        logit_softcapping: float | None = None, causal: bool = True,
                        out: torch.Tensor | None = None, is_decoding: bool | None = None,
                        max_q_seqlen: int | None = None, max_kv_seqlen: int | None = None,
                        num_splits: int | None = None, sum_kv_seqlen: int | None = None,
                        num_decodes: int = 0) -> torch.Tensor:
    """Attend packed queries `q [T, Hq, D]` to the paged cache; returns `[T, Hq, Dv]` in q's dtype (or `out`)."""
    num_heads = q.size(1)
    if q.size(0) == 0 or q_seqlens.numel() == 0:
        return q.new_empty(q.size(0), num_heads, v_cache.size(-1)) if out is None else out
    if is_decoding is None:
        if max_q_seqlen is None:
            max_q_seqlen = int(q_seqlens.max().item())  # host sync: pass the hints to avoid it
        is_decoding = max_q_seqlen <= 1
    if not is_decoding and num_decodes > 0:
        d = num_decodes
        if out is None:
            out = q.new_empty(q.size(0), num_heads, v_cache.size(-1))
        decode_attention_fwd(q, k_cache, v_cache, block_offsets[:d], q_start_loc[:d], q_seqlens[:d], kv_seqlens[:d],
                             out, scale=scale, sliding_window=sliding_window, logit_softcapping=logit_softcapping,
                             max_kv_seqlen=max_kv_seqlen, num_splits=num_splits)
        if d >= q_seqlens.numel():
            return out
        # the prompt rows follow the d decode rows (one query each): the prefill kernels see them as a step of their
        # own, packed from row 0 (torch's flash path packs queries by q_seqlens alone); sum_kv_seqlen counts only
        # these rows' keys (ModelRunner.prepare_inputs)
        if max_q_seqlen is None:
            max_q_seqlen = int(q_seqlens.max().item())  # host sync: pass the hint to avoid it
        prefill_attention(q[d:], k_cache, v_cache, block_offsets[d:], q_start_loc[d:] - d, q_seqlens[d:],
                          kv_seqlens[d:], out[d:], max_q_seqlen, max_kv_seqlen=max_kv_seqlen,
                          sum_kv_seqlen=sum_kv_seqlen, scale=scale, sliding_window=sliding_window,
                          logit_softcapping=logit_softcapping, causal=causal)
        return out
    if is_decoding:
        if out is None:
            out = q.new_empty(q.size(0), num_heads, v_cache.size(-1))
        return decode_attention_fwd(q, k_cache, v_cache, block_offsets, q_start_loc, q_seqlens, kv_seqlens, out,
                                    scale=scale, sliding_window=sliding_window,
                                    logit_softcapping=logit_softcapping, max_kv_seqlen=max_kv_seqlen,
                                    num_splits=num_splits)
    if max_q_seqlen is None:
        max_q_seqlen = int(q_seqlens.max().item())  # host sync: pass the hint to avoid it
    return prefill_attention(q, k_cache, v_cache, block_offsets, q_start_loc, q_seqlens, kv_seqlens, out,
                             max_q_seqlen, max_kv_seqlen=max_kv_seqlen, sum_kv_seqlen=sum_kv_seqlen, scale=scale,
                             sliding_window=sliding_window, logit_softcapping=logit_softcapping, causal=causal)
