"""The pass rule: a port may be as far from the truth as transformers itself is in the test dtype.

The truth is transformers one precision up (float32 for a bfloat16/float16 run, float64 for a float32 run). The
floor at a tap is transformers in the test dtype against the truth, on the same tokens and, in the local view, on
the same layer inputs. A tap passes when both hold:

    rel_l2(port)  <= MULTIPLE[dtype] * rel_l2(floor) + EPS[dtype]                      (how large the error is)
    |gain(port) - gain(floor)| <= GAIN[dtype] + SIGMAS * standard error                 (whether it is a scale)

`gain` is the least-squares scale of the truth in the error (metrics.py): rounding noise averages out of it over
the thousands of values of a tap, while a module that is 1.005x too large reads 5e-3 there however noisy the tap.
The relative error catches everything else (a dropped term, a wrong eps, a shifted position). The constants come
from runs of every shipped port, correct and with planted bugs, over seeds and shapes: the measured worst ratios,
false-failure and miss rates are in parity/README.md (`scripts/parity_calibrate.py` reproduces them).

Whole-model checks follow the same idea: KL divergence is quadratic in the logit error, so its multiple is
MULTIPLE ** 2; argmax/top-k disagreements are forgiven only where the truth's own margin is inside
`noise_margin` of that row.
"""
import math

import torch

# unit roundoff of each test dtype
UNIT = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
MULTIPLE = {torch.float32: 4.0, torch.float16: 4.0, torch.bfloat16: 4.0}
EPS = {torch.float32: 2.0**-24, torch.float16: 2.0**-13, torch.bfloat16: 2.0**-10}
# a systematic scale a correct port may show: half a unit roundoff (a constant rounded like transformers does not)
GAIN = {dt: 0.5 * u for dt, u in UNIT.items()}
SIGMAS = 5.0
# mean full-vocabulary KL(truth || port), in nats, allowed on top of MULTIPLE**2 * the floor's KL
KL_EPS = {torch.float32: 1e-8, torch.float16: 1e-5, torch.bfloat16: 1e-4}


def tolerance(dtype: torch.dtype, floor: float | None) -> float:
    """The largest relative L2 error a tap may show."""
    return MULTIPLE[dtype] * (floor or 0.0) + EPS[dtype]


def gain_tolerance(dtype: torch.dtype, port_se: float, floor_se: float) -> float:
    """The largest |gain(port) - gain(floor)| a tap may show."""
    return GAIN[dtype] + SIGMAS * math.hypot(port_se, floor_se)


def judge(dtype: torch.dtype, port, floor, **where):
    """A TapResult for one tap: port and floor are `Metrics` against the truth."""
    from .report import TapResult
    tol = tolerance(dtype, floor.rel_l2)
    gtol = gain_tolerance(dtype, port.gain_se, floor.gain_se)
    failed = None
    if not port.rel_l2 <= tol:            # NaN fails too
        failed = 'error'
    elif not abs(port.gain - floor.gain) <= gtol:
        failed = 'gain'
    return TapResult(**where, port=port, floor=floor, tolerance=tol, passed=failed is None, gain_tolerance=gtol,
                     failed_rule=failed)


def kl_bound(dtype: torch.dtype, floor_kl: float | None) -> float:
    return MULTIPLE[dtype]**2 * (floor_kl or 0.0) + KL_EPS[dtype]


def noise_margin(dtype: torch.dtype, ref32_row: torch.Tensor, ref_dt_row: torch.Tensor | None) -> float:
    """How far apart two logits of one row may be and still swap order by rounding alone.

    MULTIPLE times the largest logit error of transformers in the test dtype, plus EPS times the largest logit.
    """
    floor_abs = 0.0 if ref_dt_row is None else (ref_dt_row.double() - ref32_row.double()).abs().max().item()
    return MULTIPLE[dtype] * floor_abs + EPS[dtype] * ref32_row.double().abs().max().item()


def rule_text(dtype: torch.dtype) -> str:
    """One line stating the rule in force."""
    name = str(dtype).replace('torch.', '')
    truth = 'float64' if dtype == torch.float32 else 'float32'
    return (f'a tap passes when, in the layer-local view, its relative L2 error against transformers {truth} is '
            f'<= {MULTIPLE[dtype]:g} x floor + {EPS[dtype]:.1e} and its scale error is within {GAIN[dtype]:.1e} + '
            f'{SIGMAS:g} standard errors of the floor\'s; floor = transformers {name} against transformers {truth}')
