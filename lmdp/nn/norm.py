"""RMSNorm, optionally fused with the residual add before it."""
import torch
from torch import nn

from .. import kernels
from ..distributed import get_tp_world_rank
from ..weight_loader.loaders import default_weight_loader, set_weight_loader


class RMSNorm(nn.Module):
    """`forward(x)` → normed; `forward(x, residual)` → `(normed(x + residual), x + residual)`.

    The fused form lets a decoder layer carry its residual stream without a separate add. `x` may be `[..., N]`
    (a per-head norm takes `[T, heads, head_dim]`, strided views included). `quant_config`, `align` and `prefix`
    are lmdeploy's and change nothing here; `tp` (a norm over a tensor-parallel slice) only works on one rank.
    """

    def __init__(self, hidden_size: int, eps: float = 1e-6, dtype=None, device=None, quant_config=None,
                 tp: bool = False, align: int = 1, prefix: str = '', all_reduce_group=None):
        super().__init__()
        if tp and get_tp_world_rank()[0] > 1:
            raise NotImplementedError('RMSNorm(tp=True) (a norm over a tensor-parallel slice of the features) is not '
                                      'supported yet; build the norm over the full hidden size')
        if all_reduce_group is not None:
            raise NotImplementedError('RMSNorm(all_reduce_group=...) (an all-reduce fused into the norm) is not '
                                      'supported; leave all_reduce on the projection before it')
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=dtype, device=device), requires_grad=False)
        set_weight_loader(self.weight, default_weight_loader)

    def forward(self, x: torch.Tensor, residual: torch.Tensor = None):
        return kernels.rms_norm(x, self.weight, self.eps, residual)

    def extra_repr(self):
        return f'{self.weight.numel()}, eps={self.eps}'
