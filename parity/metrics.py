"""How far one tap of the port is from the reference: max |a-b| and where, relative L2 error, cosine."""
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch


@dataclass
class Metrics:
    max_abs: float                  # max |a - b| over the phase
    where: tuple[int, int, int]     # (sequence, token position in that sequence, channel) of max_abs
    rel_l2: float                   # ||a - b|| / ||b|| over every token of the phase
    cosine: float                   # the worst (smallest) per-token cosine similarity
    rel_l2_per_seq: list[float] = field(default_factory=list)
    gain: float = 0.0               # <a - b, b> / <b, b>: the part of the error that is a scale of b (a 1.005x bug
    gain_se: float = 0.0            # reads 5e-3); its standard error from the rest of the error

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> 'Metrics':
        return cls(d['max_abs'], tuple(d['where']), d['rel_l2'], d['cosine'], list(d.get('rel_l2_per_seq', [])),
                   d.get('gain', 0.0), d.get('gain_se', 0.0))


def _rel(diff_norm: torch.Tensor, ref_norm: torch.Tensor) -> float:
    d, r = diff_norm.item(), ref_norm.item()
    if r == 0.0:
        return 0.0 if d == 0.0 else float('inf')
    return d / r


def diff(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor], starts: Sequence[int]) -> Metrics:
    """Metrics of `a` (port) against `b` (reference).

    `a[i]`, `b[i]` are sequence i's rows `[n_i, features]`; `starts[i]` is the position of its first row in the
    sequence (0 for prefill, the prompt length for decode), so `where` names real token positions.
    """
    if len(a) != len(b) or any(x.shape != y.shape for x, y in zip(a, b)):
        raise ValueError(f'shape mismatch: {[tuple(x.shape) for x in a]} vs {[tuple(y.shape) for y in b]}')
    # float64 throughout: a float32 run's errors (~1e-7) must not be rounded away by the arithmetic measuring them
    a_all, b_all = torch.cat(list(a)).double(), torch.cat(list(b)).double()
    d = a_all - b_all
    absd = d.abs()
    flat = int(absd.argmax().item()) if absd.numel() else 0
    row, channel = divmod(flat, max(d.size(-1), 1))
    seq, offset = 0, row
    while seq < len(a) - 1 and offset >= a[seq].size(0):
        offset -= a[seq].size(0)
        seq += 1
    # float64: identical float32 rows should read 1.0, not 0.99999988
    cos = torch.nn.functional.cosine_similarity(a_all, b_all, dim=-1, eps=1e-300)
    both_zero = (a_all.norm(dim=-1) == 0) & (b_all.norm(dim=-1) == 0)
    cos = torch.where(both_zero, torch.ones_like(cos), cos)
    per_seq = [_rel((x.double() - y.double()).norm(), y.double().norm()) for x, y in zip(a, b)]
    gain, gain_se = _gain(d, b_all)
    return Metrics(max_abs=float(absd.max().item()) if absd.numel() else 0.0,
                   where=(seq, int(starts[seq]) + offset, channel),
                   rel_l2=_rel(d.norm(), b_all.norm()),
                   cosine=float(cos.min().item()) if cos.numel() else 1.0,
                   rel_l2_per_seq=per_seq, gain=gain, gain_se=gain_se)


def _gain(d: torch.Tensor, b: torch.Tensor):
    """Least-squares scale of `b` (`[tokens, channels]`) in the error `d`, and its standard error.

    The standard error is the largest of three sandwich estimates: errors independent per element (rounding
    noise), shared within a channel (a weight rounded once, as a folded norm gain is) and shared within a token (a
    per-token scalar such as a norm's rsqrt rounded once), so a correct port's fixed roundings widen the band
    instead of reading as a scale."""
    bb = (b * b).sum().item()
    if bb == 0.0:
        return 0.0, 0.0
    g = (d * b).sum().item() / bb
    w = b * (d - g * b)
    per_element = w.pow(2).sum()
    per_channel = w.sum(0).pow(2).sum()
    per_token = w.sum(-1).pow(2).sum()
    return g, max(per_element, per_channel, per_token).sqrt().item() / bb
