"""The router's softmax top-k in one launch: each program takes BLOCK_T tokens' logits whole, softmaxes them in
float32 and picks the k largest probabilities by k rounds of argmax (ties go to the lower expert id).
"""

import torch
import triton
import triton.language as tl

from ..moe import check_softmax_topk
from ._common import next_pow2, pdl_launch, pdl_wait


@triton.jit(do_not_specialize=['num_tokens'])
def _softmax_topk_kernel(Logits, Weights, Ids, num_tokens, num_experts, stride_l,
                         TOP_K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, USE_PDL: tl.constexpr):
    if USE_PDL:
        pdl_wait()
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_E)
    row_mask = rows < num_tokens
    col_mask = cols < num_experts
    x = tl.load(Logits + rows.to(tl.int64)[:, None] * stride_l + cols[None, :],
                mask=row_mask[:, None] & col_mask[None, :], other=0.0).to(tl.float32)
    x = tl.where(col_mask[None, :], x, float('-inf'))
    p = tl.exp(x - tl.max(x, axis=1)[:, None])
    p = p / tl.sum(p, axis=1)[:, None]
    p = tl.where(col_mask[None, :], p, -1.0)     # padding columns are never picked
    out = rows.to(tl.int64) * TOP_K
    for k in tl.static_range(TOP_K):
        best = tl.max(p, axis=1)
        idx = tl.argmax(p, axis=1, tie_break_left=True)
        tl.store(Weights + out + k, best, mask=row_mask)
        tl.store(Ids + out + k, idx.to(tl.int64), mask=row_mask)
        p = tl.where(cols[None, :] == idx[:, None], -1.0, p)


def softmax_topk(router_logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`(topk_weights float32 [T, k], topk_ids int64 [T, k])`, as the reference `lmdp.kernels.moe.softmax_topk`."""
    check_softmax_topk(router_logits, top_k)
    num_tokens, num_experts = router_logits.shape
    weights = torch.empty(num_tokens, top_k, dtype=torch.float32, device=router_logits.device)
    ids = torch.empty(num_tokens, top_k, dtype=torch.int64, device=router_logits.device)
    if num_tokens == 0:
        return weights, ids
    if router_logits.stride(-1) != 1:
        router_logits = router_logits.contiguous()
    block_e = next_pow2(num_experts)
    # a [BLOCK_T, BLOCK_E] tile of about 4K values per program
    block_t = max(1, min(next_pow2(num_tokens), 4096 // block_e))
    _softmax_topk_kernel[(triton.cdiv(num_tokens, block_t), )](
        router_logits, weights, ids, num_tokens, num_experts, router_logits.stride(0),
        TOP_K=top_k, BLOCK_T=block_t, BLOCK_E=block_e, num_warps=4, **pdl_launch(router_logits.device))
    return weights, ids
