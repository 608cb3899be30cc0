"""`pytest parity --tp N`: the port runs on N tensor-parallel ranks (gloo on the CPU, NCCL on GPUs), the reference
on rank 0 alone.

Every rank loads its shards of the port and runs the same teacher-forced steps (`lmdp.engine.tp.spmd`), so the
layers' collectives meet. A tap after an all-reduce or all-gather (the residual stream, the logits) is whole on
every rank; a tap inside a sharded layer (q, k, v, the attention output before o_proj) holds this rank's heads or
features only. Rank 0 puts those back together in rank order, keeping one copy of a key/value head that several
ranks share (fewer KV heads than ranks), so every tap is compared against transformers whole.
"""
import time

import torch

from .capture_set import CaptureSet
from .load_failure import port_loaded
from .port import load_port, run_port


def _rank_device(device: str, rank: int) -> str:
    return f'cuda:{rank}' if device.startswith('cuda') else device


def _on_cpu(taps: dict[str, dict[str, list[torch.Tensor]]]):
    return {phase: {tap: [t.cpu() for t in seqs] for tap, seqs in per_tap.items()} for phase, per_tap in taps.items()}


def port_on_rank(model_path, dtype, device, custom_module_map, refs_view: dict, block_size, overrides,
                 progress=None):
    """One rank's share of the port side of `compare`, both views (with tp=1, the whole of it). Rank 0 keeps
    everything; the others hand back their taps."""
    from lmdp.distributed import get_tp_world_rank
    from lmdp.fallback.hybrid import tap_impls
    rank = get_tp_world_rank()[1]
    t0 = time.perf_counter()
    agent, coverage = port_loaded(load_port, model_path, dtype, _rank_device(device, rank), custom_module_map)
    load_seconds = time.perf_counter() - t0
    if progress:
        progress.update(1)
    r = refs_view
    args = (agent, r['hf_config'], r['prompts'], r['tokens'], r['decode_steps'], r['captured_taps'], block_size,
            overrides)
    port = run_port(*args, progress=progress)
    port_local = run_port(*args, progress=progress, truth=r['truth'], graph_check=False)
    if rank:
        return _on_cpu(port.taps), _on_cpu(port_local.taps)
    port.load_seconds = load_seconds
    impls = tap_impls(agent.model, r['hf_config'], r['taps'], overrides)
    port_class = type(agent.model).__module__ + '.' + type(agent.model).__qualname__
    return port, port_local, coverage, port_class, impls


def _join(shards: list[torch.Tensor], want: torch.Size | None) -> torch.Tensor:
    """One tap's per-rank tensors as the whole: rank 0's when it already has the reference's shape, else the
    shards concatenated along the dimension that differs, neighbours holding the same (replicated) shard once."""
    first = shards[0]
    if want is None or first.shape == want or first.dim() != len(want):
        return first
    dim = next(d for d in range(1, first.dim()) if first.shape[d] != want[d])
    distinct = [shards[0]]
    for s in shards[1:]:
        if not torch.equal(s, distinct[-1]):
            distinct.append(s)
    return torch.cat(distinct, dim)


def merge_ranks(mine: CaptureSet, others: list[dict], truth: CaptureSet) -> CaptureSet:
    """Rank 0's captures with every sharded tap made whole from the other ranks' (`others`: their `taps`)."""
    for phase, per_tap in mine.taps.items():
        for tap, seqs in per_tap.items():
            ref = truth.get(phase, tap)
            for i in range(len(seqs)):
                want = ref[i].shape if ref is not None and i < len(ref) else None
                seqs[i] = _join([seqs[i]] + [o[phase][tap][i] for o in others], want)
    return mine


def run_port_ranks(tp: int, refs, device: str, custom_module_map, block_size: int, overrides, progress=None):
    """(port, port_local, coverage, port_class, impls) as `compare` needs them, from `tp` ranks (this process
    alone when tp=1)."""
    refs_view = dict(hf_config=refs.hf_config, prompts=refs.prompts, tokens=refs.tokens,
                     decode_steps=refs.decode_steps, taps=refs.taps, captured_taps=refs.captured_taps, truth=refs.truth)
    args = (refs.model_path, refs.dtype, device, custom_module_map, refs_view, block_size, overrides)
    if tp == 1:
        return port_on_rank(*args, progress=progress)
    from lmdp.engine.tp.spmd import run_on_ranks
    results = run_on_ranks(tp, port_on_rank, *args, device_type='cuda' if device.startswith('cuda') else 'cpu')
    port, port_local, coverage, port_class, impls = results[0]
    merge_ranks(port, [r[0] for r in results[1:]], refs.truth)
    merge_ranks(port_local, [r[1] for r in results[1:]], refs.truth)
    if progress:
        progress.update(1 + 2 * (1 + refs.decode_steps))
    return port, port_local, coverage, port_class, impls
