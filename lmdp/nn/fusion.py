"""When a block may fuse one of its steps into a neighbouring kernel.

A block (`Attention`, `GatedMLP`) owns each step of its math as a child module, so the step can be read, replaced
and hooked by name; when the child is lmdp's own and nobody is watching it, the block runs it inside the next
kernel instead (one launch fewer, the same numbers). A replaced child, or one with a forward hook on it (the parity
harness's taps), is called as a step of its own, so a hook always sees the step's real output.
"""

from torch import nn
from torch.nn.modules import module as _module

_GLOBAL_HOOKS = ('_global_forward_hooks', '_global_forward_pre_hooks')


def is_observed(module: nn.Module) -> bool:
    """Whether a forward hook (on this module, or on every module) would miss the step if it were fused away."""
    return bool(module._forward_hooks or module._forward_pre_hooks
                or any(getattr(_module, name, None) for name in _GLOBAL_HOOKS))


def _owner(cls: type, attr: str) -> type | None:
    return next((c for c in cls.__mro__ if attr in vars(c)), None)


def fusable(module: nn.Module, marker: str):
    """The module's `marker` attribute (what the fused kernel needs to know) when the step may be fused, else None.

    The marker vouches for the `forward` of the class that declares it: a module without the marker, or a subclass
    that overrides `forward` without declaring the marker again, is always called.
    """
    value = getattr(module, marker, None)
    if value is None or value is False or is_observed(module):
        return None
    if _owner(type(module), marker) is not _owner(type(module), 'forward'):
        return None
    return value
