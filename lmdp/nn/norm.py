"""RMSNorm, optionally fused with the residual add before it."""
import torch
from torch import nn

from .. import kernels
from ..weight_loader.loaders import default_weight_loader, set_weight_loader


class RMSNorm(nn.Module):
    """`forward(x)` → normed; `forward(x, residual)` → `(normed(x + residual), x + residual)`.

    The fused form lets a decoder layer carry its residual stream without a separate add.
    """

    def __init__(self, hidden_size: int, eps: float = 1e-6, dtype=None, device=None, quant_config=None,
                 tp: bool = False, **kwargs):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=dtype, device=device), requires_grad=False)
        set_weight_loader(self.weight, default_weight_loader)

    def forward(self, x: torch.Tensor, residual: torch.Tensor = None):
        return kernels.rms_norm(x, self.weight, self.eps, residual)

    def extra_repr(self):
        return f'{self.weight.numel()}, eps={self.eps}'
