"""What one decode step costs a model: wall time, and how many operators it dispatches.

The operator count (view and metadata ops left out) is a device-independent stand-in for kernel launches: on a GPU
a batch-1 decode step of a small model is bound by launches, not by FLOPs, so a port that fuses what transformers'
code does in several ops shows up here even on a CPU.
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
    ms_per_step: float     # wall time of one decode step (median)
    ops_per_step: int      # operators dispatched by one decode step, views and allocations left out
    batch: int


def count_ops(fn) -> int:
    """Operators `fn()` dispatches to kernels (views, shape queries and allocations not counted)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class _Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func._schema.name
            if not getattr(func, 'is_view', False) and name not in _FREE:
                self.n += 1
            return func(*args, **(kwargs or {}))

    with _Count() as counter:
        fn()
    return counter.n


@torch.inference_mode()
def decode_step_cost(agent, batch: int = 8, prompt_len: int = 12, steps: int = 8, seed: int = 0) -> StepCost:
    """Prefill `batch` random prompts, then time `steps` decode steps and count one step's operators."""
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
    ops = count_ops(lambda: agent.get_logits(agent.forward(inputs, runner.cache.kv_caches)))
    runner.release()
    times.sort()
    return StepCost(ms_per_step=1e3 * times[len(times) // 2], ops_per_step=ops, batch=batch)
