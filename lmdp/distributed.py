"""The tensor-parallel group as layers see it, and the collectives they call.

Layers ask `get_tp_world_rank()` when they are built, to size their shards, and call `all_reduce` / `all_gather`
when they run; outside tensor parallelism the world is (1, 0) and the collectives do nothing. The engine's launcher
(`lmdp.engine.tp`) sets the group on every rank. `simulated_tp(world, rank)` sets the sizes alone, to build one
rank's model without any process group (on the meta device: the preflight's divisibility check, and tests).
"""
import contextlib
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class TPGroup:
    """This process's place in the tensor-parallel group. `group` carries the layers' collectives (NCCL on CUDA,
    gloo on the CPU); None for a simulated group, which can build a model but not run its collectives."""
    world: int
    rank: int
    group: object | None = None


_current: TPGroup | None = None
# torch renamed all_gather_into_tensor (same arguments) and deprecated the old name
_gather_single = getattr(dist, 'all_gather_single', None) or dist.all_gather_into_tensor


def get_tp_world_rank():
    """(world_size, rank) of the tensor-parallel group; (1, 0) outside tensor parallelism."""
    return (_current.world, _current.rank) if _current is not None else (1, 0)


def get_tp_group() -> TPGroup | None:
    return _current


def set_tp_group(group: TPGroup | None):
    """Make `group` the one layers see (None: no tensor parallelism). The launcher calls this on every rank."""
    global _current
    _current = group


@contextlib.contextmanager
def simulated_tp(world: int, rank: int):
    """Layers built inside see `world` ranks and are `rank`; nothing runs collectives."""
    previous = _current
    set_tp_group(TPGroup(world, rank) if world > 1 else None)
    try:
        yield
    finally:
        set_tp_group(previous)


def _process_group():
    if _current.group is None:
        raise RuntimeError(f'tensor-parallel collectives need a process group; this model was built for rank '
                           f'{_current.rank} of a simulated group of {_current.world} (simulated_tp), which can '
                           'only be built, not run')
    return _current.group


def all_reduce(tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` over the ranks, in place; returns it."""
    if _current is not None and _current.world > 1:
        dist.all_reduce(tensor, group=_process_group())
    return tensor


def all_gather(tensor: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Every rank's `tensor` (same shape on each) concatenated along `dim`, in rank order."""
    if _current is None or _current.world == 1:
        return tensor
    tensor = tensor.contiguous()
    out = tensor.new_empty(_current.world * tensor.numel())
    _gather_single(out, tensor.view(-1), group=_process_group())
    return torch.cat(out.view(_current.world, *tensor.shape).unbind(0), dim=dim)


def kv_heads_per_rank(num_kv_heads: int, world: int) -> int:
    """Key/value heads each rank holds: its share, or one replicated head when there are fewer heads than ranks
    (neighbouring ranks then hold the same head)."""
    if num_kv_heads >= world:
        if num_kv_heads % world:
            raise ValueError(f'{num_kv_heads} key/value heads do not split evenly over {world} tensor-parallel ranks; '
                             'choose a tp that divides them')
        return num_kv_heads // world
    if world % num_kv_heads:
        raise ValueError(f'{num_kv_heads} key/value heads can be neither split nor replicated evenly over {world} '
                         'tensor-parallel ranks; choose a tp that divides them or that they divide')
    return 1


def vocab_per_rank(vocab_size: int, world: int) -> int:
    """Rows of a vocabulary-parallel table on each rank: the vocabulary split in `world` parts, the last padded
    when it does not divide."""
    return -(-vocab_size // world)
