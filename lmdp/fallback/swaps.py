"""Ready-made `build` functions for `Swap`s: lmdp modules sized from the transformers module they replace."""
from torch import nn


def _eps(old: nn.Module) -> float:
    for name in ('variance_epsilon', 'eps', 'epsilon'):
        value = getattr(old, name, None)
        if isinstance(value, float):
            return value
    raise ValueError(f'{type(old).__name__} has no variance_epsilon/eps attribute; build the RMSNorm yourself')


def rms_norm(old: nn.Module, dtype=None, device=None):
    """lmdp's fused RMSNorm for a transformers RMSNorm (`weight * x / rms(x)`, weight and eps taken from it)."""
    from ..nn import RMSNorm
    weight = getattr(old, 'weight', None)
    if weight is None or weight.dim() != 1:
        raise ValueError(f'{type(old).__name__} has no 1-D weight; it is not an RMSNorm lmdp can stand in for')
    return RMSNorm(weight.numel(), _eps(old), dtype=dtype, device=device)
