"""The pass rule: a port may be as far from the float32 reference as the reference itself is in the test dtype.

The floor at a tap is the relative L2 error of transformers run in the test dtype against transformers in float32,
on the same tokens. The port passes the tap when

    rel_l2(port, reference float32) <= MULTIPLE * floor + EPS[dtype]

Why MULTIPLE = 4: a correct port rounds as often as the reference, in other places (fused add + norm, packed
q/k/v, float32-accumulating attention kernels), so its own error against float32 comes out at 0.5 - 2 times the
floor (measured: ~1x with the CPU reference kernels in bfloat16). Rounding errors are independent and grow alike
with depth in both, so the ratio stays put layer after layer. 4 leaves a factor of two over the worst legitimate
ratio, while real porting bugs (a wrong eps, a swapped weight, a dropped branch, a shifted position) sit at 10 to
1000 times the floor.

Why EPS: where the floor is zero (an embedding lookup is exact in any dtype) the port may still round once more
than the reference; one unit roundoff of the dtype covers that. In float32 there is no floor: EPS = 1e-5 is the
whole tolerance, "match transformers to about 1e-5 relative".

Whole-model checks follow the same idea: KL divergence is quadratic in the logit error, so its multiple is
MULTIPLE ** 2; argmax/top-k disagreements are forgiven only where the reference's own margin is inside
`noise_margin` of that row.
"""
from typing import Optional

import torch

MULTIPLE = 4.0
EPS = {torch.float32: 1e-5, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
# mean full-vocabulary KL(reference float32 || port), in nats, allowed on top of MULTIPLE**2 * the floor's KL
KL_EPS = {torch.float32: 1e-8, torch.float16: 1e-5, torch.bfloat16: 1e-4}


def tolerance(dtype: torch.dtype, floor: Optional[float]) -> float:
    """The largest relative L2 error a tap may show (floor is None in float32 runs)."""
    return MULTIPLE * (floor or 0.0) + EPS[dtype]


def kl_bound(dtype: torch.dtype, floor_kl: Optional[float]) -> float:
    return MULTIPLE**2 * (floor_kl or 0.0) + KL_EPS[dtype]


def noise_margin(dtype: torch.dtype, ref32_row: torch.Tensor, ref_dt_row: Optional[torch.Tensor]) -> float:
    """How far apart two logits of one row may be and still swap order by rounding alone.

    MULTIPLE times the largest logit error of the reference in the test dtype, plus EPS times the largest logit.
    """
    floor_abs = 0.0 if ref_dt_row is None else (ref_dt_row.float() - ref32_row.float()).abs().max().item()
    return MULTIPLE * floor_abs + EPS[dtype] * ref32_row.float().abs().max().item()


def rule_text(dtype: torch.dtype) -> str:
    """One line stating the rule in force."""
    name = str(dtype).replace('torch.', '')
    if dtype == torch.float32:
        return f'a tap passes when its relative L2 error against transformers float32 is <= {EPS[dtype]:.0e}'
    return (f'a tap passes when its relative L2 error against transformers float32 is <= {MULTIPLE:g} x floor + '
            f'{EPS[dtype]:.1e}, floor = transformers {name} against transformers float32 at the same tap')
