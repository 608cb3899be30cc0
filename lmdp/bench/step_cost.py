"""What one decode step costs a model: wall time, and the kernel launches it would make on a GPU.

On a GPU a batch-1 decode step of a small model is bound by kernel launches, not by FLOPs, so a port that does in
one fused kernel what transformers' code does in several shows its gain in the launch count even on a CPU. The
count is the operators a step dispatches (views, shape queries and allocations left out), with each call of an
lmdp fused op (`lmdp.kernels`: one Triton launch on CUDA, several torch ops in its CPU reference) counted once.
"""
import time
from dataclasses import dataclass

import torch

#: ops that make no kernel launch on a GPU (views, shape queries)
_FREE = ('aten::view', 'aten::_unsafe_view', 'aten::reshape', 'aten::expand', 'aten::unsqueeze', 'aten::squeeze',
         'aten::transpose', 'aten::t', 'aten::permute', 'aten::slice', 'aten::select', 'aten::split',
         'aten::chunk', 'aten::alias', 'aten::detach', 'aten::as_strided', 'aten::sym_size', 'aten::sym_stride',
         'aten::lift_fresh', 'aten::unbind', 'aten::narrow', 'aten::split_with_sizes', 'aten::empty',
         'aten::empty_like', 'aten::empty_strided', 'aten::new_empty', 'aten::_reshape_alias')


@dataclass
class StepCost:
    ms_per_step: float          # wall time of one decode step (median)
    launches_per_step: int      # kernel launches one decode step would make on a GPU (see the module docstring)
    batch: int


def count_launches(fn) -> int:
    """Kernel launches `fn()` would make on a GPU: dispatched operators outside lmdp's fused ops (views, shape
    queries and allocations not counted), plus one per fused-op call."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from .. import kernels
    state = {'n': 0, 'inside': 0}

    def fused(op):
        def call(*args, **kwargs):
            if not state['inside']:
                state['n'] += 1
            state['inside'] += 1
            try:
                return op(*args, **kwargs)
            finally:
                state['inside'] -= 1
        return call

    class _Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if not state['inside'] and not getattr(func, 'is_view', False) and func._schema.name not in _FREE:
                state['n'] += 1
            return func(*args, **(kwargs or {}))

    originals = {name: getattr(kernels, name) for name in kernels.__all__}
    try:
        for name, op in originals.items():
            setattr(kernels, name, fused(op))
        with _Count():
            fn()
    finally:
        for name, op in originals.items():
            setattr(kernels, name, op)
    return state['n']


@torch.inference_mode()
def decode_step_cost(agent, batch: int = 8, prompt_len: int = 12, steps: int = 8, seed: int = 0) -> StepCost:
    """Prefill `batch` random prompts, then time `steps` decode steps and count one step's kernel launches."""
    from ..engine.step_runner import StepRunner
    g = torch.Generator().manual_seed(seed)
    vocab = agent.model_config.vocab_size
    prompts = torch.randint(3, vocab, (batch, prompt_len), generator=g).tolist()
    blocks = batch * (-(-(prompt_len + steps + 2) // 16)) + 2
    runner = StepRunner(agent, num_blocks=blocks, block_size=16)
    out = runner.prefill(prompts)
    ids = out.seq_ids
    tokens = out.logits.argmax(-1).tolist()
    times = []
    for _ in range(steps):
        if agent.device.type == 'cuda':
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = runner.decode(ids, tokens)
        tokens = out.logits.argmax(-1).tolist()      # reads the step back, as the engine does
        times.append(time.perf_counter() - start)
    inputs = runner.decode_inputs(ids, tokens)
    launches = count_launches(lambda: agent.get_logits(agent.forward(inputs, runner.cache.kv_caches)))
    runner.release()
    times.sort()
    return StepCost(ms_per_step=1e3 * times[len(times) // 2], launches_per_step=launches, batch=batch)
