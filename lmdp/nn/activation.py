"""Gated activations over a fused gate/up projection `[..., 2 * I]` → `[..., I]`."""
import torch
from torch import nn

from .. import kernels


class SiluAndMul(nn.Module):
    """`silu(gate) * up` (Llama, Qwen, Mistral).

    `fused_name` names it to the kernels that can compute it while they read their input (`GatedMLP` hands it to
    its down projection); an activation without one is simply called.
    """

    fused_name = 'silu'

    def __init__(self, inplace: bool = True):
        super().__init__()
        self.inplace = inplace  # kept for lmdeploy's signature; the result is always a new tensor of half width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.silu_and_mul(x)


class GeluAndMul(nn.Module):
    """`gelu(gate) * up` (Gemma); `approximate='tanh'` for `gelu_pytorch_tanh`."""

    def __init__(self, approximate: str = 'none'):
        super().__init__()
        if approximate not in ('none', 'tanh'):
            raise ValueError(f"GeluAndMul approximate must be 'none' or 'tanh', got {approximate!r}")
        self.approximate = approximate

    @property
    def fused_name(self) -> str:
        return 'gelu' if self.approximate == 'none' else 'gelu_tanh'

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.gelu_and_mul(x, self.approximate)
