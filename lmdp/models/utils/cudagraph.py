"""`CudaGraphMixin`, as lmdeploy's ports inherit it: a model that says per step whether a CUDA graph may run it.

lmdp's graph runner (`lmdp.backends.cuda.graph_runner`) owns the static input buffers, pads the batch and fills
the step context itself, so a port needs only to answer `support_cuda_graph`. lmdeploy's buffer hooks
(`make_buffers_cudagraph`, `fill_buffers_cudagraph`, ...) have no counterpart here: a port that overrides one is
warned when its class is defined, since lmdp would never call it.
"""
import warnings
from typing import Any

import torch

#: lmdeploy's graph-runner hooks, which lmdp's graph runner does not call
LMDEPLOY_BUFFER_HOOKS = ('make_buffers_cudagraph', 'fill_buffers_cudagraph', 'update_context_cudagraph',
                         'make_output_buffers', 'get_outputs_cudagraph')


class CudaGraphMixin:
    """Decode steps may replay a CUDA graph; prefill steps (whose shapes vary) run eagerly."""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        overridden = [name for name in LMDEPLOY_BUFFER_HOOKS if name in vars(cls)]
        if overridden:
            warnings.warn(f'{cls.__qualname__} overrides {", ".join(overridden)}, which lmdp never calls: its graph '
                          'runner builds the static buffers itself. Extra per-step inputs must reach the model '
                          'through prepare_inputs_for_generation, or answer support_cuda_graph = False',
                          stacklevel=2)

    def support_cuda_graph(self, input_ids: torch.Tensor, position_ids: torch.Tensor,
                           past_key_values: list[list[torch.Tensor]], attn_metadata: Any = None,
                           inputs_embeds: torch.Tensor | None = None, **kwargs) -> bool:
        return bool(attn_metadata is not None and attn_metadata.is_decoding)
