"""Reference ops of a mixture-of-experts layer: the router's softmax top-k, the token sort/align by expert that
grouped GEMMs need, and the fused experts.

Experts are stacked: `gate_up_weights[E, 2I, H]` holds expert e's gate rows `[:I]` then its up rows `[I:]`, and
`down_weights[E, H, I]`. Token t's output is `sum_k w[t, k] * down_e(act(gate_e x_t) * up_e x_t)` over its top-k
experts `e = topk_ids[t, k]`.
"""

import torch
import torch.nn.functional as F

from .linear import GATED_ACTS, gated_act


def check_softmax_topk(router_logits: torch.Tensor, top_k: int) -> None:
    if router_logits.dim() != 2:
        raise ValueError(f'softmax_topk: router logits must be [tokens, experts], got {tuple(router_logits.shape)}')
    if not 0 < top_k <= router_logits.size(-1):
        raise ValueError(f'softmax_topk: top_k={top_k} must be between 1 and the number of experts '
                         f'({router_logits.size(-1)})')


def softmax_topk(router_logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`(topk_weights, topk_ids)`: the k largest softmax probabilities of each row (float32, computed in float32
    as transformers' routers do) and their experts (int64), largest first."""
    check_softmax_topk(router_logits, top_k)
    probs = torch.softmax(router_logits.float(), dim=-1)
    weights, ids = probs.topk(top_k, dim=-1)
    return weights, ids


def renormalize_weights(topk_weights: torch.Tensor) -> torch.Tensor:
    """Each token's top-k weights scaled to sum to one (Mixtral; Qwen with `norm_topk_prob`)."""
    weights = topk_weights.float()
    return weights / weights.sum(dim=-1, keepdim=True)


def check_fused_moe(hidden_states, gate_up_weights, down_weights, topk_weights, topk_ids, act: str):
    """Raise ValueError naming the mismatch unless the shapes fit together (no device sync: ids aren't read)."""
    if act not in GATED_ACTS:
        raise ValueError(f'fused_moe: unknown gated activation {act!r}; expected one of {GATED_ACTS}')
    if hidden_states.dim() != 2:
        raise ValueError(f'fused_moe: hidden states must be [tokens, hidden], got {tuple(hidden_states.shape)}')
    if gate_up_weights.dim() != 3 or down_weights.dim() != 3:
        raise ValueError('fused_moe: expert weights must be stacked [experts, out, in]; got gate_up '
                         f'{tuple(gate_up_weights.shape)} and down {tuple(down_weights.shape)}')
    experts, two_inter, hidden = gate_up_weights.shape
    if two_inter % 2 or tuple(down_weights.shape) != (experts, hidden, two_inter // 2):
        raise ValueError(f'fused_moe: gate_up {tuple(gate_up_weights.shape)} must be [E, 2I, H] and down '
                         f'{tuple(down_weights.shape)} must be [E, H, I] for the same E, I, H')
    if hidden_states.size(1) != hidden:
        raise ValueError(f'fused_moe: hidden states have {hidden_states.size(1)} features, the experts take {hidden}')
    if topk_ids.shape != topk_weights.shape or topk_ids.dim() != 2 or topk_ids.size(0) != hidden_states.size(0):
        raise ValueError(f'fused_moe: topk_weights {tuple(topk_weights.shape)} and topk_ids '
                         f'{tuple(topk_ids.shape)} must both be [tokens={hidden_states.size(0)}, top_k]')


def fused_moe(hidden_states: torch.Tensor, gate_up_weights: torch.Tensor, down_weights: torch.Tensor,
              topk_weights: torch.Tensor, topk_ids: torch.Tensor, renormalize: bool = False,
              act: str = 'silu') -> torch.Tensor:
    """`[T, H]`: every token through its top-k experts, weighted (renormalised first when asked) and summed.

    Each expert's projections round as a linear layer in the model dtype does (so does `act(gate) * up`, the
    down projection's input); the weighted sum over experts is float32, rounded once.
    """
    check_fused_moe(hidden_states, gate_up_weights, down_weights, topk_weights, topk_ids, act)
    num_experts = gate_up_weights.size(0)
    if topk_ids.numel() and (int(topk_ids.min()) < 0 or int(topk_ids.max()) >= num_experts):
        raise ValueError(f'fused_moe: expert ids must lie in [0, {num_experts}); got '
                         f'{int(topk_ids.min())}..{int(topk_ids.max())}')
    weights = renormalize_weights(topk_weights) if renormalize else topk_weights.float()
    out = torch.zeros(hidden_states.shape, dtype=torch.float32, device=hidden_states.device)
    for expert in topk_ids.unique().tolist():
        tokens, slots = torch.where(topk_ids == expert)
        gate_up = F.linear(hidden_states[tokens], gate_up_weights[expert])
        y = F.linear(gated_act(gate_up, act), down_weights[expert])
        out.index_add_(0, tokens, y.float() * weights[tokens, slots, None])
    return out.to(hidden_states.dtype)


def moe_align(topk_ids: torch.Tensor, num_experts: int, block_m: int):
    """The (token, slot) pairs sorted by expert, each expert's run padded to a multiple of `block_m`, so that a
    grouped GEMM's row block holds one expert's rows.

    Returns `sorted_pairs` (pair index `t * top_k + k`, padding = the number of pairs), `block_experts` (the
    expert of each row block, -1 past the last) and `num_padded` (a one-element tensor: the used length of
    `sorted_pairs`). Buffers are sized for the worst case, `max_padded_pairs(...)`, so that their shapes depend on
    the shapes of the input alone (CUDA-graph safe). Within an expert, pairs keep their order.
    """
    flat = topk_ids.flatten()
    num_pairs = flat.numel()
    size = max_padded_pairs(num_pairs, num_experts, block_m)
    counts = torch.bincount(flat, minlength=num_experts)[:num_experts]
    padded = (counts + block_m - 1) // block_m * block_m
    ends = padded.cumsum(0)
    starts = ends - padded
    order = torch.sort(flat, stable=True).indices
    sorted_pairs = torch.full((size, ), num_pairs, dtype=torch.int32, device=flat.device)
    # rank of each sorted pair within its expert's run
    first_of_expert = counts.cumsum(0) - counts
    ranks = torch.arange(num_pairs, device=flat.device) - first_of_expert[flat[order]]
    sorted_pairs[starts[flat[order]] + ranks] = order.to(torch.int32)
    blocks = torch.arange(size // block_m, device=flat.device) * block_m
    block_experts = torch.searchsorted(ends, blocks, right=True).to(torch.int32)
    block_experts[block_experts >= num_experts] = -1
    num_padded = ends[-1:].to(torch.int32) if num_experts else torch.zeros(1, dtype=torch.int32)
    return sorted_pairs, block_experts, num_padded


def max_padded_pairs(num_pairs: int, num_experts: int, block_m: int) -> int:
    """An upper bound of `moe_align`'s padded length, a multiple of block_m: each expert that appears adds at
    most block_m - 1 rows of padding."""
    blocks = -(-num_pairs // block_m) + min(num_experts, num_pairs)
    return max(blocks, 1) * block_m
