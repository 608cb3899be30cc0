"""The gated MLP block: gate/up projection → activation → down projection."""

import torch
from torch import nn

from .activation import GeluAndMul, SiluAndMul
from .fusion import fusable
from .linear import build_down_linear, build_gateup_linear

#: activation names (HF's `hidden_act` / `hidden_activation` values) → the gated module lmdp builds for them
GATED_ACTIVATIONS = {
    'silu': lambda: SiluAndMul(inplace=True),
    'swish': lambda: SiluAndMul(inplace=True),
    'gelu': lambda: GeluAndMul(approximate='none'),
    'gelu_pytorch_tanh': lambda: GeluAndMul(approximate='tanh'),
    'gelu_new': lambda: GeluAndMul(approximate='tanh'),
    'gelu_fast': lambda: GeluAndMul(approximate='tanh'),
}


def build_gated_activation(name: str) -> nn.Module:
    """The gated activation module for an HF activation name ('silu', 'gelu_pytorch_tanh', ...)."""
    if name not in GATED_ACTIVATIONS:
        raise ValueError(f'no gated activation for {name!r}; known: {", ".join(sorted(GATED_ACTIVATIONS))}. Pass '
                         'act_fn=<module> with a forward(gate_up) -> act(gate) * up of your own')
    return GATED_ACTIVATIONS[name]()


class GatedMLP(nn.Module):
    """`down_proj(act_fn(gate_up_proj(x)))`, with gate and up in one matrix (`[gate | up]`).

    `act` is an HF activation name or a module taking `[..., 2 * I]` to `[..., I]`. lmdp's own activations
    (`SiluAndMul`, `GeluAndMul`) run inside down_proj's kernel as it reads its input, unless replaced or hooked
    (see `lmdp.nn.fusion`). Children: `gate_up_proj` (shards 0 gate, 1 up, or a fused checkpoint tensor),
    `act_fn`, `down_proj`.
    """

    def __init__(self, hidden_size: int, intermediate_size: int, act: str | nn.Module = 'silu',
                 bias: bool = False, dtype: torch.dtype | None = None, device=None, quant_config=None,
                 is_tp: bool = True, prefix: str = ''):
        super().__init__()
        self.gate_up_proj = build_gateup_linear(hidden_size, [intermediate_size, intermediate_size], bias=bias,
                                                dtype=dtype, device=device, quant_config=quant_config, is_tp=is_tp,
                                                prefix=f'{prefix}.gate_up_proj' if prefix else '')
        self.act_fn = build_gated_activation(act) if isinstance(act, str) else act
        self.down_proj = build_down_linear(intermediate_size, hidden_size, bias=bias, dtype=dtype, device=device,
                                           quant_config=quant_config, is_tp=is_tp,
                                           prefix=f'{prefix}.down_proj' if prefix else '')

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        fused = fusable(self.act_fn, 'fused_name')
        if fused is not None:
            return self.down_proj(gate_up, act=fused)
        return self.down_proj(self.act_fn(gate_up))
