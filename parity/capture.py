"""Forward hooks that record every tap of one forward call.

Each tap is cloned (as float32) the moment its module returns: fused kernels work in place, so the tensor a
module returned may be overwritten by the next op (lmdp's fused add + RMSNorm writes into its inputs).
"""
from typing import Dict

import torch

from .taps import Site


class Recorder:
    """`take()` after a forward gives tap name -> `[rows, features]` float32, one row per token of the call."""

    def __init__(self, model: torch.nn.Module, sites: Dict[str, Site]):
        modules = dict(model.named_modules())
        self._got: Dict[str, torch.Tensor] = {}
        self._handles = []
        for tap, site in sites.items():
            module = modules[site.module]
            if site.on_input:
                handle = module.register_forward_pre_hook(self._pre_hook(tap, site), with_kwargs=True)
            else:
                handle = module.register_forward_hook(self._hook(tap, site))
            self._handles.append(handle)

    def _keep(self, tap: str, tensor: torch.Tensor):
        tensor = tensor.detach()
        # a module called twice in one forward (weight sharing) keeps its last call
        self._got[tap] = tensor.reshape(-1, tensor.shape[-1]).to(torch.float32, copy=True)

    def _hook(self, tap: str, site: Site):
        return lambda module, args, output: self._keep(tap, site.read(output))

    def _pre_hook(self, tap: str, site: Site):

        def hook(module, args, kwargs):
            self._keep(tap, site.read(args, kwargs))

        return hook

    def take(self) -> Dict[str, torch.Tensor]:
        got, self._got = self._got, {}
        return got

    def close(self):
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
