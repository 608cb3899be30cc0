"""Reference ops: a linear layer, and a linear layer whose input is a gated activation of a fused gate/up output.

`act_and_mul_linear(x, W, b, act)` is `F.linear(act_and_mul(x), W, b)`: the MLP's activation and down projection
as one op, so that a kernel may compute the activation while it reads its input (one launch fewer per layer).
"""

import torch
import torch.nn.functional as F

from .activation import gelu_and_mul, silu_and_mul

GATED_ACTS = ('silu', 'gelu', 'gelu_tanh')


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return F.linear(x, weight, bias)


def gated_act(x: torch.Tensor, act: str) -> torch.Tensor:
    """`act(gate) * up` for x = [gate | up] on the last dim; act is one of GATED_ACTS."""
    if act == 'silu':
        return silu_and_mul(x)
    if act == 'gelu':
        return gelu_and_mul(x, 'none')
    if act == 'gelu_tanh':
        return gelu_and_mul(x, 'tanh')
    raise ValueError(f'unknown gated activation {act!r}; expected one of {GATED_ACTS}')


def check_act_and_mul_linear(x: torch.Tensor, weight: torch.Tensor, act: str) -> None:
    """Raise ValueError unless `act` is a known gated activation and x is `[..., 2K]` for a `[N, K]` weight."""
    if act not in GATED_ACTS:
        raise ValueError(f'unknown gated activation {act!r}; expected one of {GATED_ACTS}')
    if x.size(-1) != 2 * weight.size(-1):
        raise ValueError(f'act_and_mul_linear: input has {x.size(-1)} features, expected 2 x {weight.size(-1)} '
                         '(the fused gate and up outputs)')


def act_and_mul_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                       act: str = 'silu') -> torch.Tensor:
    check_act_and_mul_linear(x, weight, act)
    return F.linear(gated_act(x, act), weight, bias)
