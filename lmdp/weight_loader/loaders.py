"""Weight loaders: how a checkpoint tensor lands in a (possibly sharded, possibly stacked) parameter.

Every parameter lmdp builds carries `param.weight_loader(param, loaded_weight, [shard_id])`. Loaders check shapes
and report every load to the active load tracker, which is how `load_model_weights` knows what was never loaded.
"""
from collections.abc import Sequence

import torch

from ..errors import WeightLoadError
from .tracker import describe_param, record_load


def check_shape(param: torch.Tensor, expected, loaded: torch.Tensor, shard_id=None):
    if tuple(loaded.shape) != tuple(expected):
        shard = f' (shard {shard_id!r})' if shard_id is not None else ''
        raise WeightLoadError(f'{describe_param(param)}{shard} expects shape {tuple(expected)}, but the checkpoint '
                              f'tensor has shape {tuple(loaded.shape)}')


def default_weight_loader(param: torch.nn.Parameter, loaded_weight: torch.Tensor):
    """Copy a whole tensor into the parameter (cast to its dtype)."""
    check_shape(param, param.shape, loaded_weight)
    with torch.no_grad():
        param.copy_(loaded_weight.to(param.dtype))
    record_load(param)


def split_for_rank(loaded_weight: torch.Tensor, dim: int, world_size: int, rank: int, what: str) -> torch.Tensor:
    """This rank's slice of a tensor split evenly along `dim`."""
    if world_size == 1:
        return loaded_weight
    size = loaded_weight.size(dim)
    if size % world_size:
        raise WeightLoadError(f'{what}: dimension {dim} of size {size} does not split evenly over {world_size} '
                              'tensor-parallel ranks; choose a tp that divides it')
    return loaded_weight.narrow(dim, rank * (size // world_size), size // world_size)


def set_weight_loader(param: torch.nn.Parameter, loader, shards: Sequence | None = None):
    """Attach a loader; `shards` lists the shard ids a stacked parameter needs before it counts as loaded."""
    param.weight_loader = loader
    if shards is not None:
        param.lmdp_shards = tuple(shards)
    return param
