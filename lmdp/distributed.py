"""Tensor-parallel world as the layers see it: (1, 0) until torch.distributed is initialised."""
import torch
import torch.distributed as dist


def get_tp_world_rank():
    """(world_size, rank) of the tensor-parallel group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def all_reduce(tensor: torch.Tensor) -> torch.Tensor:
    if get_tp_world_rank()[0] > 1:
        dist.all_reduce(tensor)
    return tensor
