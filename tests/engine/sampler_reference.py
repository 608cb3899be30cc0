"""What each sampling filter keeps, written from its definition, one row at a time, independently of the sampler.

The logits a row chooses from are computed in float32 with the same elementwise operations the definitions name
(penalty, then temperature): each is correctly rounded, so they match the sampler bit for bit. Which tokens the
filters keep is then decided in float64. Top-p and min-p compare sums and ratios of probabilities with a bound,
and rounding may put a token a hair's breadth from the bound on either side: such a token is `maybe`, every other
one is decided. Top-k is decided exactly: the k likeliest, equal logits going to the lower token id.
"""
import math

import torch

from lmdp.engine.sampler import gumbel_noise, row_key
from lmdp.engine.sequence import SamplingParams

MARGIN = 1e-5      # far wider than float32 rounding of a softmax over tens of tokens, far narrower than the cases


def adjusted_row(logits: torch.Tensor, params: SamplingParams, history: list[int], num_generated: int):
    """float32 `[V]`: the repetition penalty on every token seen, stop ids at -inf below min_new_tokens."""
    x = logits.float().clone()
    if params.repetition_penalty != 1.0:
        penalty = torch.tensor(params.repetition_penalty, dtype=torch.float32)
        for t in set(history):
            x[t] = x[t] * penalty if x[t] < 0 else x[t] / penalty
    if num_generated < params.min_new_tokens:
        for t in params.stop_ids:
            x[t] = -math.inf
    return x


def scaled_row(adjusted: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    return adjusted / torch.tensor(params.temperature, dtype=torch.float32)


def best_first(x: torch.Tensor) -> list[int]:
    """Token ids by logit, highest first; equal logits in token-id order."""
    return sorted(range(x.numel()), key=lambda t: (-x[t].item(), t))


def support(x: torch.Tensor, params: SamplingParams) -> tuple[set[int], set[int]]:
    """(surely kept, maybe kept) for the temperature-scaled float32 logits `x` of a sampled row."""
    order = [t for t in best_first(x) if x[t] > -math.inf]
    if params.top_k > 0:
        order = order[:params.top_k]
    x64 = x.double()
    probs = torch.softmax(x64[order], 0).tolist()
    sure, maybe = set(), set()
    mass_before = 0.0
    top = x64[order[0]].item()
    for t, p in zip(order, probs):
        # top-p: a token stays while the mass before it is short of top_p (the one that crosses top_p stays)
        if params.top_p >= 1.0 or mass_before < params.top_p - MARGIN:
            keep_p = True
        elif mass_before > params.top_p + MARGIN:
            keep_p = False
        else:
            keep_p = None
        mass_before += p
        # min-p: a token stays while its probability is at least min_p times the best one's
        gap = x64[t].item() - top
        if params.min_p <= 0.0:
            keep_m = True
        elif params.min_p >= 1.0:
            keep_m = gap == 0.0
        elif gap > math.log(params.min_p) + MARGIN:
            keep_m = True
        elif gap < math.log(params.min_p) - MARGIN:
            keep_m = False
        else:
            keep_m = None
        if keep_p is False or keep_m is False:
            continue
        (sure if keep_p and keep_m else maybe).add(t)
    return sure, maybe


def greedy_token(adjusted: torch.Tensor) -> int:
    return best_first(adjusted)[0]


def sampled_token(x: torch.Tensor, kept: set[int], seed: int, num_generated: int) -> int:
    """The Gumbel-max draw over `kept`, with the sampler's counter-based noise for (seed, output position)."""
    ids = torch.tensor(sorted(kept))
    noise = gumbel_noise(torch.tensor([row_key(seed, num_generated)]), ids[None])[0]
    return ids[(x[ids] + noise).argmax()].item()
