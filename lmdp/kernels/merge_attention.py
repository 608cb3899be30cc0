"""Reference op: join two attention results over disjoint key sets into attention over their union.

Attention of a query over keys A and keys B is a weighted mean of the two partial results, each weighted by its
share of the softmax mass: with lse = log(sum(exp(scores))) per part,
    out = (exp(lse_a - lse) * out_a + exp(lse_b - lse) * out_b),  lse = logaddexp(lse_a, lse_b).
Prefill with history uses it to join attention over the cached history (no mask) with causal attention over the
step's own tokens, both computed by a kernel that only knows top-left causal masks.
"""
import torch


def merge_attention_states(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor,
                           out: torch.Tensor | None = None) -> torch.Tensor:
    """`out_a`, `out_b` `[S, H, Dv]`; `lse_a`, `lse_b` `[H, S]` float32 natural-log sums (-inf: the part saw no
    key). Writes `[S, H, Dv]` into `out` (allocated in out_a's dtype when None) and returns it."""
    la, lb = lse_a.float().transpose(0, 1), lse_b.float().transpose(0, 1)          # [S, H]
    m = torch.maximum(la, lb)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))                   # both parts empty: weights 0
    wa, wb = torch.exp(la - m), torch.exp(lb - m)
    total = wa + wb
    total = torch.where(total > 0, total, torch.ones_like(total))
    merged = (out_a.float() * (wa / total)[..., None] + out_b.float() * (wb / total)[..., None])
    if out is None:
        out = torch.empty_like(out_a)
    out.copy_(merged.to(out.dtype))
    return out
