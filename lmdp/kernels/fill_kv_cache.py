"""Reference op: write the new tokens' K/V into the paged cache.

The cache of one layer is a pair of tensors `[num_blocks, block_size, num_kv_heads, head_dim]`. Sequence b owns the
blocks `block_offsets[b, :]` in order; its token at absolute position p lives in block `block_offsets[b, p // bs]`,
slot `p % bs`. A step adds `q_seqlens[b]` tokens after `kv_seqlens[b] - q_seqlens[b]` tokens of history.
"""
import torch


def token_positions(q_start_loc: torch.Tensor, q_seqlens: torch.Tensor, kv_seqlens: torch.Tensor, num_tokens: int):
    """For each packed token: the index of its sequence and its absolute position in that sequence."""
    seq_idx = torch.repeat_interleave(torch.arange(q_seqlens.numel(), device=q_seqlens.device), q_seqlens.long(),
                                      output_size=num_tokens)
    history = (kv_seqlens - q_seqlens).long()
    offset_in_step = torch.arange(num_tokens, device=q_seqlens.device) - q_start_loc.long()[seq_idx]
    return seq_idx, history[seq_idx] + offset_in_step


def fill_kv_cache(k_states: torch.Tensor, v_states: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  q_start_loc: torch.Tensor, q_seqlens: torch.Tensor, kv_seqlens: torch.Tensor,
                  block_offsets: torch.Tensor) -> None:
    """Scatter k_states/v_states `[T, Hk, D]` (packed over the batch) into k_cache/v_cache, in place."""
    num_tokens = k_states.size(0)
    if num_tokens == 0:
        return
    block_size = k_cache.size(1)
    seq_idx, pos = token_positions(q_start_loc, q_seqlens, kv_seqlens, num_tokens)
    blocks = block_offsets.long()[seq_idx, pos // block_size]
    slots = pos % block_size
    k_cache[blocks, slots] = k_states.to(k_cache.dtype)
    v_cache[blocks, slots] = v_states.to(v_cache.dtype)
